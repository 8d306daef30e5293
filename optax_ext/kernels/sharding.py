"""Layouts for batched matrix kernels on a device mesh ("owner computes").

Matrix kernels (Newton-Schulz, SVD, projections) contract over both axes of every matrix. When a
parameter is sharded over a mesh (FSDP rows, tensor-parallel columns), running them on the
sharded layout costs a collective per matmul. Instead, :func:`to_owner_layout` spreads the stacked
batch of whole matrices over all devices, and :func:`from_owner_layout` puts the result back:
one all-to-all each way per stacked array of a bucket of same-shaped matrices. Works with
explicit-axis meshes (sharding in types: ``jax.sharding.reshard``) and automatic ones (GSPMD:
``with_sharding_constraint``); inside ``shard_map`` (manual axes) arrays are local and nothing
changes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.shard_alike import shard_alike
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


def reshape(x: jax.Array, shape, mesh, spec: P) -> jax.Array:
    """``x`` reshaped to ``shape`` and laid out as ``spec`` on ``mesh`` (explicit axes: in the
    type, as a reshape of a sharded axis requires; automatic axes: a sharding constraint)."""
    if _explicit(mesh):
        return jax.lax.reshape(x, shape, out_sharding=NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x.reshape(shape), NamedSharding(mesh, spec))


def match(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` laid out like ``like`` (explicit meshes only; a no-op elsewhere)."""
    mesh = mesh_of(like)
    if mesh is None or not _explicit(mesh):
        return x
    target = jax.typeof(like).sharding
    if jax.typeof(x).sharding.spec == target.spec:
        return x
    return jax.sharding.reshard(x, target)


def stacked(parts: list[jax.Array], mesh) -> jax.Array:
    """The items of a bucket concatenated along the batch axis, in their own layout.

    Automatic axes: the batch axis of the concatenation stays unsharded (the other axes are
    left to the partitioner). Left free, the partitioner shards it (it feeds the owner
    layout), and results tied to it (see :func:`from_owner_layout`) would be split per item
    again with a permute each.
    """
    x = jnp.concatenate(parts, axis=0)
    if mesh is None or _explicit(mesh):
        return x
    free = (P.UNCONSTRAINED,) * (x.ndim - 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, *free)))


def to_owner_layout(x: jax.Array, mesh) -> jax.Array:
    """Pads the leading (batch) axis to a multiple of the device count and shards it."""
    devices = math.prod(mesh.axis_sizes)
    pad = -x.shape[0] % devices
    if pad:  # lax.pad keeps x's layout (a concatenate with fresh zeros would not, explicitly)
        x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, pad, 0)] + [(0, 0, 0)] * (x.ndim - 1))
    return _constrain(x, mesh, P(tuple(mesh.axis_names), *([None] * (x.ndim - 1))))


def from_owner_layout(y: jax.Array, total: int, like: jax.Array, mesh=None) -> jax.Array:
    """Drops the padding and lays ``y`` out like ``like`` (same shape) or replicated (otherwise).

    ``mesh``: the owner layout's mesh, for a ``like`` that has none (an input not placed on the
    mesh, e.g. a fresh state scalar stacked with sharded ones): ``y`` comes back replicated.
    """
    if mesh_of(like) is None:
        return y[:total] if mesh is None else _constrain(y, mesh, P())[:total]
    mesh = mesh_of(like)
    if not _explicit(mesh):
        # Automatic axes: unshard the batch axis in one exchange, back in the input's layout
        # where the shapes agree (the partitioner picks the rest of a stacked bucket).
        if y.shape[1:] != like.shape[1:]:  # as under explicit axes: replicated
            return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P()))[:total]
        free = (P.UNCONSTRAINED,) * (y.ndim - 1)
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, *free)))[:total]
        return shard_alike(y, like)[0] if y.shape == like.shape else y
    target = jax.typeof(like).sharding.spec if y.shape[1:] == like.shape[1:] else P()
    tail = tuple(target)[1:] + (None,) * (y.ndim - len(tuple(target)))
    y = jax.sharding.reshard(y, NamedSharding(mesh, P(None, *tail[: y.ndim - 1])))[:total]
    if y.shape == like.shape and tuple(target)[:1] not in ((), (None,)):
        y = jax.sharding.reshard(y, jax.typeof(like).sharding)
    return y


def replicated_part(x: jax.Array, mesh) -> jax.Array:
    """``x`` pinned replicated under an automatic-axis ``mesh`` (a no-op under explicit axes,
    where the type already says so)."""
    if mesh is None or _explicit(mesh):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def replicate(x: jax.Array) -> jax.Array:
    """``x`` gathered onto every device (explicit meshes only; a no-op elsewhere)."""
    mesh = mesh_of(x)
    if mesh is None or not _explicit(mesh):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P()))


