"""Moment statistics: heavy-ball/EMA momentum and the Adam family's first and second moments."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._types import canonicalize_dtype


class MomentumState(NamedTuple):
    """State of :func:`momentum`: the momentum buffer ``mu`` (param-shaped)."""

    mu: optax.Updates


def momentum(
    beta: float = 0.95,
    *,
    nesterov: bool = False,
    ema: bool = True,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Momentum in the EMA (``lerp``) or heavy-ball (sum) form, with optional Nesterov look-ahead.

    Algorithm (``G`` the incoming update, ``M`` the buffer, starting at 0, no bias correction)::

        ema=True:   M <- b M + (1 - b) G;   U <- (1 - b) G + b M  if nesterov else M
        ema=False:  M <- b M + G;           U <- G + b M          if nesterov else M

    Args:
      beta: momentum coefficient ``b``. Default 0.95 (Muon).
      nesterov: return the look-ahead ``U`` instead of ``M``. Default False.
      ema: EMA form (Muon, NorMuon, AuON, Conda) or sum form (ROOT, SGD with momentum).
      mu_dtype: dtype of the buffer; default the parameter dtype.

    Returns:
      An ``optax.GradientTransformation`` with :class:`MomentumState`.

    References:
      Polyak, 1964; Nesterov, 1983; the EMA+Nesterov form of KellerJordan/Muon ``muon_update``.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.momentum(0.5, nesterov=True)
      >>> u, s = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> u.tolist(), s.mu.tolist()
      ([0.75, 0.75], [0.5, 0.5])
    """
    mu_dtype = canonicalize_dtype(mu_dtype)

    def init_fn(params):
        return MomentumState(mu=optax.tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates, state, params=None):
        del params
        if ema:
            mu = optax.tree.update_moment(updates, state.mu, beta, 1)
            look = lambda g, m: (1 - beta) * g + beta * m  # noqa: E731
        else:
            mu = jax.tree.map(lambda g, m: beta * m + g, updates, state.mu)
            look = lambda g, m: g + beta * m  # noqa: E731
        out = jax.tree.map(look, updates, mu) if nesterov else mu
        out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
        # keep the buffer's dtype (an array-valued beta, e.g. injected, would promote bf16)
        mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
        return out, MomentumState(mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: step ``count`` (int32), moments ``mu`` and ``nu``."""

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates


BIAS_CORRECTIONS = ("standard", "hf", "none")


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    bias_correction: str = "standard",
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Adam's preconditioner, with the bias-correction/epsilon placements the references use.

    Algorithm (``t`` the 1-based step)::

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        "standard": u = m_hat / (sqrt(v_hat + eps_root) + eps)       (optax, torch.optim.Adam)
        "hf":       u = m / (sqrt(v + eps_root) + eps) * sqrt(1 - b2^t) / (1 - b1^t)
                                                   (HF AdamW; GaLore, Fira, APOLLO, Conda, SOAP)
        "none":     u = m / (sqrt(v + eps_root) + eps)                (1-bit Adam, Sophia-style)

    with ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``.

    Args:
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.
      eps: added to the square root. Default 1e-8.
      eps_root: added inside the square root. Default 0.
      bias_correction: ``"standard"`` (default), ``"hf"`` or ``"none"``, see above. "hf" differs
        from "standard" only in where ``eps`` sits (``eps / sqrt(1 - b2^t)`` in standard terms).
      nesterov: use ``b1 m + (1 - b1) g`` (with the updated ``m``) as the numerator, with the
        same bias correction ``1 - b1^t`` (AdamP's Nesterov form; not optax's ``nadam``).
      mu_dtype: dtype of ``mu``; default the parameter dtype.
      nu_dtype: dtype of ``nu``; default the parameter dtype.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByAdamState` (fields ``count``,
      ``mu``, ``nu``, as optax's, so wrappers such as :func:`momentum_reset` can address them).

    References:
      Kingma & Ba, 2015, "Adam", arXiv 1412.6980; Loshchilov & Hutter, 2019, "Decoupled Weight
      Decay Regularization", arXiv 1711.05101.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_adam()
      >>> u, _ = tx.update(jnp.array([2.0, -3.0]), tx.init(jnp.zeros(2)))
      >>> u.round(4).tolist()
      [1.0, -1.0]
    """
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(
            f"bias_correction must be one of {BIAS_CORRECTIONS}, got {bias_correction!r}"
        )
    mu_dtype = canonicalize_dtype(mu_dtype)
    nu_dtype = canonicalize_dtype(nu_dtype)

    def init_fn(params):
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params, dtype=nu_dtype),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        num = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, updates) if nesterov else mu
        if bias_correction == "standard":
            mu_hat = optax.tree.bias_correction(num, b1, count)
            nu_hat = optax.tree.bias_correction(nu, b2, count)
            out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        else:
            out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), num, nu)
            if bias_correction == "hf":
                step = jnp.sqrt(1 - b2**t) / (1 - b1**t)
                out = jax.tree.map(lambda u: u * step, out)
        out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: a.astype(b.dtype), new, old)  # noqa: E731
        return out, ScaleByAdamState(count=count, mu=keep(mu, state.mu), nu=keep(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByBiasCorrectionState(NamedTuple):
    """State of :func:`scale_by_bias_correction`: the step ``count`` (int32)."""

    count: chex.Array


def scale_by_bias_correction(b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """Multiplies updates by HF AdamW's step-size factor ``sqrt(1 - b2^t) / (1 - b1^t)``.

    For methods whose statistics are computed without bias correction and whose *whole* update
    is then scaled by it (Fira's residual, APOLLO's scaled gradient), with ``t`` the 1-based step.

    Args:
      b1: first-moment decay. Default 0.9.
      b2: second-moment decay. Default 0.999.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByBiasCorrectionState`.

    References:
      HF transformers ``AdamW`` (``correct_bias=True``), as vendored by GaLore, Fira and APOLLO.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_bias_correction(0.5, 0.75)
      >>> float(tx.update(jnp.ones(1), tx.init(None))[0][0])   # sqrt(0.25) / 0.5
      1.0
    """

    def init_fn(params):
        del params
        return ScaleByBiasCorrectionState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda u: (u * step).astype(u.dtype), updates)
        return updates, ScaleByBiasCorrectionState(count=count)

    return optax.GradientTransformation(init_fn, update_fn)
