"""Normalizations of matrix updates in a rotated basis (Conda's column normalization)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import optax

from optax_ext._types import SpecLike, canonicalize_dtype
from optax_ext.kernels.matricize import bucket_apply
from optax_ext.kernels.projections import SVDProjector, project, project_back
from optax_ext.primitives._matrices import MatrixLeaves
from optax_ext.primitives.projection import Projector, lowrank_shapes, refresh_bases


class ColumnNormalizeState(NamedTuple):
    """State of :func:`column_normalize`.

    Attributes:
      count: 0-based step counter (int32).
      mu: first moment in the original coordinates (param-shaped).
      nu: second moment of the projected gradients, in the rotated coordinates
        (``(*batch, r, fan_out)`` or ``(*batch, fan_in, r)``).
      basis: the rotation of the projected side, ``(*batch, d, r)``.
    """

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates
    basis: optax.Updates


def column_normalize(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    projector: Projector = SVDProjector(rank=None, update_every=50),
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Conda's update: Adam's normalization in the singular basis of the first moment.

    Algorithm (``k`` the 0-based step, ``t = k + 1``, ``T = projector.update_every``)::

        M <- b1 M + (1 - b1) G                              # original coordinates
        if k mod T == 0:  P <- singular vectors of M (smaller side, full rank)
        G~ <- proj_P(G);  M~ <- proj_P(M)                   # rotate the smaller side
        V <- b2 V + (1 - b2) G~^2                           # rotated coordinates
        U <- back_P( M~ / (sqrt(V) + eps) ) * sqrt(1 - b2^t) / (1 - b1^t)

    Each column (fan-in side projected) or row (fan-out side projected) of the rotated first
    moment is normalized entrywise by its own second moment. With ``P`` the full singular basis
    of ``M`` this is the "column-normalized" generalisation of Muon's orthogonalization that
    the paper describes (Muon = one common factor per singular direction).

    Args:
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.
      eps: added to ``sqrt(V)`` (before bias correction, HF-AdamW style). Default 1e-8.
      projector: basis rule, fed the updated first moment ``M``. Default
        ``SVDProjector(rank=None, update_every=50, side="std")``: all singular vectors of the
        smaller side of the ``(fan_in, fan_out)`` view (fan-in on ties), refreshed at 0-based
        steps ``k % 50 == 0``. A ``rank`` below the side's size gives a low-rank variant.
      specs: which axes are fan-in/fan-out (default: last two; leading axes batch).
      mu_dtype: dtype of ``M``; default the parameter dtype.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ColumnNormalizeState`.

    Raises:
      ValueError: for a leaf with ``ndim < 2`` (path and shape named).

    References:
      Wang et al., 2025, "Conda: Column-Normalized Adam for Training Large Language Models
      Faster", arXiv 2509.24218; code: github.com/jie040109/Conda (``conda_torch/conda.py``,
      ``projector.py`` at 449af71).

    Notes:
      Follows the code, not the paper: the basis is taken from the *updated* first moment (after
      adding this step's gradient), always on the smaller side (the paper writes the left
      singular vectors), is never truncated, and ``V`` is neither rotated nor reset when the basis
      changes. SVD sign conventions do not matter (``M`` is stored unrotated, ``V`` squared).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.column_normalize()
      >>> g = {"w": jnp.arange(6.0).reshape(2, 3) - 2.0}
      >>> u, s = tx.update(g, tx.init(g))
      >>> s.nu["w"].shape, s.basis["w"].shape
      ((2, 3), (2, 2))
    """
    mu_dtype = canonicalize_dtype(mu_dtype)
    who = "column_normalize"

    def init_fn(params):
        leaves = MatrixLeaves(params, specs, who)
        shapes = lowrank_shapes(leaves, projector)
        dtypes = [x.dtype for x in leaves.leaves(params)]
        return ColumnNormalizeState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=leaves.stored([jnp.zeros(ls, dt) for (_, ls), dt in zip(shapes, dtypes)], params),
            basis=leaves.stored([jnp.zeros(bs, dt) for (bs, _), dt in zip(shapes, dtypes)], params),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves = MatrixLeaves(updates, specs, who)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        m_mats = leaves.views(mu)
        basis = refresh_bases(projector, m_mats, leaves.unstored(state.basis), state.count)
        axes = [projector.axis(m, n) for _, m, n in leaves.matrix_shapes()]
        t = (state.count + 1).astype(jnp.float32)
        step = jnp.sqrt(1 - b2**t) / (1 - b1**t)

        def rotate_normalize(axis, g, m, v, q):
            g_rot = project(g, q, axis=axis)
            m_rot = project(m.astype(g.dtype), q, axis=axis)
            v = b2 * v + (1 - b2) * jnp.square(g_rot).astype(v.dtype)
            n = m_rot / (jnp.sqrt(v) + eps)
            return (project_back(n, q, axis=axis) * step).astype(g.dtype), v

        items = list(zip(leaves.views(updates), m_mats, leaves.unstored(state.nu), basis))
        outs = bucket_apply(rotate_normalize, items, static=axes)
        new_updates = leaves.restore([u for u, _ in outs], like=updates)
        return new_updates, ColumnNormalizeState(
            count=optax.safe_increment(state.count),
            mu=optax.tree.cast(mu, mu_dtype),
            nu=leaves.stored([v for _, v in outs], like=updates),
            basis=leaves.stored(basis, like=updates),
        )

    return optax.GradientTransformation(init_fn, update_fn)
