"""N-D parameters as batches of matrices, and bucketing of same-shaped matrices.

Every matrix kernel in optax-ext works on a ``(batch, fan_in, fan_out)`` view. ``matricize`` builds
that view from an N-D array and a :class:`~optax_ext.MatrixSpec`; ``unmatricize`` inverts it.
``bucket_apply`` groups the views of many leaves by (shape, dtype), stacks each group along the
batch axis, runs a kernel once per group and splits the result, so that e.g. the 48 attention
matrices of GPT-2 small are orthogonalized by one batched Newton-Schulz call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext._types import MatrixSpec
from optax_ext.kernels import sharding


def _permutation(ndim: int, spec: MatrixSpec) -> tuple[list[int], tuple[int, ...]]:
    batch, fan_in, fan_out = spec.resolve(ndim)
    return [*batch, *fan_in, *fan_out], batch


def matrix_shape(shape: Sequence[int], spec: MatrixSpec | None = None) -> tuple[int, int, int]:
    """Shape ``(batch, fan_in, fan_out)`` of the matrix view of an array of ``shape``.

    Args:
      shape: the N-D shape (N >= 2).
      spec: which axes are fan-in and fan-out; default: the last two.

    Returns:
      The 3-tuple ``(prod(batch axes) * k, prod(fan-in axes), prod(fan-out axes) / k)`` with
      ``k = spec.fan_out_splits``.

    Raises:
      ValueError: if the fan-out side does not split into ``k`` equal parts.
    """
    spec = spec or MatrixSpec()
    batch, fan_in, fan_out = spec.resolve(len(shape))
    size = lambda axes: int(math.prod(shape[a] for a in axes))  # noqa: E731
    k = spec.fan_out_splits
    if size(fan_out) % k:
        raise ValueError(
            f"fan-out {size(fan_out)} of shape {tuple(shape)} does not split into "
            f"fan_out_splits={k} equal parts"
        )
    return size(batch) * k, size(fan_in), size(fan_out) // k


def batch_shape(shape: Sequence[int], spec: MatrixSpec | None = None) -> tuple[int, ...]:
    """The batch sizes (in order) of the matrix view: the batch axes, then the fan-out splits."""
    spec = spec or MatrixSpec()
    batch, _, _ = spec.resolve(len(shape))
    splits = (spec.fan_out_splits,) if spec.fan_out_splits > 1 else ()
    return tuple(shape[a] for a in batch) + splits


def matricize(x: jax.Array, *, spec: MatrixSpec | None = None) -> jax.Array:
    """Views an N-D array as a batch of matrices.

    Args:
      x: array of shape ``(..., )`` with ``ndim >= 2``.
      spec: which axes form fan-in and fan-out (default: the last two; leading axes are batch).

    Returns:
      Array of shape ``(batch, fan_in, fan_out)``; a transpose (if needed) and a reshape of ``x``.
      With ``spec.fan_out_splits = k`` the ``k`` column blocks of each matrix are ``k`` entries
      of the batch (the block index varies fastest).
    """
    spec = spec or MatrixSpec()
    perm, _ = _permutation(x.ndim, spec)
    b, m, n = matrix_shape(x.shape, spec)
    if perm != list(range(x.ndim)):
        x = jnp.transpose(x, perm)
    k = spec.fan_out_splits
    if k == 1:
        return x.reshape(b, m, n)
    x = x.reshape(b // k, m, k, n)
    return jnp.swapaxes(x, 1, 2).reshape(b, m, n)


def unmatricize(y: jax.Array, *, shape: Sequence[int], spec: MatrixSpec | None = None) -> jax.Array:
    """Inverts :func:`matricize`: maps a ``(batch, fan_in, fan_out)`` view back to ``shape``.

    Args:
      y: array of shape ``matrix_shape(shape, spec)``.
      shape: the original N-D shape.
      spec: the spec used by :func:`matricize`.

    Returns:
      Array of shape ``shape``.
    """
    spec = spec or MatrixSpec()
    perm, _ = _permutation(len(shape), spec)
    k = spec.fan_out_splits
    if k > 1:
        b, m, n = y.shape
        y = jnp.swapaxes(y.reshape(b // k, k, m, n), 1, 2)
    permuted_shape = [shape[a] for a in perm]
    y = y.reshape(permuted_shape)
    if perm != list(range(len(shape))):
        y = jnp.transpose(y, np.argsort(perm))
    return y


def bucket_apply(
    fn: Callable[..., Any],
    items: Sequence[tuple[jax.Array, ...]],
    *,
    static: Sequence[Any] | None = None,
    stack: bool = True,
    out_like: Sequence[int | None] | None = None,
) -> list[Any]:
    """Runs ``fn`` once per bucket of same-(shape, dtype) items, on the stacked batch.

    Each item is a tuple of arrays that share their leading (batch) axis length; items whose
    arrays agree in trailing shapes and dtypes form a bucket. The arrays of a bucket are
    concatenated along axis 0, ``fn(*stacked)`` is called once, and its outputs (one array or a
    tuple of arrays, each with the same leading length as the inputs) are split back per item.

    Under a device mesh (inputs whose type carries a sharding on a mesh of more than one
    device, explicit or automatic axes), each stacked bucket is laid out "owner computes": its
    matrices are spread whole over all devices (padded with zero matrices to a multiple of the
    device count), ``fn`` runs without communication, and the result is laid out back like the
    input (outputs of another shape are replicated, unless ``out_like`` names an input of their
    shape). That costs one all-to-all each way per stacked array, independent of what ``fn``
    does (e.g. the number of Newton-Schulz steps).

    Args:
      fn: ``(*arrays) -> array | tuple[array, ...]``, batched over the leading axis.
      items: one tuple of arrays per leaf, e.g. ``[(matricize(g1),), (matricize(g2),)]``.
      static: optional hashable per item (e.g. the projected axis); it joins the bucket key and
        is passed to ``fn`` as its first argument: ``fn(static, *arrays)``.
      stack: if False, call ``fn`` per item (for reference and tests).
      out_like: optional, for output ``j`` of ``fn`` the position of the input whose per-item
        layout it gets back on a mesh (an output shaped like that input: e.g. a refreshed
        factor laid out like the stored factor it replaces). None (or an output past its end):
        the first input's layout if shaped like it, else replicated. Entries past a bucket's
        number of outputs are unused (buckets may differ in arity).

    Returns:
      A list with ``fn``'s output for every item, in the order of ``items``.
    """
    if static is not None:
        call = lambda i, *arrays: fn(static[i], *arrays)  # noqa: E731
    else:
        call = lambda i, *arrays: fn(*arrays)  # noqa: E731
    if not stack:
        return [call(i, *item) for i, item in enumerate(items)]
    buckets: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        key = tuple((a.shape[1:], jnp.dtype(a.dtype)) for a in item)
        if static is not None:
            key = (static[i], key)
        buckets.setdefault(key, []).append(i)
    results: list[Any] = [None] * len(items)
    for members in buckets.values():
        for i, out in zip(members, _run_bucket(call, items, members, out_like)):
            results[i] = out
    return results


def _run_bucket(
    call: Callable[..., Any],
    items: Sequence[tuple[jax.Array, ...]],
    members: Sequence[int],
    out_like: Sequence[int | None] | None = None,
):
    """Stacks the items of one bucket, calls the kernel once, and splits the outputs."""
    first = items[members[0]]
    mesh = sharding.mesh_of(first[0])

    def like(j: int) -> int:  # the input whose layout output j gets back
        k = None if out_like is None or j >= len(out_like) else out_like[j]
        return 0 if k is None else k

    if len(members) == 1 and mesh is None:
        return [call(members[0], *first)]
    sizes = [items[i][0].shape[0] for i in members]
    stacked = []
    for j in range(len(first)):
        parts = [items[i][j] for i in members]
        if mesh is not None:
            parts = [sharding.match(p, parts[0]) for p in parts]
        stacked.append(parts[0] if len(parts) == 1 else sharding.stacked(parts, mesh))
    if mesh is None:
        out = call(members[0], *stacked)
    else:
        # Owner computes: whole matrices of the stacked bucket are spread over the devices
        # (one exchange in, one out), so the kernel itself runs without collectives.
        owned = [sharding.to_owner_layout(a, mesh) for a in stacked]
        out = call(members[0], *owned)
        total = sum(sizes)
        if isinstance(out, tuple):
            out = tuple(
                sharding.from_owner_layout(o, total, stacked[like(j)], mesh)
                for j, o in enumerate(out)
            )
        else:
            out = sharding.from_owner_layout(out, total, stacked[like(0)], mesh)
    splits = np.cumsum(sizes)[:-1].tolist()

    def split(o: jax.Array, j: int) -> list[jax.Array]:
        parts = jnp.split(o, splits, axis=0) if len(members) > 1 else [o]
        if mesh is None or len(members) == 1:
            return parts
        # each item back in its own layout
        return [
            sharding.match(p, items[i][like(j)]) if p.shape == items[i][like(j)].shape else p
            for p, i in zip(parts, members)
        ]

    if isinstance(out, tuple):
        per_output = [split(o, j) for j, o in enumerate(out)]
        return [tuple(p[k] for p in per_output) for k in range(len(members))]
    return split(out, 0)
