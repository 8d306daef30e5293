"""Bases for one side of a matrix, and projection onto / back from them.

A basis ``Q`` for the projected side of an ``(m, n) = (fan_in, fan_out)`` matrix ``X`` has shape
``(d, r)``: ``d`` is the size of the projected side and ``r`` the rank. Projecting the fan-in side
gives ``Q^T X`` of shape ``(r, n)``; projecting the fan-out side gives ``X Q`` of shape ``(m, r)``.
Everything is batched over a leading axis.

Layout note: PyTorch references store ``nn.Linear`` weights as ``(out, in)``. Their "right"
projector ``P`` (``r x in``, for ``out >= in``) is ``Q = P^T`` on our fan-in side; their "left"
projector (``out x r``, for ``out < in``) is ``Q = P`` on our fan-out side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_ext.kernels import lapack
from optax_ext.kernels.matricize import bucket_apply

FAN_IN = 1
"""Axis of the fan-in side in a ``(batch, fan_in, fan_out)`` view."""
FAN_OUT = 2
"""Axis of the fan-out side in a ``(batch, fan_in, fan_out)`` view."""

SIDES = ("std", "reverse_std", "fan_in", "fan_out")


def projected_axis(m: int, n: int, side: str) -> int:
    """Which side of an ``(m, n) = (fan_in, fan_out)`` matrix a projector compresses.

    Args:
      m: fan-in size. n: fan-out size.
      side: ``"std"`` (the smaller side; fan-in on ties, as GaLore's 'std' for a square
        ``nn.Linear``), ``"reverse_std"`` (the larger side; fan-out on ties), ``"fan_in"`` or
        ``"fan_out"``.

    Returns:
      :data:`FAN_IN` (1) or :data:`FAN_OUT` (2).
    """
    if side == "std":
        return FAN_IN if m <= n else FAN_OUT
    if side == "reverse_std":
        return FAN_IN if m > n else FAN_OUT
    if side == "fan_in":
        return FAN_IN
    if side == "fan_out":
        return FAN_OUT
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def project(x: jax.Array, q: jax.Array, *, axis: int) -> jax.Array:
    """Projects ``x`` ``(b, m, n)`` onto basis ``q`` ``(b, d, r)`` along ``axis``.

    Returns:
      ``q^T x`` of shape ``(b, r, n)`` if ``axis == FAN_IN``, else ``x q`` of shape ``(b, m, r)``.
    """
    hp = jax.lax.Precision.HIGHEST
    if axis == FAN_IN:
        return jnp.einsum("bdr,bdn->brn", q, x, precision=hp)
    return jnp.einsum("bmd,bdr->bmr", x, q, precision=hp)


def project_back(y: jax.Array, q: jax.Array, *, axis: int) -> jax.Array:
    """Maps a projected ``y`` back to the full space with basis ``q`` ``(b, d, r)``.

    Returns:
      ``q y`` of shape ``(b, d, n)`` if ``axis == FAN_IN``, else ``y q^T`` of shape ``(b, m, d)``.
    """
    hp = jax.lax.Precision.HIGHEST
    if axis == FAN_IN:
        return jnp.einsum("bdr,brn->bdn", q, y, precision=hp)
    return jnp.einsum("bmr,bdr->bmd", y, q, precision=hp)


def svd_basis(x: jax.Array, *, rank: int | None, axis: int) -> jax.Array:
    """Top-``rank`` singular vectors of the ``axis`` side of each matrix (thin SVD, float32).

    Args:
      x: ``(b, m, n)``.
      rank: number of vectors; None or ``>= min(m, n)`` keeps all ``min(m, n)`` of them
        (a square, full-rank basis when the projected side is the smaller one).
      axis: :data:`FAN_IN` (left singular vectors, ``(b, m, r)``) or :data:`FAN_OUT` (right
        singular vectors, ``(b, n, r)``).

    Returns:
      Orthonormal columns, in ``x.dtype``, ordered by decreasing singular value. Signs follow the
      LAPACK/cuSOLVER convention of the backend (see the GaLore/Conda notes on sign invariance).
    """
    u, _, vt = lapack.svd(x.astype(jnp.float32))  # no batched LAPACK call on CPU (deadlock)
    k = u.shape[-1] if rank is None else min(rank, u.shape[-1])
    basis = u[..., :k] if axis == FAN_IN else jnp.swapaxes(vt[..., :k, :], -1, -2)
    return basis.astype(x.dtype)


def random_basis(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    """Gaussian sketch ``N(0, 1/r)`` of shape ``(..., d, r)``, not orthonormalised (APOLLO)."""
    r = shape[-1]
    return (jax.random.normal(key, tuple(shape), jnp.float32) / jnp.sqrt(r)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class SVDProjector:
    """Top-``rank`` SVD basis of the current matrix, refreshed every ``update_every`` steps.

    GaLore (Zhao et al., 2024, arXiv 2403.03507) and Fira take it from the gradient; Conda from
    the first moment with ``rank=None`` (full rank on the smaller side).

    Attributes:
      rank: basis size (static); None = ``min(m, n)``.
      update_every: refresh period T; the basis is recomputed at 0-based steps ``k % T == 0``.
      side: see :func:`projected_axis`. Default ``"std"``.
    """

    rank: int | None = 128
    update_every: int = 200
    side: str = "std"

    def axis(self, m: int, n: int) -> int:
        """The projected axis for an ``(m, n)`` matrix."""
        return projected_axis(m, n, self.side)

    def rank_for(self, m: int, n: int) -> int:
        """The basis size for an ``(m, n)`` matrix."""
        d = m if self.axis(m, n) == FAN_IN else n
        k = min(m, n)
        return min(k, d) if self.rank is None else min(self.rank, k, d)

    def bases(self, mats: Sequence[jax.Array], *, count: jax.Array) -> list[jax.Array]:
        """Bases for every ``(b, m, n)`` matrix in ``mats``; one batched SVD per shape bucket."""
        del count

        def fn(x):
            m, n = x.shape[-2:]
            return svd_basis(x, rank=self.rank_for(m, n), axis=self.axis(m, n))

        return bucket_apply(fn, [(x,) for x in mats])


@dataclasses.dataclass(frozen=True)
class RandomProjector:
    """Seeded Gaussian sketch ``N(0, 1/rank)``, redrawn every ``update_every`` steps (APOLLO).

    The key for leaf ``i`` at refresh step ``k`` is ``fold_in(fold_in(key(seed), i), k)``: no
    key buffer lives in the state, and a restored run redraws the same bases.

    Attributes:
      rank: sketch size (static).
      update_every: refresh period T (0-based steps ``k % T == 0``).
      side: see :func:`projected_axis`.
      seed: base seed.
    """

    rank: int = 128
    update_every: int = 200
    side: str = "std"
    seed: int = 0

    def axis(self, m: int, n: int) -> int:
        """The projected axis for an ``(m, n)`` matrix."""
        return projected_axis(m, n, self.side)

    def rank_for(self, m: int, n: int) -> int:
        """The sketch size for an ``(m, n)`` matrix (``rank``, capped at the projected side)."""
        d = m if self.axis(m, n) == FAN_IN else n
        return min(self.rank, d)

    def bases(self, mats: Sequence[jax.Array], *, count: jax.Array) -> list[jax.Array]:
        """Fresh sketches for every ``(b, m, n)`` matrix in ``mats``."""
        root = jax.random.fold_in(jax.random.PRNGKey(self.seed), 0)
        out = []
        for i, x in enumerate(mats):
            b, m, n = x.shape
            d = m if self.axis(m, n) == FAN_IN else n
            key = jax.random.fold_in(jax.random.fold_in(root, i), count)
            out.append(random_basis(key, (b, d, self.rank_for(m, n)), x.dtype))
        return out
