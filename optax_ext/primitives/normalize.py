"""Normalizations of matrix updates in a rotated basis (Conda's column normalization)."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._boxes import with_boxes
from optax_ext._types import SpecLike, canonicalize_dtype, is_masked, leaves_with_path, spec_for
from optax_ext.kernels import sharding
from optax_ext.kernels.matricize import bucket_apply, matricize, unmatricize
from optax_ext.kernels.norms import limit_norm_growth
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
        nu = [jnp.zeros(ls, dt) for (_, ls), dt in zip(shapes, dtypes)]
        basis = [jnp.zeros(bs, dt) for (bs, _), dt in zip(shapes, dtypes)]
        return ColumnNormalizeState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=leaves.stored(nu, params, spread=True),
            basis=leaves.stored(basis, params, spread=True),
        )

    def update_fn(updates, state, params=None):
        leaves = MatrixLeaves(updates, specs, who)
        leaves.require_shapes_of(params, who)
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
        new_state = ColumnNormalizeState(
            count=optax.safe_increment(state.count),
            mu=optax.tree.cast(mu, mu_dtype),
            nu=leaves.stored([v for _, v in outs], like=updates, spread=True),
            basis=leaves.stored(basis, like=updates, spread=True),
        )
        return new_updates, sharding.keep_layout(new_state, state)

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))


class ScaleByNeuronNormState(NamedTuple):
    """State of :func:`scale_by_neuron_norm`: the EMA ``nu`` of per-neuron mean squares.

    For the default ``axis="fan_out"`` each matrix leaf of shape ``(*batch, fan_in, fan_out)``
    keeps ``(*batch, 1, fan_out)``: one value per output neuron (a row of a PyTorch weight).
    """

    nu: optax.Updates


NEURON_AXES = ("fan_out", "fan_in", "longer")


def scale_by_neuron_norm(
    b2: float = 0.95,
    eps: float = 1e-10,
    *,
    axis: str = "fan_out",
    eps_inside: bool = False,
    rescale: str = "preserve_norm",
    target_rms: float = 0.2,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """Normalizes each neuron of an (orthogonalized) matrix update by an EMA of its mean square.

    NorMuon's second stage, computed in float32 whatever the input dtype::

        nu_O = ||O||_F
        r    = mean(O^2) over the fan-in axis          # one value per output neuron
        S   <- b2 S + (1 - b2) r                       # no bias correction
        O   <- O / (sqrt(S) + eps)                     # eps_inside: O * rsqrt(max(S, eps))
        O   <- O * nu_O / (||O||_F + eps)               # rescale="preserve_norm" (code)
        O   <- O * target_rms * sqrt(m n) / ||O||_F     # rescale="match_rms" (paper)

    Args:
      b2: EMA decay of the statistic. Default 0.95 (NorMuon code; modded-nanogpt uses 0.9).
      eps: Default 1e-10.
      axis: ``"fan_out"`` (default): one statistic per output neuron, i.e. the mean is over the
        fan-in axis of a flax ``(in, out)`` kernel (= per row of a PyTorch ``(out, in)`` weight,
        the official NorMuon code); ``"fan_in"``: per input unit; ``"longer"``: one statistic per
        entry of the longer side (modded-nanogpt's ``red_dim``), fan-out on ties.
      eps_inside: ``rsqrt(max(S, eps))`` instead of ``1 / (sqrt(S) + eps)`` (modded-nanogpt).
      rescale: ``"preserve_norm"`` (code: restore the pre-normalisation Frobenius norm, so any
        global scale on S cancels) or ``"match_rms"`` (paper: update RMS = ``target_rms``) or
        ``"none"``.
      target_rms: RMS of the update for ``rescale="match_rms"``. Default 0.2.
      specs: which axes are fan-in/fan-out.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByNeuronNormState`.

    Raises:
      ValueError: for a leaf with ``ndim < 2`` or an unknown option.

    References:
      Li et al., 2025, "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491;
      code: github.com/zichongli5/NorMuon (``normuon_update`` at d45c9a4).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_neuron_norm()
      >>> g = {"w": jnp.array([[1.0, 0.1], [1.0, 0.1]])}
      >>> u, s = tx.update(g, tx.init(g))
      >>> s.nu["w"].shape, bool(abs(u["w"][0, 0] / u["w"][0, 1] - 1.0) < 1e-3)
      ((1, 2), True)
    """
    if axis not in NEURON_AXES:
        raise ValueError(f"axis must be one of {NEURON_AXES}, got {axis!r}")
    if rescale not in ("preserve_norm", "match_rms", "none"):
        raise ValueError(f"rescale must be 'preserve_norm', 'match_rms' or 'none', got {rescale!r}")
    who = "scale_by_neuron_norm"

    def reduce_axis(m: int, n: int) -> int:
        if axis == "fan_out":
            return 1  # mean over fan-in: one value per fan-out unit
        if axis == "fan_in":
            return 2
        return 1 if n >= m else 2  # statistic per entry of the longer side

    def init_fn(params):
        leaves = MatrixLeaves(params, specs, who)
        stats = []
        for b, m, n in leaves.matrix_shapes():
            stats.append(jnp.zeros((b, 1, n) if reduce_axis(m, n) == 1 else (b, m, 1), jnp.float32))
        return ScaleByNeuronNormState(nu=leaves.stored(stats, like=params))

    def update_fn(updates, state, params=None):
        del params
        leaves = MatrixLeaves(updates, specs, who)
        outs, stats = [], []
        for o, s, (_, m, n) in zip(
            leaves.views(updates), leaves.unstored(state.nu), leaves.matrix_shapes()
        ):
            x = o.astype(jnp.float32)
            norm = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
            s = b2 * s + (1 - b2) * jnp.mean(x * x, axis=reduce_axis(m, n), keepdims=True)
            x = x * jax.lax.rsqrt(jnp.maximum(s, eps)) if eps_inside else x / (jnp.sqrt(s) + eps)
            new = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
            if rescale == "preserve_norm":
                x = x * (norm / (new + eps))
            elif rescale == "match_rms":
                x = x * (target_rms * (m * n) ** 0.5 / (new + eps))
            outs.append(x.astype(o.dtype))
            stats.append(s)
        return leaves.restore(outs, like=updates), ScaleByNeuronNormState(
            nu=leaves.stored(stats, like=updates)
        )

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))


def scale_by_cosh_rms(
    gamma: float = 1.5,
    *,
    normalize: bool = False,
    eps_norm: float = 1e-7,
    eps: float = 1e-8,
    dtype: str | None = None,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """Divides each matrix (or vector) update by the RMS of the elementwise cosh of its direction.

    AuON's "brake" (linear time)::

        Z = gamma U / (||U||_F + eps_norm);   r = sqrt(mean(cosh(Z)^2))
        U <- U / (r + eps)                    # normalize=False (AuON at HEAD)
        U <- Z / (r + eps)                    # normalize=True, gamma=1 (AuON v1 / arXiv v1)

    ``r >= 1`` grows only when the update is concentrated in few entries. The statistic is per
    matrix of the ``(fan_in, fan_out)`` view for ``ndim >= 2`` leaves and per tensor for 0-D/1-D.
    A zero update stays zero.

    Args:
      gamma: scale inside cosh. Default 1.5 (AuON HEAD; v1 is 1).
      normalize: return the unit-Frobenius-norm direction (v1) instead of the raw update.
      eps_norm: added to the Frobenius norm. Default 1e-7.
      eps: added to ``r``. Default 1e-8.
      dtype: compute dtype (v1's reference casts to ``"bfloat16"``); None keeps the input's.
      specs: which axes are fan-in/fan-out for N-D leaves.

    Returns:
      A stateless ``optax.GradientTransformation``.

    References:
      Maity, 2025, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates",
      arXiv 2509.24320; code: github.com/ryyzn9/AuON (``auon/optimizer.py`` at bba2e82,
      ``Auon_Adam_train.py`` at c87b862 for v1).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_cosh_rms(gamma=1.0, normalize=True)
      >>> u, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(None))
      >>> round(float(jnp.sum(u["w"] ** 2)) ** 0.5, 4)   # ||Z|| / cosh(0.5)
      0.8868
    """
    compute = canonicalize_dtype(dtype)

    def brake(u):
        x = u.astype(compute) if compute is not None else u
        axes = (-2, -1) if x.ndim >= 2 else tuple(range(x.ndim))
        norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
        z = (x / (norm + eps_norm).astype(x.dtype)) if normalize else None
        zz = gamma * x.astype(jnp.float32) / (norm + eps_norm)
        r = jnp.sqrt(jnp.mean(jnp.square(jnp.cosh(zz)), axis=axes, keepdims=True))
        out = (z if normalize else x) / (r + eps).astype(x.dtype)
        return out.astype(u.dtype)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        pairs, treedef = leaves_with_path(updates)
        flat = []
        for path, u in pairs:
            if is_masked(u) or jnp.ndim(u) < 2:
                flat.append(u if is_masked(u) else brake(u))
                continue
            spec = spec_for(specs, path, u)
            flat.append(unmatricize(brake(matricize(u, spec=spec)), shape=u.shape, spec=spec))
        return treedef.unflatten(flat), state

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))


class NormGrowthLimiterState(NamedTuple):
    """State of :func:`norm_growth_limiter`: step ``count`` and the last norm per matrix."""

    count: chex.Array
    norm: optax.Updates


def norm_growth_limiter(
    gamma: float = 1.01, *, eps: float = 1e-8, specs: SpecLike = None
) -> optax.GradientTransformation:
    """Limits the growth of each matrix update's Frobenius norm to ``gamma`` per step.

    Algorithm (per matrix ``S`` of the view, ``h`` its previous norm)::

        first step:  h <- ||S||
        otherwise:   lam = max(||S|| / (h + eps), gamma) / gamma;  S <- S / lam;  h <- ||S||

    Args:
      gamma: allowed growth factor per step. Default 1.01 (Fira, APOLLO; hard-coded there).
      eps: Default 1e-8.
      specs: which axes are fan-in/fan-out.

    Returns:
      An ``optax.GradientTransformation`` with :class:`NormGrowthLimiterState`.

    Raises:
      ValueError: for a leaf with ``ndim < 2``.

    References:
      Chen et al., 2024, "Fira", arXiv 2410.01623 (norm-growth limiter); used by APOLLO
      (Zhu et al., 2025, arXiv 2412.05270).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.norm_growth_limiter(1.5)
      >>> s = tx.init({"w": jnp.ones((2, 2))})
      >>> _, s = tx.update({"w": jnp.ones((2, 2))}, s)           # norm 2 recorded
      >>> u, s = tx.update({"w": 10 * jnp.ones((2, 2))}, s)      # 20 -> 3 (= 1.5 x 2)
      >>> round(float(jnp.linalg.norm(u["w"])), 4)
      3.0
    """
    who = "norm_growth_limiter"

    def init_fn(params):
        leaves = MatrixLeaves(params, specs, who)
        norms = [jnp.zeros((b,), jnp.float32) for b, _, _ in leaves.matrix_shapes()]
        return NormGrowthLimiterState(jnp.zeros([], jnp.int32), leaves.stored(norms, params))

    def update_fn(updates, state, params=None):
        del params
        leaves = MatrixLeaves(updates, specs, who)
        first = state.count == 0
        outs, norms = [], []
        for s, h in zip(leaves.views(updates), leaves.unstored(state.norm)):
            s2, h2 = limit_norm_growth(s, h, first, gamma=gamma, eps=eps)
            outs.append(s2.astype(s.dtype))
            norms.append(h2)
        return leaves.restore(outs, like=updates), NormGrowthLimiterState(
            optax.safe_increment(state.count), leaves.stored(norms, like=updates)
        )

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))
