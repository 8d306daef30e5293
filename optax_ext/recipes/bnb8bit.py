"""8-bit optimizers (Dettmers et al., 2022): Adam, AdamW and Lion with block-wise 8-bit states."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ext._types import is_masked
from optax_ext.kernels.quantize import BlockQuantizer
from optax_ext.recipes import _common
from optax_ext.primitives.elementwise import scale_by_lion
from optax_ext.primitives.moments import scale_by_adam
from optax_ext.primitives._state import get_field, map_fields
from optax_ext.primitives.quantized import quantize_state
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay


def _floor_second_moment(
    inner: optax.GradientTransformation, b1: float, b2: float
) -> optax.GradientTransformationExtraArgs:
    """Raises Adam's stored ``nu`` to ``mu^2 / C`` before ``inner`` (an Adam) updates them.

    ``C = (1 - b1)^2 / ((1 - b2) (1 - b1^2 / b2))`` is the Cauchy-Schwarz constant of the two
    moving averages: exact Adam states always satisfy ``m^2 <= C v``, so the floor never binds on
    them; it binds only where quantization stored ``v`` as 0 (or too small) while ``m`` was not.
    """
    if not b1 * b1 < b2:
        raise ValueError(f"guard_underflow needs b1**2 < b2, got b1={b1}, b2={b2}")
    inv_c = (1.0 - b2) * (1.0 - b1 * b1 / b2) / (1.0 - b1) ** 2
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        mu = get_field(state, "mu", "guard_underflow")

        def floor(_, nu):
            def leaf(m, v):
                if is_masked(v):
                    return v
                return jnp.maximum(v, (inv_c * m * m).astype(v.dtype))

            return jax.tree.map(leaf, mu, nu, is_leaf=is_masked)

        state, _ = map_fields(state, ["nu"], floor)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    quantizer: BlockQuantizer = BlockQuantizer(),
    mask: Any | Callable[[optax.Params], Any] | None = None,
    guard_underflow: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """8-bit AdamW (bitsandbytes ``AdamW8bit``): Adam's moments stored as block-wise 8-bit codes.

    Both moments live between steps as ``uint8`` codes into the dynamic maps (signed for ``m``,
    unsigned for ``v``) with one float32 ``absmax`` per block of 256 entries, i.e. about 2 bytes
    per parameter instead of 8; each step runs in float32 on the dequantized moments.

    Algorithm (``t`` the step; per block of 256 entries of each tensor)::

        m = S[c1] a1;  v = U[c2] a2                          # dequantize
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        W <- W - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
        W <- W (1 - lr wd)                                   # decay after the update
        where g is not finite: m = v = 0 and W is left unchanged
        a1 = max |m|, a2 = max v;  c1 = nearest(S, m / a1) (+ sign fix), c2 = nearest(U, v / a2)

    Args:
      learning_rate: ``lr`` (scalar or schedule). Default 1e-3.
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.
      eps: added to the bias-corrected ``sqrt(v)``. Default 1e-8.
      weight_decay: decoupled decay ``wd``, applied to the updated weights. Default 1e-2
        (``AdamW8bit``; :func:`adam_8bit` has 0).
      quantizer: :class:`~optax_ext.kernels.BlockQuantizer`: block size (256), ``min_size``
        (4096: smaller tensors keep float32 moments), bits (8) and the sign fix (on).
      mask: which leaves are decayed (a tree of booleans or ``params -> tree``). Default all.
      guard_underflow: before each step raise the dequantized ``v`` to ``m^2 / C``, with
        ``C = (1 - b1)^2 / ((1 - b2) (1 - b1^2 / b2))`` (52.9 at the defaults): the smallest
        ``v`` that exact Adam can hold next to ``m`` (Cauchy-Schwarz), so the floor never binds
        on unquantized states and keeps the update bounded where a block's ``v`` underflowed
        (see Notes). Needs ``b1^2 < b2``. Default False (bitsandbytes).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is
      :class:`~optax_ext.QuantizeStateState` over the chain's states, with ``mu``/``nu`` leaves
      :class:`~optax_ext.QuantizedArray` (or float arrays below ``min_size``).

    References:
      Dettmers, Lewis, Shleifer & Zettlemoyer, 2022, "8-bit Optimizers via Block-wise
      Quantization", ICLR, arXiv 2110.02861; code: bitsandbytes ``optim/adamw.py`` and
      ``csrc/kernels.cu`` ``kOptimizerStatic8bit2StateBlockwise`` at
      https://github.com/bitsandbytes-foundation/bitsandbytes/tree/95f9af309d4d5793847169c39288dcd3fcbdf564

    Notes:
      Not a fused kernel: :func:`~optax_ext.quantize_state` around the AdamW chain already runs
      the kernel's order (dequantize, update from the unquantized moments of this step, new
      ``absmax`` from the float32 moments, requantize), and wrapping the learning rate and the
      decay too makes a non-finite gradient entry leave its weight untouched, as the kernel does.
      Follows the CUDA kernel, not the paper: blocks of 256 (the paper used 2048; bitsandbytes
      >= 0.44), the parameter step uses the unquantized moments of this step, and a negative
      first moment is never stored as 0 (sign fix). The decay multiplies the already-updated
      weights (both ``Adam8bit`` and ``AdamW8bit``). The pure-PyTorch CPU path of bitsandbytes
      decays before the update and has no sign fix and no NaN handling; it is not followed.
      Tensors with fewer than ``min_size`` entries keep float32 moments (whatever the parameter
      dtype) with the same order of operations (the reference's 32-bit kernel). Optax computes
      ``1 - b2`` from the Python float (0.001), the kernel from float32 ``b2`` (0.00099998713):
      ``v`` and its ``absmax`` differ by 1.3e-5 relative, the codes not at all.
      ``StableEmbedding`` (32-bit states for the embedding) is a model-side choice: route such
      leaves to ``adamw_8bit(quantizer=BlockQuantizer(min_size=2**62))`` with
      ``optax.partition``.
      Gradient spikes (default path, as bitsandbytes): a spike of ``s`` times the typical
      gradient sets its block's ``absmax`` of ``v`` to about ``(1 - b2) s^2`` times the others'
      ``v``; below ``3.3e-7`` of it (the smallest non-zero value of the unsigned map) their ``v``
      is stored as code 0, i.e. 0, while their ``m`` (signed map, relative floor ``5.5e-7``,
      ``s`` not squared) survives or is rounded up. The next updates of those entries are then
      ``m_hat / (sqrt((1 - b2) g^2 / (1 - b2^t)) + eps)``, tens to thousands of times ``lr``
      (346 ``lr`` one step after a 1e6x spike on a 256 x 256 leaf of N(0, 1) gradients, while
      ``optax.adamw`` stays below ``lr``), for as long as the spike dominates the block's
      ``absmax`` (it decays as ``b2^t``). ``guard_underflow=True`` bounds them (about ``lr``).

    Example:
      >>> import jax.numpy as jnp, optax, optax_ext
      >>> params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
      >>> tx = optax_ext.adamw_8bit(1e-3)
      >>> state = tx.init(params)
      >>> u, state = tx.update(params, state, params)
      >>> mu = state.inner_state[0].mu
      >>> mu["w"].codes.dtype, mu["b"].dtype          # 4096 entries quantized, 64 kept
      (dtype('uint8'), dtype('float32'))
    """
    adam = scale_by_adam(b1, b2, eps, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    if guard_underflow:
        adam = _floor_second_moment(adam, b1, b2)  # v <- max(v, m^2 / C)
    return _common.float16_in_float32(quantize_state(
        optax.chain(
            adam,  # m, v
            optax.scale_by_learning_rate(learning_rate),  # u <- -lr u
            add_decoupled_weight_decay(weight_decay, learning_rate, mask=mask),  # (W+u)(1-lr wd)
        ),
        quantizer,  # m: signed map + sign fix, v: unsigned map; 256-entry blocks
        fields=("mu", "nu"),
        signed=("mu",),
    ))


def adam_8bit(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    quantizer: BlockQuantizer = BlockQuantizer(),
    mask: Any | Callable[[optax.Params], Any] | None = None,
    guard_underflow: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """8-bit Adam (bitsandbytes ``Adam8bit``): :func:`adamw_8bit` with weight decay 0 by default.

    A non-zero ``weight_decay`` is decoupled and applied after the update, as ``Adam8bit`` does
    (it is AdamW, not an L2 term added to the gradient).

    Args:
      learning_rate, b1, b2, eps, quantizer, mask, guard_underflow: as :func:`adamw_8bit`
        (``guard_underflow`` default False, bitsandbytes).
      weight_decay: decoupled decay. Default 0.

    Returns:
      The :func:`adamw_8bit` transformation.

    References:
      Dettmers et al., 2022, arXiv 2110.02861; bitsandbytes ``optim/adam.py`` at
      https://github.com/bitsandbytes-foundation/bitsandbytes/tree/95f9af309d4d5793847169c39288dcd3fcbdf564

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.adam_8bit()
      >>> u, _ = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)), jnp.zeros(3))
      >>> [round(float(x), 6) for x in u]       # -lr m_hat / (sqrt(v_hat) + eps)
      [-0.001, -0.001, -0.001]
    """
    return adamw_8bit(
        learning_rate,
        b1,
        b2,
        eps,
        weight_decay,
        quantizer=quantizer,
        mask=mask,
        guard_underflow=guard_underflow,
    )


def lion_8bit(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    *,
    quantizer: BlockQuantizer = BlockQuantizer(),
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """8-bit Lion (bitsandbytes ``Lion8bit``): Lion's single momentum as block-wise 8-bit codes.

    The momentum lives between steps as ``uint8`` codes into the signed dynamic map with one
    float32 ``absmax`` per block of 256 entries (about 1 byte per parameter instead of 4).

    Algorithm (per block of 256 entries of each tensor)::

        m = S[c] a                                    # dequantize
        W <- W (1 - lr wd)                            # decay before the sign step
        W <- W - lr sign(b1 m + (1 - b1) g)
        m <- b2 m + (1 - b2) g
        a = max |m|;  c = nearest(S, m / a) (+ sign fix)

    Args:
      learning_rate: ``lr`` (scalar or schedule). Default 1e-4 (Lion, ``Lion8bit``).
      b1: interpolation of momentum and gradient inside the sign. Default 0.9.
      b2: momentum decay. Default 0.99.
      weight_decay: decoupled decay ``wd``, applied to the current weights. Default 0.
      quantizer: :class:`~optax_ext.kernels.BlockQuantizer` (256-entry blocks, ``min_size``
        4096: smaller tensors keep a float32 momentum, sign fix).
      mask: which leaves are decayed (a tree of booleans or ``params -> tree``). Default all.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`~optax_ext.QuantizeStateState`.

    References:
      Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675
      (code: github.com/google/automl ``lion/lion_pytorch.py`` at 6a54c87); Dettmers et al.,
      2022, arXiv 2110.02861; bitsandbytes ``optim/lion.py`` and
      ``kOptimizerStatic8bit1StateBlockwise`` at
      https://github.com/bitsandbytes-foundation/bitsandbytes/tree/95f9af309d4d5793847169c39288dcd3fcbdf564

    Notes:
      The Lion step is :func:`optax_ext.scale_by_lion` (the PyTorch reference's math; the decay
      is applied multiplicatively before the sign step). The bitsandbytes 1-state kernel has no
      NaN handling (a non-finite gradient poisons its block); here such entries are skipped and
      their momentum restarts from 0 (see :func:`~optax_ext.quantize_state`).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.lion_8bit(0.5)
      >>> u, s = tx.update(jnp.array([2.0, -3.0, 0.0]), tx.init(jnp.zeros(3)), jnp.zeros(3))
      >>> u.tolist()                            # -lr sign(...); sign(0) = 0
      [-0.5, 0.5, -0.0]
    """
    return _common.float16_in_float32(quantize_state(
        optax.chain(
            scale_by_lion(b1, b2, mu_dtype="float32"),  # u = sign(b1 m + (1-b1) g); m <- b2 m ...
            optax.scale_by_learning_rate(learning_rate),  # u <- -lr u
            add_decoupled_weight_decay(  # W <- W (1 - lr wd) + u
                weight_decay, learning_rate, after_update=False, mask=mask
            ),
        ),
        quantizer,  # m: signed map + sign fix; 256-entry blocks
        fields=("mu",),
        signed=("mu",),
    ))
