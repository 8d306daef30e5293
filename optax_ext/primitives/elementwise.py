"""Elementwise preconditioners of the Adam family: Lion(-K), AdaBelief, EXAdam, SGD-SaI."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext._boxes import with_boxes
from optax_ext._types import canonicalize_dtype
from optax_ext.primitives.spikes import saturate


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: the momentum ``mu`` (param-shaped)."""

    mu: optax.Updates


LION_K = ("l1", "l2", "huber")


def grad_k(x: jax.Array, k: str, k_param: float = 1.0) -> jax.Array:
    """Subgradient of a convex ``K`` at ``x`` for Lion-K (per tensor).

    ``"l1"``: ``K = ||x||_1`` -> ``sign(x)`` (Lion; ``sign(0) = 0``). ``"l2"``: ``K = ||x||_2`` ->
    ``x / ||x||`` (normalized momentum; 0 at 0). ``"huber"``: Huber with threshold ``delta =
    k_param`` -> ``clip(x / delta, -1, 1)`` (sign outside ``[-delta, delta]``, linear inside).
    """
    if k == "l1":
        return jnp.sign(x)
    if k == "l2":
        norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))
        return (x / jnp.where(norm > 0, norm, 1.0)).astype(x.dtype)
    if k == "huber":
        return jnp.clip(x / k_param, -1.0, 1.0)
    raise ValueError(f"k must be one of {LION_K}, got {k!r}")


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    k: str = "l1",
    k_param: float = 1.0,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Lion's (and Lion-K's) direction: ``grad K`` of an interpolation with the old momentum.

    Algorithm::

        c <- b1 m + (1 - b1) g;   u <- grad K(c)     (K = ||.||_1: u = sign(c), Lion)
        m <- b2 m + (1 - b2) g                        (a different coefficient for the write)

    Args:
      b1: read coefficient. Default 0.9.
      b2: write coefficient. Default 0.99.
      k: ``"l1"`` (Lion), ``"l2"`` or ``"huber"``; see :func:`grad_k`.
      k_param: the Huber threshold. Default 1.
      mu_dtype: momentum dtype (cast after the EMA); default the parameter dtype.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByLionState`.

    References:
      Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675;
      code: github.com/google/automl ``lion/lion_pytorch.py`` at 6a54c87. Chen, Liang, Liu, 2023,
      "Lion Secretly Solves Constrained Optimization: As Lyapunov Predicts", arXiv 2310.05898.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_lion()
      >>> u, s = tx.update(jnp.array([2.0, -1.0, 0.0]), tx.init(jnp.zeros(3)))
      >>> u.tolist(), [round(float(m), 3) for m in s.mu]
      ([1.0, -1.0, 0.0], [0.02, -0.01, 0.0])
    """
    if k not in LION_K:
        raise ValueError(f"k must be one of {LION_K}, got {k!r}")
    mu_dtype = canonicalize_dtype(mu_dtype)

    def init_fn(params):
        return ScaleByLionState(mu=optax.tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates, state, params=None):
        del params
        c = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        out = jax.tree.map(lambda x, g: grad_k(x, k, k_param).astype(g.dtype), c, updates)
        mu = optax.tree.update_moment(updates, state.mu, b2, 1)
        return out, ScaleByLionState(mu=optax.tree.cast(mu, mu_dtype))

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdaBeliefState(NamedTuple):
    """State of :func:`scale_by_adabelief`: ``count``, ``mu`` and the belief variance ``nu``."""

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adabelief(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    *,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
) -> optax.GradientTransformation:
    """AdaBelief: Adam whose second moment is the variance of ``g`` around its EMA.

    Algorithm (``t`` the 1-based step; ``eps`` is accumulated into the state every step)::

        m <- b1 m + (1 - b1) g;   s <- b2 s + (1 - b2) (g - m)^2 + eps
        rectify=False:  u = (m / (1 - b1^t)) / (sqrt(s) / sqrt(1 - b2^t) + eps)
        rectify=True (RAdam):  rho_t = rho_inf - 2 t b2^t / (1 - b2^t), rho_inf = 2/(1-b2) - 1
            rho_t >= 5:  u = r_t m / (sqrt(s) + eps),  with r_t (1 - b1^t) =
                         sqrt((1-b2^t)(rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))
            else:        u = m / (1 - b1^t)  (degenerated_to_sgd) or 0

    Args:
      b1, b2: Defaults 0.9, 0.999.
      eps: Default 1e-16 (0.2.x package; 1e-8 for CNN-style settings).
      rectify: Default True.
      degenerated_to_sgd: SGD steps while ``rho_t < 5`` (the first 5 steps at b2 = 0.999).

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByAdaBeliefState`.

    References:
      Zhuang et al., 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
      Gradients", NeurIPS 2020, arXiv 2010.07468; code: github.com/juntang-zhuang/Adabelief-
      Optimizer (``adabelief_pytorch0.2.1/AdaBelief.py`` at 2855178).

    Notes:
      ``optax.scale_by_belief`` adds ``eps_root`` instead of accumulating ``eps`` and has no
      rectification. ``rho_t`` is computed in float32 under jit (the reference uses float64 on
      the host); the branch threshold is unaffected for the usual ``b2``.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_adabelief()
      >>> u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))   # SGD step: m / (1 - b1)
      >>> round(float(u[0]), 4)
      2.0
    """

    def init_fn(params):
        return ScaleByAdaBeliefState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = jax.tree.map(
            lambda g, m, s: b2 * s + (1 - b2) * jnp.square(g - m) + eps, updates, mu, state.nu
        )
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if not rectify:
            out = jax.tree.map(lambda m, s: (m / bc1) / (jnp.sqrt(s) / jnp.sqrt(bc2) + eps), mu, nu)
        else:
            rho_inf = 2.0 / (1 - b2) - 1
            rho = rho_inf - 2 * t * b2**t / bc2
            safe = jnp.maximum(rho, 5.0)
            r = (
                jnp.sqrt(
                    bc2 * (safe - 4) * (safe - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * safe)
                )
                / bc1
            )
            fallback = 1.0 / bc1 if degenerated_to_sgd else 0.0

            def step(m, s):
                return jnp.where(rho >= 5, r * m / (jnp.sqrt(s) + eps), fallback * m)

            out = jax.tree.map(step, mu, nu)
        out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
        return out, ScaleByAdaBeliefState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByExAdamState(NamedTuple):
    """State of :func:`scale_by_exadam`: ``count``, ``mu``, ``nu``."""

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates


def _moment_dtype(p: Any) -> jnp.dtype:
    """Dtype of Adam-like moments for a parameter: float32 for float16 (whose range and
    resolution cannot hold ``g^2`` or ``eps``), the parameter's own dtype otherwise."""
    dtype = jnp.asarray(p).dtype
    return jnp.dtype(jnp.float32) if dtype == jnp.float16 else dtype


