"""Running a transformation in a low-rank (or rotated) subspace of each matrix (GaLore family)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._boxes import with_boxes
from optax_ext._types import SpecLike, leaf_error
from optax_ext.kernels import sharding
from optax_ext.kernels.matricize import bucket_apply
from optax_ext.kernels.norms import limit_norm_growth, projected_norm_ratio
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
    """State of :func:`project_low_rank` and :func:`scale_by_projected_norm_ratio`.

    Attributes:
      count: 0-based step counter (int32).
      basis: per matrix leaf, the basis ``(*batch, d, r)`` of its projected side.
      inner_state: the inner transformation's state, shaped like the projected updates.
      limiter: per matrix leaf, the norm memory ``(*batch,)`` of Fira's residual limiter
        (zeros and unused without a residual).
    """

    count: chex.Array
    basis: optax.Updates
    inner_state: optax.OptState
    limiter: optax.Updates


@dataclasses.dataclass(frozen=True)
class ScaledResidual:
    """Fira's full-rank residual for :func:`project_low_rank`.

    ``U = a back(N) + limit(phi(N, R) * (G - a back(R)))`` with ``phi`` the per-channel norm
    ratio ``||N_c|| / (||R_c|| + eps)`` (channels: the entries of the non-projected side; norms
    over the rank axis) and ``limit`` the norm-growth limiter with factor ``gamma``.

    Attributes:
      scale: the back-projection scale ``a`` (GaLore's/Fira's ``alpha``), applied to both terms.
      gamma: norm-growth limit per step (1.01 in Fira); None disables the limiter.
      eps: Default 1e-8.
    """

    scale: float = 1.0
    gamma: float | None = 1.01
    eps: float = 1e-8


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

    def fresh():  # laid out like the kept bases (both branches agree: no relayout at the cond)
        new = projector.bases(mats, count=count)
        return sharding.keep_layout([q.astype(d) for q, d in zip(new, dtypes)], list(basis))

    return jax.lax.cond(refresh, fresh, lambda: list(basis))


def _init_projected(params, inner, projector, specs, who) -> ProjectLowRankState:
    leaves = MatrixLeaves(params, specs, who)
    shapes = lowrank_shapes(leaves, projector)
    dtypes = [x.dtype for x in leaves.leaves(params)]
    basis = [jnp.zeros(bs, dt) for (bs, _), dt in zip(shapes, dtypes)]
    low = [jnp.zeros(ls, dt) for (_, ls), dt in zip(shapes, dtypes)]
    limiter = [jnp.zeros(bs[:1], jnp.float32) for bs, _ in shapes]
    return ProjectLowRankState(
        count=jnp.zeros([], jnp.int32),
        basis=leaves.stored(basis, like=params, spread=True),
        inner_state=inner.init(leaves.stored(low, like=params, spread=True)),
        limiter=leaves.stored(limiter, like=params),
    )


def _require_fitting_shapes(leaves, state, params, projector, who) -> None:
    """Raises naming the leaf if an update does not fit its parameter or its projection state
    (e.g. a transposed gradient, which would otherwise broadcast against the state)."""
    leaves.require_shapes_of(params, who)
    stored = [jnp.shape(b) for b in leaves.leaves(state.basis)]
    expected = [
        (*batch, *bs[1:])
        for batch, (bs, _) in zip(leaves.batch_shapes(), lowrank_shapes(leaves, projector))
    ]
    for path, shape, got, want in zip(leaves.paths(), leaves.shapes, stored, expected):
        if tuple(got) != want:
            rule = f"its projection basis would be {want}, the state holds {tuple(got)}"
            raise leaf_error(path, shape, f"{who}: the update does not fit its state: {rule}")


def _project_and_run_inner(updates, state, params, inner, projector, specs, who, extra_args):
    """Shared first half: refresh bases, project, run inner. Returns views and low-rank pairs."""
    leaves = MatrixLeaves(updates, specs, who)
    _require_fitting_shapes(leaves, state, params, projector, who)
    mats = leaves.views(updates)
    basis = refresh_bases(projector, mats, leaves.unstored(state.basis), state.count)
    axes = [projector.axis(m, n) for _, m, n in leaves.matrix_shapes()]
    low = bucket_apply(
        lambda axis, x, q: project(x, q, axis=axis), list(zip(mats, basis)), static=axes
    )
    # Replicated, as bucket_apply returns it, and pinned so per item: under automatic axes the
    # partitioner would otherwise give it the layout of the spread low-rank moments it meets
    # next, and a later pass that restacks it (APOLLO's norm ratio) would exchange it again.
    mesh = sharding.mesh_of(mats[0]) if mats else None
    low = [sharding.replicated_part(x, mesh) for x in low]
    low_updates, inner_state = inner.update(
        leaves.stored(low, like=updates, spread=True), state.inner_state, None, **extra_args
    )
    return leaves, mats, basis, axes, low, leaves.unstored(low_updates), inner_state


def project_low_rank(
    inner: optax.GradientTransformation,
    projector: Projector = SVDProjector(rank=128, update_every=200),
    *,
    residual: ScaledResidual | None = None,
    specs: SpecLike = None,
) -> optax.GradientTransformationExtraArgs:
    """Projects each matrix update onto a basis of one side, runs ``inner`` there, projects back.

    Algorithm (``k`` the 0-based step, ``T = projector.update_every``)::

        if k mod T == 0:  Q <- projector.bases(G)        # e.g. top-r singular vectors of G
        R <- Q^T G  (fan-in side)   or   G Q  (fan-out side)
        N, inner_state <- inner.update(R, inner_state)   # e.g. Adam in the r-dim space
        U <- back(N) = Q N (fan-in side)   or   N Q^T (fan-out side)
        with residual (Fira):  U <- a back(N) + limit(phi(N, R) (G - a back(R)))

    The inner state is kept across refreshes (not reset or rotated), as in GaLore, Fira and
    APOLLO. Projections run once per bucket of same-shaped matrices; the basis refresh runs
    inside one ``lax.cond``, so SVDs are only computed on refresh steps.

    Args:
      inner: transformation run on the projected updates (its ``params`` argument is None: it
        lives in the projected space); extra ``update`` arguments are forwarded to it.
      projector: :class:`~optax_ext.kernels.SVDProjector` (default, rank 128, T = 200),
        :class:`~optax_ext.kernels.RandomProjector`, or any object implementing
        :class:`Projector` (e.g. recorded bases). Which side it projects (fan-in or fan-out of
        the ``(fan_in, fan_out)`` view) is its ``side`` rule; ``"std"`` projects the smaller one.
      residual: None (GaLore) or a :class:`ScaledResidual` (Fira's norm-scaled residual).
      specs: which axes are fan-in/fan-out (default: last two; leading axes batch).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ProjectLowRankState`.

    Raises:
      ValueError: for a leaf with ``ndim < 2`` (path and shape named).

    References:
      Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection", arXiv 2403.03507; code: github.com/jiaweizzhao/GaLore (2cc66f8).
      Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
      Constraint?", arXiv 2410.01623; code: github.com/xichen-fy/Fira (5c28b13).

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
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return _init_projected(params, inner, projector, specs, who)

    def update_fn(updates, state, params=None, **extra_args):
        leaves, mats, basis, axes, low, low_out, inner_state = _project_and_run_inner(
            updates, state, params, inner, projector, specs, who, extra_args
        )
        limiter = leaves.unstored(state.limiter)
        if residual is None:
            full = bucket_apply(
                lambda axis, y, q: project_back(y, q, axis=axis),
                list(zip(low_out, basis)),
                static=axes,
            )
        else:
            a = residual.scale

            def fira(axis, g, r, n, q, h):
                back = lambda y: project_back(y, q, axis=axis)  # noqa: E731
                phi = projected_norm_ratio(n, r, axis=axis, per_channel=True, eps=residual.eps)
                s = phi * (g.astype(jnp.float32) - a * back(r).astype(jnp.float32))
                if residual.gamma is not None:
                    s, h = limit_norm_growth(s, h, state.count == 0, gamma=residual.gamma)
                return a * back(n).astype(jnp.float32) + s, h

            outs = bucket_apply(fira, list(zip(mats, low, low_out, basis, limiter)), static=axes)
            full, limiter = [o for o, _ in outs], [h for _, h in outs]
        full = [f.astype(x.dtype) for f, x in zip(full, mats)]
        new_state = ProjectLowRankState(
            count=optax.safe_increment(state.count),
            basis=leaves.stored(basis, like=updates, spread=True),
            inner_state=inner_state,
            limiter=leaves.stored(limiter, like=updates),
        )
        return leaves.restore(full, like=updates), sharding.keep_layout(new_state, state)

    return with_boxes(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def scale_by_projected_norm_ratio(
    inner: optax.GradientTransformation,
    projector: Projector,
    *,
    scale_type: str = "channel",
    eps: float = 1e-8,
    specs: SpecLike = None,
) -> optax.GradientTransformationExtraArgs:
    """Scales the raw gradient by the norm ratio that ``inner`` achieves in a low-rank sketch.

    APOLLO's update (an SGD step with per-channel learning rates estimated in a sketch)::

        if k mod T == 0:  Q <- projector.bases(G)        # random N(0, 1/r) sketch in APOLLO
        R <- proj_Q(G);   N, inner_state <- inner.update(R, inner_state)   # low-rank Adam
        "channel":  U <- G * ||N_c|| / (||R_c|| + eps)    per channel c (non-projected side)
        "tensor":   U <- G * ||N||_F / (||R||_F + eps)     (APOLLO-Mini)

    Args:
      inner: the low-rank statistic (APOLLO: Adam moments without bias correction).
      projector: the basis rule (see :func:`project_low_rank`).
      scale_type: ``"channel"`` or ``"tensor"``.
      eps: Default 1e-8.
      specs: which axes are fan-in/fan-out.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ProjectLowRankState`.

    Raises:
      ValueError: for a leaf with ``ndim < 2`` or an unknown ``scale_type``.

    References:
      Zhu et al., 2025, "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025,
      arXiv 2412.05270; code: github.com/zhuhanqing/APOLLO (``apollo_torch/apollo.py`` at
      76b3472).

    Example:
      >>> import jax.numpy as jnp, optax, optax_ext
      >>> from optax_ext.kernels import RandomProjector
      >>> tx = optax_ext.scale_by_projected_norm_ratio(
      ...     optax.scale(2.0), RandomProjector(rank=2, update_every=5), scale_type="tensor")
      >>> g = {"w": jnp.ones((4, 6))}
      >>> bool(jnp.allclose(tx.update(g, tx.init(g))[0]["w"], 2.0, atol=1e-5))
      True
    """
    if scale_type not in ("channel", "tensor"):
        raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")
    who = "scale_by_projected_norm_ratio"
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return _init_projected(params, inner, projector, specs, who)

    def update_fn(updates, state, params=None, **extra_args):
        leaves, mats, basis, axes, low, low_out, inner_state = _project_and_run_inner(
            updates, state, params, inner, projector, specs, who, extra_args
        )

        def scaled(axis, g, r, n):
            phi = projected_norm_ratio(
                n, r, axis=axis, per_channel=scale_type == "channel", eps=eps
            )
            return (g.astype(jnp.float32) * phi).astype(g.dtype)

        full = bucket_apply(scaled, list(zip(mats, low, low_out)), static=axes)
        new_state = ProjectLowRankState(
            count=optax.safe_increment(state.count),
            basis=leaves.stored(basis, like=updates, spread=True),
            inner_state=inner_state,
            limiter=state.limiter,
        )
        return leaves.restore(full, like=updates), sharding.keep_layout(new_state, state)

    return with_boxes(optax.GradientTransformationExtraArgs(init_fn, update_fn))
