"""Weight constraints applied after the step: the new weights are projected, ``W <- P(W + u)``.

A constraint transformation sits **last** in a chain (after the learning rate and decay) and
needs ``params``: it emits ``P(W + u) - W``, so ``optax.apply_updates`` lands exactly on the
projected weights. Masked-out leaves pass through; lr = 0 is not a no-op in general (the
projection still acts on weights outside the constraint set).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._types import SpecLike, canonicalize_dtype, is_masked
from optax_ext.kernels import spectral
from optax_ext.kernels.matricize import bucket_apply
from optax_ext.primitives._matrices import MatrixLeaves

SPECTRAL_METHODS = (
    "none",
    "orthogonal",
    "hard_cap",
    "soft_cap",
    "pure_svd",
    "spec_hammer",
    "spec_wd",
    "spec_normalize",
)
"""Projection maps by their names in the reference's configs (``configs.PROJECT_FUNCTIONS``)."""

W_MAX_SENSITIVE = ("orthogonal", "hard_cap", "spec_normalize")
"""Maps that bound at 1 and get ``w_max`` through the scale ``s = w_max sqrt(fan_out/fan_in)``
(the reference's ``sensitive_to_wmax``); the others take ``w_max`` as an argument."""


class ConstrainSpectralNormState(NamedTuple):
    """State of :func:`constrain_spectral_norm`: the step ``count`` (schedules, PRNG keys)."""

    count: chex.Array


def _value(x: Any, count: jax.Array) -> Any:
    return x(count) if callable(x) else x