def _concrete_sharding(x) -> NamedSharding | None:
    """A concrete (untraced) array's ``NamedSharding`` over more than one device, else None."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return None
    s = x.sharding
    if not isinstance(s, NamedSharding) or math.prod(s.mesh.axis_sizes) <= 1:
        return None
    if any(t == AxisType.Manual for t in s.mesh.axis_types):
        return None
    return s


def aligned_spec(
    shape, like_shape, like_spec: P, axis_sizes: dict[str, int], *, spread: bool = False
) -> P:
    """The layout of a state array of ``shape`` kept for a parameter of ``like_shape`` laid out
    as ``like_spec``: the parameter's sharding on every axis where the two agree in position and
    size, replicated elsewhere. With ``spread``, mesh axes left unused that way (those of a
    projected-away side) go to the largest remaining axis they divide, so a projected moment
    ``(r, n)`` of a row-sharded ``(m, n)`` parameter is sharded over ``n`` (not for statistics
    that broadcast against their parameter: their layouts must stay compatible).

    Args:
      shape: the state array's shape (same rank as ``like_shape``).
      like_shape: the parameter's shape.
      like_spec: the parameter's ``PartitionSpec``.
      axis_sizes: mesh axis name -> size.
      spread: place the unused mesh axes too (on an unsharded axis they divide, else joined
        to a sharded axis that the combined axes divide). Default False.

    Returns:
      A ``PartitionSpec`` for ``shape``.
    """
    spec = tuple(like_spec) + (None,) * len(shape)
    want = [s if a == b else None for a, b, s in zip(shape, like_shape, spec)]
    names = lambda s: () if s is None else (s,) if isinstance(s, str) else tuple(s)  # noqa: E731
    used = {n for s in want for n in names(s)}
    free = tuple(n for s in spec[: len(like_shape)] for n in names(s) if n not in used)
    size = math.prod(axis_sizes[n] for n in free)
    if spread and free and size > 1:
        open_axes = [i for i, s in enumerate(want) if s is None and shape[i] % size == 0]
        if open_axes:
            i = max(open_axes, key=lambda i: (shape[i], -i))
            want[i] = free[0] if len(free) == 1 else free
        else:  # no unsharded axis they divide (a rank below the device count): join a sharded
            # axis they divide together with its own mesh axes, e.g. n over ("model", "data")
            joint = [i for i, s in enumerate(want) if s is not None
                     and shape[i] % (size * math.prod(axis_sizes[n] for n in names(s))) == 0]
            if joint:
                i = max(joint, key=lambda i: (shape[i], -i))
                want[i] = names(want[i]) + free
    return P(*want)


def align(x: jax.Array, like: jax.Array, *, spread: bool = False) -> jax.Array:
    """``x`` laid out like its parameter ``like`` (see :func:`aligned_spec`, and ``spread``).

    A concrete ``like`` (e.g. at ``init`` on placed parameters) gives its sharding under both
    kinds of mesh axes; a traced one under explicit axes (sharding in types). A no-op for other
    ranks, single devices, and traced values under automatic axes (there the layout comes from
    the concrete arrays or the step's ``out_shardings``; see :func:`keep_layout`).

    Keeps per-matrix state laid out like its parameter: a projected moment ``(b, r, n)`` of a
    ``(b, m, n)`` parameter keeps the sharding of ``n``.
    """
    if jnp.ndim(x) != jnp.ndim(like):
        return x
    concrete = _concrete_sharding(like)
    if concrete is not None:
        mesh = concrete.mesh
        want = aligned_spec(x.shape, like.shape, concrete.spec, dict(mesh.shape), spread=spread)
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return jax.device_put(x, NamedSharding(mesh, want))
        return _constrain(x, mesh, want)
    mesh = mesh_of(like)
    if mesh is None or not _explicit(mesh):
        return x
    spec = jax.typeof(like).sharding.spec
    want = aligned_spec(x.shape, like.shape, spec, dict(mesh.shape), spread=spread)
    if getattr(jax.typeof(x).sharding, "spec", None) == want:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, want))


def keep_layout(new: Any, old: Any) -> Any:
    """Each leaf of ``new`` laid out like the same leaf of ``old`` (a state and its update).

    Explicit axes: resharded where they differ (see :func:`match`). Automatic axes: tied with
    ``shard_alike``, so a step returns its state in the layout it received (the partitioner
    cannot move it, e.g. across a ``lax.cond``). A no-op on single devices.
    """

    def keep(n, o):
        if not (hasattr(n, "shape") and hasattr(o, "shape")) or n.shape != o.shape or not n.ndim:
            return n
        mesh = mesh_of(o)
        if mesh is None:
            return n
        if _explicit(mesh):
            return match(n, o)
        return shard_alike(n, o)[0]

    return jax.tree.map(keep, new, old)
