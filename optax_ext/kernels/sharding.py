"""Layouts for batched matrix kernels on a device mesh ("owner computes").

Matrix kernels (Newton-Schulz, SVD, projections) contract over both axes of every matrix. When a
parameter is sharded over a mesh (FSDP rows, tensor-parallel columns), running them on the
sharded layout costs a collective per matmul. Instead, :func:`to_owner_layout` spreads the stacked
batch of whole matrices over all devices, and :func:`from_owner_layout` puts the result back:
one all-to-all each way per bucket of same-shaped matrices. Works with explicit-axis meshes
(sharding in types: ``jax.sharding.reshard``) and automatic ones (GSPMD:
``with_sharding_constraint``); inside ``shard_map`` (manual axes) arrays are local and nothing
changes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def mesh_of(x: jax.Array):
    """The (abstract) mesh of ``x``'s sharding if it spans more than one device, else None."""
    try:
        s = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - non-array inputs have no sharding
        return None
    mesh = getattr(s, "mesh", None)
    if mesh is None or not mesh.axis_names or math.prod(mesh.axis_sizes) <= 1:
        return None
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


def _explicit(mesh) -> bool:
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def _constrain(x: jax.Array, mesh, spec: P) -> jax.Array:
    if _explicit(mesh):
        return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def match(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` laid out like ``like`` (explicit meshes only; a no-op elsewhere)."""
    mesh = mesh_of(like)
    if mesh is None or not _explicit(mesh):
        return x
    target = jax.typeof(like).sharding
    if jax.typeof(x).sharding.spec == target.spec:
        return x
    return jax.sharding.reshard(x, target)


def to_owner_layout(x: jax.Array, mesh) -> jax.Array:
    """Pads the leading (batch) axis to a multiple of the device count and shards it."""
    devices = math.prod(mesh.axis_sizes)
    pad = -x.shape[0] % devices
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)], axis=0)
    return _constrain(x, mesh, P(tuple(mesh.axis_names), *([None] * (x.ndim - 1))))


def from_owner_layout(y: jax.Array, total: int, like: jax.Array) -> jax.Array:
    """Drops the padding and lays ``y`` out like ``like`` (same shape) or replicated (otherwise)."""
    mesh = mesh_of(like)
    if mesh is None:
        return y[:total]
    if not _explicit(mesh):
        # Automatic axes: unshard the batch axis in one exchange, let the partitioner pick the rest.
        free = (P.UNCONSTRAINED,) * (y.ndim - 1)
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, *free)))
        return y[:total]
    target = jax.typeof(like).sharding.spec if y.shape[1:] == like.shape[1:] else P()
    tail = tuple(target)[1:] + (None,) * (y.ndim - len(tuple(target)))
    y = jax.sharding.reshard(y, NamedSharding(mesh, P(None, *tail[: y.ndim - 1])))[:total]
    if y.shape == like.shape and tuple(target)[:1] not in ((), (None,)):
        y = jax.sharding.reshard(y, jax.typeof(like).sharding)
    return y
