"""Batched matrix decompositions (eigh, QR, SVD) that cannot deadlock XLA's CPU runtime.

On the CPU backend, jaxlib's LAPACK custom calls (``syevd``, ``geqrf``, ``gesdd``, ...) run a
batch of more than one matrix through ``ParallelBatchMap``: the calling thread, itself a worker
of XLA's intra-op thread pool, queues one task per matrix on that same pool and blocks until
they finish. When as many batched calls run at once as the pool has threads (XLA runs
independent thunks concurrently; with ``N`` CPU devices, ``N`` programs share the pool), every
worker blocks waiting for tasks that no free worker can run: the process hangs for good (seen
with jaxlib 0.10.2 on 2 cores: SOAP's eigh/QR refresh, Conda's SVD, on one device and on two).
A batch of one runs inline on the calling thread and never waits on the pool, so on CPU these
wrappers decompose one matrix per call (a ``lax.map`` loop, inside ``shard_map`` when the batch
is spread over a mesh). Other backends get the plain batched call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_ext.kernels import sharding


def _one_per_call() -> bool:
    return jax.default_backend() == "cpu"


def per_matrix(fn: Callable[..., Any], *xs: jax.Array) -> Any:
    """``fn`` on a batch of matrices, one LAPACK call per matrix on CPU.

    Args:
      fn: ``(*arrays) -> array | tuple`` on un-batched operands (one matrix each).
      *xs: ``(*batch, m, n)`` arrays sharing their batch axes.

    Returns:
      ``fn``'s outputs with the batch axes in front.
    """
    batch = xs[0].shape[:-2]
    if len(batch) != 1:  # one flat batch axis
        flat = [x.reshape(-1, *x.shape[len(batch) :]) for x in xs]
        out = per_matrix(fn, *flat)
        return jax.tree.map(lambda o: o.reshape(*batch, *o.shape[1:]), out)
    if not _one_per_call():
        return jax.vmap(fn)(*xs)
    loop = lambda *a: jax.lax.map(lambda args: fn(*args), a)  # noqa: E731
    mesh = sharding.mesh_of(xs[0])
    spec = None if mesh is None else P(tuple(mesh.axis_names))
    if spec is not None and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
        lead = tuple(jax.typeof(xs[0]).sharding.spec)[:1]
        spec = spec if lead == tuple(spec)[:1] else None  # not in the owner layout: plain loop
    if spec is not None and xs[0].shape[0] % math.prod(mesh.axis_sizes) == 0:
        # owner layout: each device loops over the matrices it holds
        return jax.shard_map(loop, mesh=mesh, in_specs=spec, out_specs=spec)(*xs)
    return loop(*xs)


def eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` of a ``(..., d, d)`` batch: ascending eigenvalues, eigenvectors."""
    return per_matrix(jnp.linalg.eigh, x)


def qr(x: jax.Array) -> jax.Array:
    """The ``Q`` factor of ``jnp.linalg.qr`` (reduced) of a ``(..., m, n)`` batch."""
    return per_matrix(lambda a: jnp.linalg.qr(a)[0], x)


def svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``jnp.linalg.svd(x, full_matrices=False)`` of a ``(..., m, n)`` batch: ``u, s, vh``."""
    return per_matrix(lambda a: jnp.linalg.svd(a, full_matrices=False), x)


def singular_values(x: jax.Array) -> jax.Array:
    """``jnp.linalg.svd(x, compute_uv=False)`` of a ``(..., m, n)`` batch (descending)."""
    return per_matrix(lambda a: jnp.linalg.svd(a, compute_uv=False), x)
