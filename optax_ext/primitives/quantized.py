"""Block-wise quantized storage of an inner transformation's statistics (8-bit optimizers)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from optax_ext._boxes import with_boxes
from optax_ext._types import is_masked, leaf_error
from optax_ext.kernels import sharding
from optax_ext.kernels.quantize import (
    BlockQuantizer,
    dequantize_blocks,
    dequantize_blockwise,
    quantize_blocks,
    quantize_blockwise,
)
from optax_ext.primitives._state import map_fields


class QuantizedArray(NamedTuple):
    """One quantized state tensor.

    Attributes:
      codes: ``uint8``, the tensor's shape: indices into the field's map.
      absmax: ``float32[ceil(size / block_size)]``: the scale of each block of consecutive
        entries (C order).
    """

    codes: jax.Array
    absmax: jax.Array


class QuantizeStateState(NamedTuple):
    """State of :func:`quantize_state`: ``inner_state`` with its named fields quantized.

    Each leaf of a named field is a :class:`QuantizedArray`, or the full-precision array when the
    leaf has fewer than ``quantizer.min_size`` entries.
    """

    inner_state: optax.OptState


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray) or is_masked(x)


def _row_sharding(x: jax.Array, block_size: int):
    """``(mesh, axes)`` when ``x`` is sharded over its first axis only (FSDP) and every
    device's slice is a whole number of blocks, so blocks (and their ``absmax``) can stay
    sharded over ``axes``; None otherwise (single device, replicated, other layouts)."""
    if jnp.ndim(x) == 0:
        return None
    mesh = sharding.mesh_of(x)
    if mesh is None:
        return None
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        spec = getattr(x.sharding, "spec", spec)  # concrete: its placed sharding (any axes)
    if spec is None:
        return None
    spec = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
    if spec[0] is None or any(s is not None for s in spec[1:]):
        return None
    axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
    devices = math.prod(dict(mesh.shape)[a] for a in axes)
    if x.shape[0] % devices or (x.size // devices) % block_size:
        return None
    return mesh, spec[0]


def quantize_state(
    inner: optax.GradientTransformation,
    quantizer: BlockQuantizer = BlockQuantizer(),
    *,
    fields: Sequence[str] = ("mu", "nu"),
    signed: Sequence[str] = ("mu",),
) -> optax.GradientTransformationExtraArgs:
    """Stores the named fields of ``inner``'s state as block-wise quantized 8-bit codes.

    Between steps every leaf of the named fields is kept as ``uint8`` codes into a dynamic map
    plus one float32 ``absmax`` per block of ``quantizer.block_size`` entries; inside a step
    ``inner`` sees float32 statistics and computes its update from the unquantized statistics of
    this step, whose quantization error therefore only affects the next step.

    Algorithm (per leaf of a named field; ``S`` the signed map for fields in ``signed``,
    the unsigned map otherwise)::

        x = S[c] * a_block                              # dequantize (float32)
        u, inner_state <- inner.update(g, inner_state)  # statistics and update of this step
        u_i <- 0 where g_i is not finite                # that entry is not updated
        x_i <- 0 where x_i is not finite                # and its statistics restart from 0
        a_block = max |x| over the block;  c = nearest(S, x / a_block)  (+ sign fix if signed)

    Fields are found by name anywhere in the nested inner state (``optax.chain`` tuples,
    wrappers' ``inner_state``, ``optax.partition``), like :func:`optax_ext.momentum_reset`.
    Leaves with fewer than ``quantizer.min_size`` entries stay in full precision (same rules
    for non-finite values). Wrapping a whole chain that ends with the learning rate and the
    weight decay reproduces the bitsandbytes 8-bit kernels: for an elementwise inner (Adam,
    Lion) a non-finite gradient entry gives zero statistics for that entry and leaves the
    parameter entry untouched, decay included.

    Args:
      inner: the wrapped transformation (or chain).
      quantizer: :class:`~optax_ext.kernels.BlockQuantizer` (frozen): ``bits`` (8), ``block_size``
        (256), ``min_size`` (4096) and ``sign_fix`` (True). Default ``BlockQuantizer()``, the
        bitsandbytes optimizers' settings.
      fields: state fields to quantize. Default ``("mu", "nu")`` (Adam's moments).
      signed: the fields stored with the signed map (first moments); the other fields use the
        unsigned map and must be non-negative (second moments). Default ``("mu",)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments of ``update`` go to
      ``inner``) with :class:`QuantizeStateState`; the outgoing updates keep the incoming
      updates' dtypes.

    Raises:
      ValueError: if ``signed`` names a field not in ``fields``; in ``init`` if the inner state
        has none of ``fields`` or a named leaf is not floating-point (path, shape named).

    References:
      Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization", ICLR,
      arXiv 2110.02861; code: github.com/bitsandbytes-foundation/bitsandbytes (``csrc/kernels.cu``
      ``kOptimizerStatic8bit2StateBlockwise``, ``bitsandbytes/optim/optimizer.py``) at
      95f9af309d4d5793847169c39288dcd3fcbdf564.

    Notes:
      The reference zeroes the statistics of a non-finite gradient entry inside its fused Adam
      kernel; here the rule is phrased on the state (non-finite statistics are stored as 0) and
      on the update (entries with a non-finite gradient get a zero update), which gives the same
      result for elementwise inners and a defined one for all others. For inners that mix
      entries (projections, rotations) a non-finite gradient entry still spreads through their
      own arithmetic and their unquantized state. Unlike the reference, full-precision leaves
      (below ``min_size``) follow the same rule; its 32-bit kernel would propagate the NaN.
      In a partial last block the CUDA kernel also counts its padding (code 128, i.e.
      ``b1 * 5.5e-7 * absmax``) in the new ``absmax``; this matters only when every entry of the
      block is below that, and is not reproduced.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> from optax_ext.kernels import BlockQuantizer
      >>> tx = optax_ext.quantize_state(optax_ext.scale_by_adam(), BlockQuantizer(min_size=0))
      >>> s = tx.init(jnp.zeros(300))
      >>> u, s = tx.update(jnp.linspace(-1.0, 1.0, 300), s)
      >>> mu = s.inner_state.mu
      >>> mu.codes.dtype, mu.codes.shape, mu.absmax.shape
      (dtype('uint8'), (300,), (2,))
    """
    fields = tuple(fields)
    signed = tuple(signed)
    unknown = [f for f in signed if f not in fields]
    if unknown:
        raise ValueError(f"quantize_state: signed names {unknown} that are not in fields {fields}")
    maps = {f: quantizer.code(f in signed) for f in fields}
    bs = quantizer.block_size

    def quantize_leaf(name, path, x):
        if is_masked(x):
            return x
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise leaf_error(
                path,
                x.shape,
                f"quantize_state stores floating-point statistics; field {name!r} has dtype "
                f"{x.dtype} (name only float fields)",
            )
        if x.size < quantizer.min_size:
            return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))
        sign_fix = quantizer.sign_fix and name in signed
        rows = _row_sharding(x, bs)
        if rows is not None:  # FSDP: each device quantizes its own blocks, absmax sharded too
            mesh, axes = rows
            blocks = sharding.reshape(x, (x.size // bs, bs), mesh, P(axes, None))
            codes, absmax = quantize_blocks(blocks, maps[name], sign_fix=sign_fix)
            codes = sharding.reshape(codes, x.shape, mesh, P(axes, *([None] * (x.ndim - 1))))
            return QuantizedArray(codes, absmax)
        # Other layouts: blocks run over the flattened tensor, so on an explicit-axis mesh it is
        # gathered first (one all-gather per leaf); the codes keep the statistic's own layout.
        xr = sharding.replicate(x)
        codes, absmax = quantize_blockwise(xr, maps[name], block_size=bs, sign_fix=sign_fix)
        return QuantizedArray(sharding.match(codes, x), absmax)

    def dequantize_leaf(name, q):
        if not isinstance(q, QuantizedArray):
            return q
        rows = _row_sharding(q.codes, bs)
        if rows is not None:
            mesh, axes = rows
            codes = sharding.reshape(q.codes, (q.codes.size // bs, bs), mesh, P(axes, None))
            vals = dequantize_blocks(codes, q.absmax, maps[name])
            layout = P(axes, *([None] * (q.codes.ndim - 1)))  # the statistic's own
            return sharding.reshape(vals, q.codes.shape, mesh, layout)
        codes = sharding.replicate(q.codes)
        return dequantize_blockwise(codes, q.absmax, maps[name], block_size=bs)

    def store(inner_state):
        def fn(name, tree):
            return jax.tree_util.tree_map_with_path(
                lambda path, x: quantize_leaf(name, path, x), tree, is_leaf=is_masked
            )

        return map_fields(inner_state, fields, fn)

    def load(inner_state):
        def fn(name, tree):
            return jax.tree.map(lambda q: dequantize_leaf(name, q), tree, is_leaf=_is_quantized)

        return map_fields(inner_state, fields, fn)[0]

    def init_fn(params):
        inner_state, hits = store(inner.init(params))
        if hits == 0:
            raise ValueError(
                f"quantize_state: the inner state has none of the fields {fields}; name fields "
                "it has (e.g. 'mu', 'nu' of optax_ext.scale_by_adam, 'mu' of optax.scale_by_lion)"
            )
        return QuantizeStateState(inner_state=inner_state)

    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        out, inner_state = inner.update(updates, load(state.inner_state), params, **extra_args)

        def keep_finite(u, g):
            return jnp.where(jnp.isfinite(g), u, jnp.zeros_like(u)).astype(g.dtype)

        out = jax.tree.map(keep_finite, out, updates)
        new_state = QuantizeStateState(inner_state=store(inner_state)[0])
        return out, sharding.keep_layout(new_state, state)

    return with_boxes(optax.GradientTransformationExtraArgs(init_fn, update_fn))
