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


def _permutation(ndim: int, spec: MatrixSpec) -> tuple[list[int], tuple[int, ...]]:
    batch, fan_in, fan_out = spec.resolve(ndim)
    return [*batch, *fan_in, *fan_out], batch


def matrix_shape(shape: Sequence[int], spec: MatrixSpec | None = None) -> tuple[int, int, int]:
    """Shape ``(batch, fan_in, fan_out)`` of the matrix view of an array of ``shape``.

    Args:
      shape: the N-D shape (N >= 2).
      spec: which axes are fan-in and fan-out; default: the last two.

    Returns:
      The 3-tuple ``(prod(batch axes), prod(fan-in axes), prod(fan-out axes))``.
    """
    spec = spec or MatrixSpec()
    batch, fan_in, fan_out = spec.resolve(len(shape))
    size = lambda axes: int(math.prod(shape[a] for a in axes))  # noqa: E731
    return size(batch), size(fan_in), size(fan_out)


def batch_shape(shape: Sequence[int], spec: MatrixSpec | None = None) -> tuple[int, ...]:
    """The batch axes' sizes (in order) of the matrix view of an array of ``shape``."""
    batch, _, _ = (spec or MatrixSpec()).resolve(len(shape))
    return tuple(shape[a] for a in batch)


def matricize(x: jax.Array, *, spec: MatrixSpec | None = None) -> jax.Array:
    """Views an N-D array as a batch of matrices.

    Args:
      x: array of shape ``(..., )`` with ``ndim >= 2``.
      spec: which axes form fan-in and fan-out (default: the last two; leading axes are batch).

    Returns:
      Array of shape ``(batch, fan_in, fan_out)``; a transpose (if needed) and a reshape of ``x``.
    """
    spec = spec or MatrixSpec()
    perm, _ = _permutation(x.ndim, spec)
    b, m, n = matrix_shape(x.shape, spec)
    if perm != list(range(x.ndim)):
        x = jnp.transpose(x, perm)
    return x.reshape(b, m, n)


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
) -> list[Any]:
    """Runs ``fn`` once per bucket of same-(shape, dtype) items, on the stacked batch.

    Each item is a tuple of arrays that share their leading (batch) axis length; items whose
    arrays agree in trailing shapes and dtypes form a bucket. The arrays of a bucket are
    concatenated along axis 0, ``fn(*stacked)`` is called once, and its outputs (one array or a
    tuple of arrays, each with the same leading length as the inputs) are split back per item.

    Args:
      fn: ``(*arrays) -> array | tuple[array, ...]``, batched over the leading axis.
      items: one tuple of arrays per leaf, e.g. ``[(matricize(g1),), (matricize(g2),)]``.
      static: optional hashable per item (e.g. the projected axis); it joins the bucket key and
        is passed to ``fn`` as its first argument: ``fn(static, *arrays)``.
      stack: if False, call ``fn`` per item (for reference and tests).

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
        if len(members) == 1:
            results[members[0]] = call(members[0], *items[members[0]])
            continue
        sizes = [items[i][0].shape[0] for i in members]
        stacked = [
            jnp.concatenate([items[i][j] for i in members], axis=0)
            for j in range(len(items[members[0]]))
        ]
        out = call(members[0], *stacked)
        splits = np.cumsum(sizes)[:-1].tolist()
        if isinstance(out, tuple):
            parts = [jnp.split(o, splits, axis=0) for o in out]
            for k, i in enumerate(members):
                results[i] = tuple(p[k] for p in parts)
        else:
            parts = jnp.split(out, splits, axis=0)
            for k, i in enumerate(members):
                results[i] = parts[k]
    return results