def constrain_spectral_norm(
    method: str = "soft_cap",
    *,
    w_max: float = 1.0,
    learning_rate: optax.ScalarOrSchedule = 0.0,
    weight_decay: float = 0.0,
    target_norm: float = 1.0,
    spectral_wd: float = 0.0,
    seed: int = 0,
    power_steps: int = 16,
    specs: SpecLike = None,
    dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Projects each matrix so that its RMS->RMS norm ``sqrt(fan_in/fan_out) sigma_max <= w_max``.

    Algorithm (per matrix, ``W + u`` the stepped weight seen as ``(fan_out, fan_in)`` like the
    reference's ``Linear.project``)::

        s = sqrt(fan_out / fan_in)  (* w_max for orthogonal, hard_cap, spec_normalize)
        eta = lr * target_norm;  alpha = soft_cap_coupling(w_max, wd * eta, eta / s)
        W_new = s * P((W + u) / s)        (computed as (W + u) + s (P(x) - x), x = (W + u) / s)

    with ``P`` one of (:mod:`optax_ext.kernels.spectral`): ``"orthogonal"`` (all singular values
    -> 1, ``lipschitz_orthogonalize``), ``"hard_cap"`` (``~min(1, s)``),
    ``"soft_cap"`` (``alpha`` as above: ``k = w_max (1 - wd eta) + eta / s`` maps to ``w_max``),
    ``"pure_svd"`` (exact clip at ``w_max``), ``"spec_hammer"`` (top singular value set to
    ``w_max``), ``"spec_wd"`` (top singular value shrunk by ``1 - spectral_wd``),
    ``"spec_normalize"`` (``/ max(1, sigma)``) or ``"none"``.

    Args:
      method: a key of :data:`SPECTRAL_METHODS` (static). Default ``"soft_cap"`` (the paper's
        co-designed spectral soft cap).
      w_max: the bound on the RMS->RMS norm. Default 1.
      learning_rate: ``lr`` of the step being constrained (scalar or schedule); with
        ``target_norm`` it sets the soft cap's strength. Default 0.
      weight_decay: the step's decoupled decay ``wd`` (``W <- W (1 - wd eta)``); soft cap only.
      target_norm: the layer's update norm (the reference's per-module share). Default 1.
      spectral_wd: the factor of ``"spec_wd"``. Default 0.
      seed: power-iteration starts use ``fold_in(PRNGKey(seed), count)`` unless ``update`` is
        given ``key=`` (then that key, as the reference's trainer passes its own).
      power_steps: power-iteration steps (static). Default 16.
      specs: which axes are fan-in/fan-out of each leaf (default: the last two of a flax
        ``(in, out)`` kernel; leading axes are a stack of matrices).
      dtype: compute dtype of the projection (the reference's ``project_dtype``). Default
        float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ConstrainSpectralNormState`;
      ``update(updates, state, params, *, key=None)`` needs ``params``.

    Raises:
      ValueError: for an unknown method, a leaf with ``ndim < 2`` (named), or missing params.

    References:
      Newhouse et al., 2025, "Training Transformers with Enforced Lipschitz Constants",
      https://arxiv.org/abs/2507.13338 ; code:
      https://github.com/Arongil/lipschitz-transformers/blob/158692e24c0fbb3cbeea3f7454f41fd4bfcec209/modula/atom.py
      (``Linear.project``, ``batch_project``, the ``_`` maps).

    Notes:
      - Stacked weights ``(L, in, out)`` are projected matrix by matrix. The reference's
        ``batch_project`` divides its result by the number of stacked matrices (1 for its 2-D
        weights); we do not (it would shrink every layer of a stack ``L``-fold per step).
      - Same-shaped matrices share one power-iteration start per step (bucketed); the
        reference passes one key to every layer, so its layers of one shape share it too.
      - Power iteration of a zero matrix gives ``sigma = 0`` and zero vectors (no NaN); the
        hammer then leaves the matrix at zero.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.constrain_spectral_norm("pure_svd", w_max=1.0)
      >>> w = {"kernel": jnp.diag(jnp.array([3.0, 0.5]))}
      >>> u, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(w), w)
      >>> (w["kernel"] + u["kernel"]).round(4).tolist()
      [[1.0, 0.0], [0.0, 0.5]]
    """
    if method not in SPECTRAL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {SPECTRAL_METHODS}")
    sensitive = method in W_MAX_SENSITIVE
    compute = canonicalize_dtype(dtype)
    who = "constrain_spectral_norm"

    def project(view, key, eta):
        # view: (b, fan_in, fan_out) -> the reference's (fan_out, fan_in) weights
        ref = jnp.swapaxes(view, -1, -2)
        fan_out, fan_in = ref.shape[-2:]
        scale = math.sqrt(fan_out / fan_in)
        s = scale * w_max if sensitive else scale
        x = ref / s
        if method == "orthogonal":
            p = spectral.lipschitz_orthogonalize(x)
        elif method == "hard_cap":
            p = spectral.spectral_hard_cap(x)
        elif method == "soft_cap":
            alpha = spectral.soft_cap_coupling(w_max, weight_decay * eta, eta / scale)
            p = spectral.spectral_soft_cap(x, alpha.astype(x.dtype))
        elif method == "pure_svd":
            p = spectral.svd_cap(x, w_max=w_max)
        elif method == "spec_hammer":
            p = spectral.spectral_hammer(x, key, w_max=w_max, steps=power_steps)
        elif method == "spec_wd":
            p = spectral.spectral_weight_decay(x, key, spectral_wd=spectral_wd, steps=power_steps)
        elif method == "spec_normalize":
            p = spectral.spectral_normalize(x, key, steps=power_steps)
        else:
            p = x
        # s P(x) written as W + s (P(x) - x): identity maps (soft cap at alpha = 0) are exact
        return view + jnp.swapaxes(s * (p - x), -1, -2)

    def init_fn(params):
        if params is not None:
            MatrixLeaves(params, specs, who)
        return ConstrainSpectralNormState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, key=None, **extra):
        del extra
        if params is None:
            raise ValueError(f"{who} needs params: update(updates, state, params)")
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state.count) if key is None else key
        eta = _value(learning_rate, state.count) * target_norm
        leaves = MatrixLeaves(params, specs, who)
        stepped = jax.tree.map(
            lambda p, u: None if is_masked(p) else p.astype(compute) + u.astype(compute),
            params,
            updates,
            is_leaf=is_masked,
        )
        outs = bucket_apply(lambda v: project(v, key, eta), [(v,) for v in leaves.views(stepped)])
        projected = leaves.restore(outs, like=stepped)
        out = jax.tree.map(
            lambda new, p, u: u if is_masked(p) else (new - p.astype(compute)).astype(u.dtype),
            projected,
            params,
            updates,
            is_leaf=is_masked,
        )
        return out, ConstrainSpectralNormState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def constrain_token_rms(*, axis: int = -1) -> optax.GradientTransformation:
    """Caps the RMS of each token vector of an embedding table at 1 after the step.

    ``W_new = (W + u) / max(1, rms(W + u))`` with the RMS over ``axis`` (the embedding
    dimension): ``axis=-1`` for a flax ``Embed`` table ``(num_embed, d_embed)``, ``axis=-2`` for
    an output head kernel ``(d_embed, num_embed)``. The reference's ``Embed.project`` /
    ``Unembed.project`` (on its ``(d_embed, num_embed)`` / ``(num_embed, d_embed)`` layouts).

    Returns:
      A stateless ``optax.GradientTransformation`` that needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.constrain_token_rms()
      >>> w = jnp.array([[3.0, 4.0], [0.1, 0.0]])
      >>> new = w + tx.update(jnp.zeros((2, 2)), tx.init(w), w)[0]
      >>> [round(float(r), 4) for r in jnp.sqrt(jnp.mean(new**2, axis=-1))]  # row RMS 3.54, 0.07
      [1.0, 0.0707]
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("constrain_token_rms needs params: update(updates, state, params)")

        def cap(u, p):
            new = p.astype(jnp.float32) + u.astype(jnp.float32)
            return (spectral.rms_cap(new, axis=axis) - p.astype(jnp.float32)).astype(u.dtype)

        return jax.tree.map(cap, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def normalize_token_rms(
    max_inflation: float = 16.0, *, axis: int = -1
) -> optax.GradientTransformation:
    """Normalises each token vector of an embedding update to RMS 1 (amplifying at most
    ``max_inflation``-fold): ``u <- u / max(1 / max_inflation, rms(u))`` over ``axis``.

    The reference's ``Embed.dualize`` (its ``max_embed_inflation_factor``), the embedding
    counterpart of orthogonalizing a hidden matrix's update.

    Args:
      max_inflation: the largest amplification of a small vector. Default 16 (the Shakespeare
        transformer config of the reference; its ``GPT`` default is 1).
      axis: the embedding axis (-1 for flax ``Embed`` tables, -2 for head kernels).

    Returns:
      A stateless ``optax.GradientTransformation``.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        out = jax.tree.map(
            lambda u: spectral.rms_cap(u, axis=axis, max_inflation=max_inflation), updates
        )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)
