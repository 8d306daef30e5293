"""Optimizers with a diagonal Hessian statistic: Sophia and AdaHessian.

Both take the Hessian information through optax's extra-arguments mechanism, keyword-only:

- ``hessian_fn=f``: a function ``params -> diagonal estimate`` (e.g. built with
  :func:`optax_ext.kernels.gauss_newton_bartlett` or :func:`optax_ext.kernels.hutchinson` and a
  key); it is called inside a ``lax.cond`` only on the steps that refresh the statistic;
- ``hessian=tree``: a precomputed estimate (ignored on the other steps).

Wiring in a Flax/optax train step::

    def train_step(params, opt_state, batch, key):
        grads = jax.grad(loss)(params, batch)
        est = lambda p: optax_ext.kernels.gauss_newton_bartlett(
            lambda q: model_logits(q, batch), p, key)
        updates, opt_state = tx.update(grads, opt_state, params, hessian_fn=est)
        return optax.apply_updates(params, updates), opt_state
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext.kernels.hessian import spatial_average


def _estimate(who: str, refresh: jax.Array, params: Any, like: Any, extra: dict) -> Any:
    fn, given = extra.get("hessian_fn"), extra.get("hessian")
    if fn is None and given is None:
        raise ValueError(
            f"{who} needs its Hessian information as an extra update argument: "
            "update(grads, state, params, hessian_fn=params -> estimate) or hessian=<tree>"
        )
    zeros = lambda: jax.tree.map(jnp.zeros_like, like)  # noqa: E731
    if fn is not None:
        if params is None:
            raise ValueError(f"{who}: hessian_fn needs params: call update(g, state, params)")
        return jax.lax.cond(
            refresh, lambda: jax.tree.map(lambda e, z: e.astype(z.dtype), fn(params), like), zeros
        )
    return given


class ScaleBySophiaState(NamedTuple):
    """State of :func:`scale_by_sophia`: ``count``, momentum ``mu``, Hessian EMA ``hessian``."""

    count: chex.Array
    mu: optax.Updates
    hessian: optax.Updates


def scale_by_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    *,
    batch_size: float = 5120,
    update_every: int = 10,
    variant: str = "g",
    gamma: float = 0.01,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """Sophia's clipped diagonal-Newton direction.

    Algorithm (``t`` the 1-based step, ``k = update_every``)::

        if t > 1 and (t - 1) mod k == 0:  h <- b2 h + (1 - b2) h_est      (h_est from extras)
        m <- b1 m + (1 - b1) g
        "g" (SophiaG):  u = sign(m) min(|m| / (rho B h + 1e-15), 1)           (no bias corr.)
        "h" (levanter): u = clip((m / (1 - b1^t)) / max(gamma h, eps), -1, 1)

    The estimate passed at step ``t`` is taken at the current weights, i.e. after step
    ``t - 1``: the reference refreshes ``h`` right after steps ``k, 2k, ...`` and uses it from the
    next step, which is the same schedule. ``h`` starts at 0, so the first ``k`` steps are
    sign-momentum steps (ratio 1).

    Args:
      b1, b2: Defaults 0.965, 0.99.
      rho: Default 0.04 (the code's lr is the paper's ``rho * eta``).
      batch_size: ``B`` of the Gauss-Newton-Bartlett estimator (tokens per step; the reference's
        ``bs``). Default 5120.
      update_every: ``k``. Default 10.
      variant: ``"g"`` (official SophiaG) or ``"h"`` (levanter's Hutchinson form; ``max(gamma
        h, eps)`` also guards negative Hutchinson estimates, which flip SophiaG's sign).
      gamma, eps: for ``"h"``. Defaults 0.01, 1e-12.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ScaleBySophiaState`; needs the
      extra argument ``hessian_fn=`` or ``hessian=`` (see the module docstring).

    Raises:
      ValueError: if neither extra argument is given.

    References:
      Liu, Li, Hall, Liang, Ma, 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for
      Language Model Pre-training", arXiv 2305.14342; code: github.com/Liuhong99/Sophia
      (``sophia.py`` at a7e1572); levanter ``optim/sophia.py`` for the Hutchinson variant.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_sophia(update_every=1)
      >>> u, s = tx.update(jnp.array([1.0, -1.0]), tx.init(jnp.zeros(2)), hessian=jnp.ones(2))
      >>> u.tolist()                    # h = 0 on the first step: sign steps
      [1.0, -1.0]
    """
    if variant not in ("g", "h"):
        raise ValueError(f"variant must be 'g' or 'h', got {variant!r}")

    def init_fn(params):
        return ScaleBySophiaState(
            jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), optax.tree.zeros_like(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        t = state.count + 1
        period = jnp.maximum(jnp.asarray(update_every, jnp.int32), 1)
        refresh = (t > 1) & ((t - 1) % period == 0)
        est = _estimate("sophia", refresh, params, state.hessian, extra_args)
        h = jax.tree.map(
            lambda h, e: jnp.where(refresh, b2 * h + (1 - b2) * e.astype(h.dtype), h),
            state.hessian,
            est,
        )
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        if variant == "g":
            out = jax.tree.map(
                lambda m, hh: (
                    jnp.sign(m) * jnp.minimum(jnp.abs(m) / (rho * batch_size * hh + 1e-15), 1.0)
                ),
                mu,
                h,
            )
        else:
            bc = 1 - b1 ** t.astype(jnp.float32)
            out = jax.tree.map(
                lambda m, hh: jnp.clip((m / bc) / jnp.maximum(gamma * hh, eps), -1.0, 1.0), mu, h
            )
        out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
        return out, ScaleBySophiaState(optax.safe_increment(state.count), mu, h)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByAdaHessianState(NamedTuple):
    """State of :func:`scale_by_adahessian`: ``count``, ``mu``, ``nu`` (EMA of ``D^2``)."""

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adahessian(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    *,
    hessian_power: float = 1.0,
    spatial: str | int = "none",
) -> optax.GradientTransformationExtraArgs:
    """AdaHessian: Adam with the squared Hutchinson diagonal as second moment.

    Algorithm (``k`` the 1-based step; ``h_est = v * (H v)`` with a Rademacher ``v``)::

        D = spatial_average(|h_est|)
        m <- b1 m + (1 - b1) g;   u <- b2 u + (1 - b2) D^2
        out = (m / (1 - b1^k)) / ((sqrt(u))^p / (sqrt(1 - b2^k))^p + eps)

    Args:
      b1, b2: Defaults 0.9, 0.999.
      eps: Default 1e-4.
      hessian_power: ``p`` in (0, 1]. Default 1.
      spatial: see :func:`optax_ext.kernels.spatial_average`. Default ``"none"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ScaleByAdaHessianState`; needs
      ``hessian_fn=`` or ``hessian=`` every step (see the module docstring).

    Raises:
      ValueError: if neither extra argument is given.

    References:
      Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, 2021, "ADAHESSIAN: An Adaptive Second
      Order Optimizer for Machine Learning", AAAI 2021, arXiv 2006.00719; code:
      github.com/amirgholami/adahessian (``image_classification/optim_adahessian.py`` at
      85ebc00).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_adahessian()
      >>> u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), hessian=jnp.full(2, 2.0))
      >>> [round(float(x), 3) for x in u]     # m_hat / (|D| + eps)
      [0.5, 0.5]
    """

    def init_fn(params):
        return ScaleByAdaHessianState(
            jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), optax.tree.zeros_like(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        est = _estimate("adahessian", jnp.asarray(True), params, state.nu, extra_args)
        d = jax.tree.map(lambda e: spatial_average(jnp.abs(e), spatial), est)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = jax.tree.map(
            lambda v, dd: b2 * v + (1 - b2) * jnp.square(dd).astype(v.dtype), state.nu, d
        )
        count = optax.safe_increment(state.count)
        k = count.astype(jnp.float32)
        bc1, bc2 = 1 - b1**k, 1 - b2**k

        def step(m, v, g):
            denom = jnp.sqrt(v) ** hessian_power / jnp.sqrt(bc2) ** hessian_power + eps
            return ((m / bc1) / denom).astype(g.dtype)

        out = jax.tree.map(step, mu, nu, updates)
        return out, ScaleByAdaHessianState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