def scale_by_exadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """EXAdam: Adam with cross-moment debiasing and a bias-corrected gradient term.

    Algorithm (``k`` the 1-based step)::

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        d1 = 1 + b2^k v / (v + eps);   d2 = 1 + b1^k m^2 / (m^2 + eps)
        u = (d1 m / (1 - b1^k) + d1 g / (1 - b1^k)) / (sqrt(d2 v / (1 - b2^k)) + eps)

    Args:
      b1, b2, eps: Defaults 0.9, 0.999, 1e-8.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByExAdamState`.

    Notes:
      Moments are kept in the parameter dtype, except float32 for float16 parameters (whose
      arithmetic is done in float32 and the update cast back). Overflow: ``v`` saturates at the
      dtype's largest finite value instead of becoming ``inf`` (so a huge gradient gives a small,
      finite update and ``v`` decays back), and ``d2 = 1 + b1^k`` where ``m^2`` overflows.

    References:
      Adly, 2024, "EXAdam: The Power of Adaptive Cross-Moments", arXiv 2412.20302; code:
      github.com/AhmedMostafa16/EXAdam (``exadam.py`` at 989d7b6).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_exadam()
      >>> u, _ = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)))
      >>> round(float(u[0]), 2)   # (d1 m_hat + d1 g / 0.1) / sqrt(d2 v_hat) = (2 + 20) / 1.38
      15.95
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p, dtype=_moment_dtype(p))  # noqa: E731 - keeps p's sharding
        return ScaleByExAdamState(
            jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        )

    def update_fn(updates, state, params=None):
        del params
        # float16 gradients in float32 (g^2 of a float16 gradient underflows)
        g32 = jax.tree.map(
            lambda g, m: g.astype(m.dtype) if g.dtype == jnp.float16 else g, updates, state.mu
        )
        mu = optax.tree.update_moment(g32, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(g32, state.nu, b2, 2)
        nu = jax.tree.map(saturate, nu)  # g^2 past the dtype's range: the largest finite value
        count = optax.safe_increment(state.count)
        k = count.astype(jnp.float32)
        bc1, bc2 = 1 - b1**k, 1 - b2**k

        def step(g, m, v):
            out_dtype = g.dtype
            if g.dtype == jnp.float16:  # eps = 1e-8 is 0 in float16: compute in float32
                g, m, v = (x.astype(jnp.float32) for x in (g, m, v))
            d1 = 1 + b2**k * v / (v + eps)
            m2 = m * m
            # m^2 / (m^2 + eps), which is 1 where m^2 overflows (inf / inf otherwise)
            d2 = 1 + b1**k * jnp.where(jnp.isfinite(m2), m2 / (m2 + eps), 1.0)
            num = d1 * m / bc1 + d1 * g / bc1
            return (num / (jnp.sqrt(d2 * v / bc2) + eps)).astype(out_dtype)

        out = jax.tree.map(step, updates, mu, nu)
        return out, ScaleByExAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleBySGDSaIState(NamedTuple):
    """State of :func:`scale_by_sgd_sai`: ``count``, momentum ``mu``, per-tensor ``gsnr``."""

    count: chex.Array
    mu: optax.Updates
    gsnr: optax.Updates


def _gsnr(g: jax.Array, eps: float) -> jax.Array:
    x = g.astype(jnp.float32)  # reductions over all axes: no reshape of a sharded tensor
    n = x.size
    std = jnp.std(x, ddof=1) if n > 1 else jnp.zeros([], jnp.float32)  # NaN -> 0 (1 element)
    return jnp.sqrt(jnp.sum(x * x)) / (std + eps)


def scale_by_sgd_sai(
    beta: float = 0.9, eps: float = 1e-8, *, normalize_by_max: bool = False
) -> optax.GradientTransformation:
    """SGD-SaI: momentum scaled per tensor by the gradient SNR measured at the first step.

    Algorithm (per tensor, ``g_1`` the first gradient)::

        step 1:  gsnr = ||g_1||_F / (std_unbiased(g_1) + eps)   (fixed afterwards);  m <- g_1
        later:   m <- beta m + (1 - beta) g
        u = gsnr m

    Args:
      beta: momentum. Default 0.9. ``beta = 0`` is plain scaled SGD (the reference crashes).
      eps: Default 1e-8.
      normalize_by_max: divide every tensor's gsnr by the largest one (the paper's Algorithm 1;
        the code does not, which is the default).

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleBySGDSaIState`.

    References:
      Xu, Xiang, Cai, Wen, 2024, "No More Adam: Learning Rate Scaling at Initialization is All
      You Need", arXiv 2412.11768; code: github.com/AnonymousAlethiometer/SGD_SaI
      (``sgd_sai/sgd_sai.py`` at e213080).

    Notes:
      A tensor whose first gradient is all zero gets ``gsnr = 0`` and is frozen (only weight
      decay moves it), as in the reference. A 1-element tensor has no std (taken as 0):
      ``gsnr = |g| / eps``, enormous steps, as in the reference.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_sgd_sai()
      >>> u, s = tx.update(jnp.array([1.0, 3.0]), tx.init(jnp.zeros(2)))
      >>> round(float(s.gsnr), 4)   # sqrt(10) / std([1, 3], ddof=1)
      2.2361
    """

    def init_fn(params):
        return ScaleBySGDSaIState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            gsnr=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params),
        )

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0
        fresh = jax.tree.map(lambda g: _gsnr(g, eps), updates)
        if normalize_by_max:
            top = jnp.max(jnp.stack(jax.tree.leaves(fresh)))
            fresh = jax.tree.map(lambda x: x / jnp.where(top > 0, top, 1.0), fresh)
        gsnr = jax.tree.map(lambda f, s: jnp.where(first, f, s), fresh, state.gsnr)
        mu = jax.tree.map(
            lambda g, m: jnp.where(first, g, beta * m + (1 - beta) * g), updates, state.mu
        )
        out = jax.tree.map(lambda m, r: (r * m).astype(m.dtype), mu, gsnr)
        return out, ScaleBySGDSaIState(optax.safe_increment(state.count), mu, gsnr)

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))
