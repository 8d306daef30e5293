"""Error-compensated 1-bit all-reduce over a named axis, and the bytes that collectives move.

``compressed_allreduce`` is the two-level scheme of 1-bit Adam (DeepSpeed ``NcclBackend``): every
worker sends one sign bit per entry (packed 8 to a byte) plus one fp32 scale per tensor, a
server role per chunk averages and re-compresses, and both levels keep the compression error
to add back next time (error feedback). It runs inside ``jax.shard_map`` / ``jax.pmap`` /
``jax.vmap(axis_name=...)`` over the data-parallel axis and issues four collectives per call,
whatever the number of tensors: an ``all_to_all`` of packed worker signs, an ``all_gather`` of
worker scales, an ``all_gather`` of packed server signs and one of server scales.

``collective_traffic`` lists the collectives in a traced function with the size of their
operands, so that tests and scripts measure (not assume) what crosses the network.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.sharding import AxisType


def padded_size(numel: int, workers: int) -> int:
    """Length of a flattened tensor padded for ``workers`` (a multiple of W * lcm(W, 8)).

    Each of the W server chunks then holds a whole number of bytes of packed signs.
    """
    unit = workers * math.lcm(workers, 8)
    return -(-numel // unit) * unit


def pack_signs(x: jax.Array) -> jax.Array:
    """Packs ``sign+(x)`` (``x >= 0`` -> bit 1, else 0) along the last axis, 8 bits a byte.

    Input ``(..., n)`` with ``n % 8 == 0``; output ``(..., n // 8)`` uint8, big-endian bit order
    (``numpy.packbits``, as CuPy in the reference). Zero maps to +1.
    """
    return jnp.packbits(x >= 0, axis=-1)


def unpack_signs(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_signs`: ``(..., k)`` uint8 -> ``(..., 8 k)`` float32 of +-1."""
    bits = jnp.unpackbits(packed, axis=-1).astype(jnp.float32)
    return 2.0 * bits - 1.0


def rms_sign(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``C(x) = rms(x) * sign+(x)`` of a flat vector, with its packed signs and its error.

    Args:
      x: float32 array ``(n,)``, ``n % 8 == 0``.

    Returns:
      ``(packed signs (n // 8,) uint8, scale () float32 = ||x|| / sqrt(n), error x - C(x))``.
    """
    scale = jnp.sqrt(jnp.sum(x * x)) / np.float32(np.sqrt(x.shape[0]))
    error = x - scale * jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)
    return pack_signs(x), scale, error


def _in_shard_map(axis_name: Any) -> bool:
    """True if ``axis_name`` is a manual axis of the current (shard_map) mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return all(types.get(n) == AxisType.Manual for n in names)


def _gather_replicated(x: jax.Array, axis_name: Any) -> jax.Array:
    """``all_gather`` whose result is typed as replicated over ``axis_name`` inside shard_map.

    Every device receives the same array; telling shard_map so (``to="invarying"``) lets the
    caller return it under ``out_specs=P()`` with ``check_vma=True``. Under ``pmap``/``vmap``
    that type does not exist and the plain gather is used.
    """
    if _in_shard_map(axis_name):
        try:
            return jax.lax.all_gather(x, axis_name, to="invarying")
        except TypeError:  # a JAX without the ``to`` argument: no replication types either
            pass
    return jax.lax.all_gather(x, axis_name)


def compressed_allreduce(
    xs: Sequence[jax.Array],
    worker_errors: Sequence[jax.Array],
    server_errors: Sequence[jax.Array],
    axis_name: Any,
) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
    """Error-compensated 1-bit mean over ``axis_name`` of several flat tensors at once.

    Runs on every worker (inside ``shard_map``/``pmap``/``vmap`` binding ``axis_name`` of size
    W > 1). Per tensor, ``n' = padded_size(n, W)``::

        worker w:  x = pad(x_w, n') + e_w;  s_w = rms(x);  e_w <- x - s_w sign+(x)
                   chunk r of sign+(x) (n'/W entries, packed) -> rank r      (all_to_all)
                   s_w -> everyone                                           (all_gather)
        server r:  y = (1/W) sum_w s_w sign+(x_w)[chunk r] + e_r;  t_r = rms(y)
                   e_r <- y - t_r sign+(y);  sign+(y), t_r -> everyone        (all_gather x2)
        result:    concat_r t_r sign+(y_r), truncated to n (identical on all workers)

    The signs of all tensors travel in one ``all_to_all`` and one ``all_gather`` (uint8); the
    scales in one ``all_gather`` each level (float32, one per tensor).

    Args:
      xs: this worker's tensors, each flat ``(n_i,)``; computed in float32.
      worker_errors: float32 ``(n'_i,)`` per tensor, this worker's compression error.
      server_errors: float32 ``(n'_i / W,)`` per tensor, this rank's server-chunk error.
      axis_name: the data-parallel axis.

    Returns:
      ``(means (n_i,) float32, new worker_errors, new server_errors)``.

    References:
      Tang et al., 2021, "1-bit Adam", arXiv 2102.02888; DeepSpeed
      ``deepspeed/runtime/comm/nccl.py`` ``NcclBackend.compressed_allreduce`` at edaa722.
    """
    workers = jax.lax.axis_size(axis_name)
    sizes = [int(x.size) for x in xs]
    padded = [int(e.shape[0]) for e in worker_errors]
    for n, p, se in zip(sizes, padded, server_errors):
        if p != padded_size(n, workers) or se.shape[0] * workers != p:
            raise ValueError(
                f"error buffers of length {p} and {se.shape[0]} do not fit a tensor of {n} "
                f"entries on {workers} workers (expected {padded_size(n, workers)} and "
                f"{padded_size(n, workers) // workers})"
            )
    chunk_bytes = [p // workers // 8 for p in padded]
    offsets = np.cumsum([0, *chunk_bytes]).tolist()

    # Worker side: compress (x + e_w), keep the error, send chunk r of the signs to rank r.
    signs, scales, new_worker = [], [], []
    for x, e, n, p in zip(xs, worker_errors, sizes, padded):
        x = jnp.pad(x.reshape(-1).astype(jnp.float32), (0, p - n)) + e
        packed, scale, error = rms_sign(x)
        signs.append(packed.reshape(workers, -1))
        scales.append(scale)
        new_worker.append(error)
    received = jax.lax.all_to_all(jnp.concatenate(signs, axis=1), axis_name, 0, 0)  # [W, K]
    worker_scales = _gather_replicated(jnp.stack(scales), axis_name)  # [W, T]
    weights = worker_scales * np.float32(1.0 / workers)

    # Server side (this rank's chunk of every tensor): average, add e_r, re-compress.
    server_signs, server_scales, new_server = [], [], []
    for i, e in enumerate(server_errors):
        chunk = unpack_signs(received[:, offsets[i] : offsets[i + 1]])  # [W, n'/W]
        y = jnp.sum(chunk * weights[:, i : i + 1], axis=0) + e
        packed, scale, error = rms_sign(y)
        server_signs.append(packed)
        server_scales.append(scale)
        new_server.append(error)
    all_signs = _gather_replicated(jnp.concatenate(server_signs), axis_name)  # [W, K]
    all_scales = _gather_replicated(jnp.stack(server_scales), axis_name)  # [W, T]

    means = []
    for i, n in enumerate(sizes):
        chunks = unpack_signs(all_signs[:, offsets[i] : offsets[i + 1]]) * all_scales[:, i : i + 1]
        means.append(chunks.reshape(-1)[:n])
    return means, new_worker, new_server


# ----------------------------------------------------------------------------------------------
# Accounting of collective traffic.

_WIRE = {
    # per-device bytes sent for an operand of B bytes on W devices (ring algorithms)
    "psum": lambda b, w: 2 * (w - 1) / w * b,
    "psum_invariant": lambda b, w: 2 * (w - 1) / w * b,
    "pmax": lambda b, w: 2 * (w - 1) / w * b,
    "pmin": lambda b, w: 2 * (w - 1) / w * b,
    "all_to_all": lambda b, w: (w - 1) / w * b,
    "reduce_scatter": lambda b, w: (w - 1) / w * b,
    "all_gather": lambda b, w: (w - 1) * b,
    "all_gather_invariant": lambda b, w: (w - 1) * b,
    "ppermute": lambda b, w: b,
}


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One collective in a traced function.

    Attributes:
      primitive: the collective's name (``psum``, ``all_to_all``, ``all_gather``, ...).
      shape: per-device operand shape.
      dtype: operand dtype name.
      operand_bytes: bytes of the operand handed to the collective on one device.
      wire_bytes: bytes one device sends under ring algorithms (all-reduce ``2 (W-1)/W B``,
        all-to-all and reduce-scatter ``(W-1)/W B``, all-gather ``(W-1) B``).
      where: the enclosing control flow, e.g. ``("cond[2]",)`` for the third branch of a cond.
    """

    primitive: str
    shape: tuple[int, ...]
    dtype: str
    operand_bytes: int
    wire_bytes: float
    where: tuple[str, ...]


def _sub_jaxprs(value: Any):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _axis_size(params: dict[str, Any], sizes: dict[Any, int]) -> int:
    if "axis_size" in params:
        return int(params["axis_size"])
    names = params.get("axes", params.get("axis_name", ()))
    names = names if isinstance(names, (tuple, list)) else (names,)
    return int(np.prod([sizes[n] for n in names if n in sizes]))


def collective_traffic(
    fn: Callable[..., Any], *args: Any, axis_sizes: dict[Any, int] | None = None
) -> list[Transfer]:
    """Traces ``fn(*args)`` and lists every collective with its operand sizes.

    Nested jaxprs (``shard_map``, ``jit``, ``cond``/``switch`` branches, loops) are searched;
    a ``shard_map``'s mesh supplies the axis sizes (``axis_sizes`` adds others, e.g. for
    ``vmap`` axes). Collectives are counted once per appearance in the program, i.e. per
    execution of their branch.

    Returns:
      A list of :class:`Transfer`.
    """
    jaxpr = jax.make_jaxpr(fn)(*args)
    out: list[Transfer] = []

    def walk(jx, where, sizes):
        for eqn in jx.eqns:
            name = eqn.primitive.name
            inner_sizes = sizes
            mesh = eqn.params.get("mesh")
            if mesh is not None:
                inner_sizes = {**sizes, **dict(mesh.shape)}
            if name in _WIRE:
                w = _axis_size(eqn.params, sizes)
                for v in eqn.invars:
                    aval = v.aval
                    nbytes = int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
                    out.append(
                        Transfer(
                            name,
                            tuple(aval.shape),
                            jnp.dtype(aval.dtype).name,
                            nbytes,
                            _WIRE[name](nbytes, w),
                            where,
                        )
                    )
            for key, value in eqn.params.items():
                for k, sub in enumerate(_sub_jaxprs(value)):
                    tag = f"{name}[{k}]" if key == "branches" else name
                    walk(sub, where + (tag,) if name in ("cond", "while") else where, inner_sizes)

    walk(jaxpr.jaxpr, (), dict(axis_sizes or {}))
    return out
