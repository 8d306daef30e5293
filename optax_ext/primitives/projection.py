"""Running a transformation in a low-rank (or rotated) subspace of each matrix (GaLore family)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.matricize import bucket_apply
from optax_ext.kernels.projections import FAN_IN, SVDProjector, project, project_back
from optax_ext.primitives._matrices import MatrixLeaves


class Projector(Protocol):
    """What :func:`project_low_rank` needs of a projector (``SVDProjector``, ``RandomProjector``).

    A user-supplied projector (e.g. one replaying recorded bases in a test) implements these
    three methods and an ``update_every`` attribute.
    """

    update_every: int

    def axis(self, m: int, n: int) -> int:
        """FAN_IN (1) or FAN_OUT (2): the side of an ``(m, n)`` view that is projected."""

    def rank_for(self, m: int, n: int) -> int:
        """Basis size for an ``(m, n)`` view."""

    def bases(self, mats: Sequence[jax.Array], *, count: jax.Array) -> list[jax.Array]:
        """``(b, d, r)`` bases for every ``(b, m, n)`` matrix, at 0-based step ``count``."""


class ProjectLowRankState(NamedTuple):
    """State of :func:`project_low_rank`.

    Attributes:
      count: 0-based step counter (int32).
      basis: per matrix leaf, the basis ``(*batch, d, r)`` of its projected side.
      inner_state: the inner transformation's state, shaped like the projected updates.
    """

    count: chex.Array
    basis: optax.Updates
    inner_state: optax.OptState


def lowrank_shapes(leaves: MatrixLeaves, projector: Projector) -> list[tuple[int, ...]]:
    """Shapes ``(b, d, r)`` of the bases and ``(b, r, n)``/``(b, m, r)`` of the projections."""
    out = []
    for b, m, n in leaves.matrix_shapes():
        r = projector.rank_for(m, n)
        if projector.axis(m, n) == FAN_IN:
            out.append(((b, m, r), (b, r, n)))
        else:
            out.append(((b, n, r), (b, m, r)))
    return out


def refresh_bases(
    projector: Projector, mats: Sequence[jax.Array], basis: Sequence[jax.Array], count: jax.Array
) -> list[jax.Array]:
    """New bases at steps ``count % update_every == 0``, else ``basis`` (one ``lax.cond``)."""
    period = jnp.maximum(jnp.asarray(projector.update_every, jnp.int32), 1)
    refresh = count % period == 0
    dtypes = [b.dtype for b in basis]

    def fresh():
        return [q.astype(d) for q, d in zip(projector.bases(mats, count=count), dtypes)]

    return jax.lax.cond(refresh, fresh, lambda: list(basis))


def project_low_rank(
    inner: optax.GradientTransformation,
    projector: Projector = SVDProjector(rank=128, update_every=200),
    *,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """Projects each matrix update onto a basis of one side, runs ``inner`` there, projects back.

    Algorithm (``k`` the 0-based step, ``T = projector.update_every``)::

        if k mod T == 0:  Q <- projector.bases(G)        # e.g. top-r singular vectors of G
        R <- Q^T G  (fan-in side)   or   G Q  (fan-out side)
        N, inner_state <- inner.update(R, inner_state)   # e.g. Adam in the r-dim space
        U <- Q N    (fan-in side)   or   N Q^T (fan-out side)

    The inner state is kept across refreshes (not reset or rotated), as in GaLore, Fira and
    APOLLO. Projections run once per bucket of same-shaped matrices; the basis refresh runs
    inside one ``lax.cond``, so SVDs are only computed on refresh steps.

    Args:
      inner: transformation run on the projected updates (its ``params`` argument is None: it
        lives in the projected space).
      projector: :class:`~optax_ext.kernels.SVDProjector` (default, rank 128, T = 200),
        :class:`~optax_ext.kernels.RandomProjector`, or any object implementing
        :class:`Projector` (e.g. recorded bases). Which side it projects (fan-in or fan-out of
        the ``(fan_in, fan_out)`` view) is its ``side`` rule; ``"std"`` projects the smaller one.
      specs: which axes are fan-in/fan-out (default: last two; leading axes batch).

    Returns:
      An ``optax.GradientTransformation`` with :class:`ProjectLowRankState`.

    Raises:
      ValueError: for a leaf with ``ndim < 2`` (path and shape named).

    References:
      Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection", arXiv 2403.03507; code: github.com/jiaweizzhao/GaLore (2cc66f8).

    Example:
      >>> import jax.numpy as jnp, optax, optax_ext
      >>> from optax_ext.kernels import SVDProjector
      >>> tx = optax_ext.project_low_rank(optax.identity(), SVDProjector(rank=1, update_every=10))
      >>> g = {"w": jnp.outer(jnp.arange(1.0, 4.0), jnp.ones(5))}   # rank 1: kept exactly
      >>> u, _ = tx.update(g, tx.init(g))
      >>> bool(jnp.allclose(u["w"], g["w"], atol=1e-5))
      True
    """
    who = "project_low_rank"

    def init_fn(params):
        leaves = MatrixLeaves(params, specs, who)
        shapes = lowrank_shapes(leaves, projector)
        dtypes = [x.dtype for x in leaves.leaves(params)]
        basis = [jnp.zeros(bs, dt) for (bs, _), dt in zip(shapes, dtypes)]
        low = [jnp.zeros(ls, dt) for (_, ls), dt in zip(shapes, dtypes)]
        return ProjectLowRankState(
            count=jnp.zeros([], jnp.int32),
            basis=leaves.stored(basis, like=params),
            inner_state=inner.init(leaves.stored(low, like=params)),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves = MatrixLeaves(updates, specs, who)
        mats = leaves.views(updates)
        basis = refresh_bases(projector, mats, leaves.unstored(state.basis), state.count)
        axes = [projector.axis(m, n) for _, m, n in leaves.matrix_shapes()]

        def down(axis, x, q):
            return project(x, q, axis=axis)

        low = bucket_apply(down, list(zip(mats, basis)), static=axes)
        low_updates, inner_state = inner.update(
            leaves.stored(low, like=updates), state.inner_state, None
        )
        low_out = leaves.unstored(low_updates)

        def up(axis, y, q):
            return project_back(y, q, axis=axis)

        full = bucket_apply(up, list(zip(low_out, basis)), static=axes)
        full = [f.astype(x.dtype) for f, x in zip(full, mats)]
        return leaves.restore(full, like=updates), ProjectLowRankState(
            count=optax.safe_increment(state.count),
            basis=leaves.stored(basis, like=updates),
            inner_state=inner_state,
        )

    return optax.GradientTransformation(init_fn, update_fn)
