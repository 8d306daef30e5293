"""Gradient spike clipping against the second moment of an inner transformation (SPAM)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext._boxes import with_boxes
from optax_ext._types import SpecLike
from optax_ext.primitives._matrices import MatrixLeaves, map_matrices
from optax_ext.primitives._state import get_field


class ClipSpikesState(NamedTuple):
    """State of :func:`clip_spikes`: step ``count`` (int32) and the wrapped ``inner_state``."""

    count: chex.Array
    inner_state: optax.OptState


def clip_spikes(
    inner: optax.GradientTransformation,
    threshold: float = 5000.0,
    *,
    every: int = 0,
    grace_steps: int = 0,
    nu_field: str = "nu",
) -> optax.GradientTransformation:
    """Clips gradient entries whose square exceeds ``threshold`` times the inner second moment.

    Algorithm (``v`` = the inner state's ``nu`` *before* this step's update, ``t`` 1-based)::

        if active(t):  g_i <- sign(g_i) * sqrt(threshold * v_i)   where  g_i^2 > threshold * v_i
        u, inner_state <- inner.update(g, inner_state)

    ``active(t)`` is ``t >= grace_steps`` and, when ``every > 0``, ``t mod every >= grace_steps``:
    SPAM switches clipping off for ``grace_steps`` steps after each momentum reset (its
    ``grad_accu_steps``), when ``v`` has just been zeroed. After the clip ``|g_i| <=
    sqrt(threshold * v_i)`` holds exactly.

    Args:
      inner: the transformation whose second moment is the reference (e.g. :func:`scale_by_adam`).
      threshold: spike threshold ``theta``; 0 disables clipping. Default 5000 (SPAM).
      every: reset period of an enclosing :func:`momentum_reset` (0: none). Default 0.
      grace_steps: see ``active`` above. Default 0.
      nu_field: name of the second-moment field in ``inner``'s state. Default ``"nu"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments of ``update`` are forwarded
      to ``inner``) with :class:`ClipSpikesState`.

    References:
      Huang et al., 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
      ICLR 2025, arXiv 2501.06842; code: github.com/TianjinYellow/SPAM-Optimizer
      (``galore_torch/SPAM.py`` at e8185fb).

    Notes:
      The reference compares against the raw (not bias-corrected) second moment, as here.
      Entries whose second moment is exactly 0 (no history since init or the last reset) are
      left alone; the reference would clip them to 0 if clipping were active then, which its
      defaults (``grace_steps`` = 20 after init and after every reset) avoid in practice.
      Non-finite gradient entries are not clipped (NaN fails the comparison; inf is clipped
      only when ``v`` is finite and the threshold active).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.clip_spikes(optax_ext.scale_by_adam(b2=0.5), threshold=4.0)
      >>> s = tx.init(jnp.zeros(1))
      >>> _, s = tx.update(jnp.array([1.0]), s)           # v = 0.5, m = 0.1
      >>> _, s = tx.update(jnp.array([100.0]), s)         # 100 clipped to sqrt(4 * 0.5)
      >>> round(float(s.inner_state.mu[0]), 5)            # 0.9 * 0.1 + 0.1 * sqrt(2)
      0.23142
    """

    def init_fn(params):
        inner_state = inner.init(params)
        get_field(inner_state, nu_field, "clip_spikes")
        return ClipSpikesState(count=jnp.zeros([], jnp.int32), inner_state=inner_state)

    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        nu = get_field(state.inner_state, nu_field, "clip_spikes")
        t = state.count + 1
        period = jnp.maximum(jnp.asarray(every, jnp.int32), 1)
        in_window = jnp.where(jnp.asarray(every) > 0, t % period >= grace_steps, True)
        active = (t >= grace_steps) & in_window & (jnp.asarray(threshold) > 0)

        def clip(g, v):
            bound2 = threshold * v.astype(jnp.float32)
            g32 = g.astype(jnp.float32)
            spike = active & (bound2 > 0) & (g32 * g32 > bound2)
            return jnp.where(spike, jnp.sign(g32) * jnp.sqrt(bound2), g32).astype(g.dtype)

        updates = jax.tree.map(clip, updates, nu)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        return updates, ClipSpikesState(
            count=optax.safe_increment(state.count), inner_state=inner_state
        )

    return with_boxes(optax.GradientTransformationExtraArgs(init_fn, update_fn))


_INF_BITS = 0x7F800000  # as int32, the bit patterns above +inf are NaN
_MAX_BITS = 0x7FFFFFFF


_RADIX_LEVELS = ((19, 12), (7, 12), (0, 7))  # (shift, bits): the 31 bits of |x|, high first


def _select_bits(bits: jax.Array, k: jax.Array) -> jax.Array:
    """Per row, the ``k``-th smallest (0-based) of non-negative int32 ``bits[b, n]``.

    Radix selection, high digits first: a histogram of the top 12 bits finds the bucket that
    holds rank ``k`` and the rank left inside it; two more histograms (next 12 bits, last 7
    bits) among that bucket's entries finish the value. Three scatter-add passes, batched over
    the rows, exact for any data (ties included).
    """
    rows, n = bits.shape
    rank = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (rows,))
    prefix = jnp.zeros((rows,), jnp.int32)  # the digits found so far
    done = 0  # bits found so far
    for shift, width in _RADIX_LEVELS:
        digit = (bits >> shift) & ((1 << width) - 1)
        inside = (bits >> (shift + width)) == prefix[:, None] if done else True
        counts = inside.astype(jnp.int32) if done else jnp.ones_like(bits)
        # one histogram per row (vmapped scatter-add): rows keep their layout on a mesh
        hist = jax.vmap(lambda d, c: jnp.zeros((1 << width,), jnp.int32).at[d].add(c))(
            digit, counts
        )
        cum = jnp.cumsum(hist, axis=-1)
        pick = jnp.sum(cum <= rank[:, None], axis=-1, dtype=jnp.int32)  # first cum > rank
        below = jnp.take_along_axis(cum, jnp.maximum(pick - 1, 0)[:, None], axis=-1)[:, 0]
        rank = rank - jnp.where(pick > 0, below, 0)
        prefix = (prefix << width) | pick
        done += width
    return prefix


def _quantile_indices(n: int, quantile):
    """numpy.quantile's (method ``"linear"``) neighbours and weight for ``n`` sorted values.

    Returns ``(lo, hi, t, one_minus_t)``: the 0-based ranks of the two neighbours, the weight of
    the upper one and ``1 - t``, computed in float64 on the host as numpy does when ``quantile``
    is a concrete number, in float32 otherwise (an injected hyperparameter).
    """
    try:
        q = float(quantile)
    except (TypeError, jax.errors.ConcretizationTypeError):
        q = None
    if q is not None:
        virtual = n * q + (1.0 - q) - 1.0  # numpy's _compute_virtual_index, alpha = beta = 1
        if virtual >= n - 1:
            lo = hi = n - 1
            t = virtual + 1.0  # numpy's gamma against its index -1
        elif virtual < 0:
            lo = hi = 0
            t = virtual
        else:
            lo = int(np.floor(virtual))
            hi, t = lo + 1, virtual - lo
        as_f32 = lambda v: jnp.asarray(np.float32(v))  # noqa: E731
        return jnp.asarray(lo), jnp.asarray(hi), as_f32(t), as_f32(1.0 - t)
    q = jnp.asarray(quantile, jnp.float32)
    virtual = n * q + (1.0 - q) - 1.0
    floor = jnp.floor(virtual)
    above, below = virtual >= n - 1, virtual < 0
    lo = jnp.where(above, n - 1, jnp.where(below, 0, floor)).astype(jnp.int32)
    hi = jnp.where(above | below, lo, lo + 1)
    t = jnp.where(above, virtual + 1.0, jnp.where(below, virtual, virtual - floor))
    return lo, hi, t, 1.0 - t


def _abs_quantile(x: jax.Array, quantile) -> jax.Array:
    """Per row of ``x[b, n]``, ``numpy.quantile(|x_row|, quantile)`` (method ``"linear"``).

    Exact selection without a sort: the two neighbouring order statistics are found by radix
    selection on the float32 bit pattern of ``|x|`` (monotone for non-negative floats): three
    histogram passes and two fused reductions, batched over the rows; then interpolated with numpy's ``_lerp``
    (``a + (b - a) t``, or ``b - (b - a) (1 - t)`` when ``t >= 0.5``) in float32. A row with a
    NaN gives NaN (as numpy and ``jnp.quantile``).
    """
    a = jnp.abs(x.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)
    top = jnp.max(bits, axis=-1)
    lo, hi, t, one_minus_t = _quantile_indices(x.shape[-1], quantile)
    lo_bits = _select_bits(bits, lo)
    # The upper neighbour: the same value when enough entries tie with it, else the next one up.
    tied = jnp.sum(bits <= lo_bits[:, None], axis=-1, dtype=jnp.int32) >= hi + 1
    above = jnp.min(jnp.where(bits > lo_bits[:, None], bits, _MAX_BITS), axis=-1)
    hi_bits = jnp.where(tied, lo_bits, above)
    low = jax.lax.bitcast_convert_type(lo_bits, jnp.float32)
    high = jax.lax.bitcast_convert_type(hi_bits, jnp.float32)
    diff = high - low
    # Two roundings as numpy (a product, then a sum). XLA on CPU contracts ``a + b * c`` into a
    # fused multiply-add; routing the product through an integer xor with a zero it cannot
    # prove zero (``lo_bits >= 0``) keeps the product rounded on its own.
    zero = lo_bits >> 31

    def rounded(v):
        v = jax.lax.bitcast_convert_type(v, jnp.int32) ^ zero
        return jax.lax.bitcast_convert_type(v, jnp.float32)

    out = jnp.where(t >= 0.5, high - rounded(diff * one_minus_t), low + rounded(diff * t))
    return jnp.where(top > _INF_BITS, jnp.nan, out)


def clip_by_quantile(
    quantile: float = 0.9,
    *,
    offset: float = 1e-9,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """Clamps each matrix update to ``±(q-quantile of its |entries| + offset)``.

    ROOT's outlier suppression: the entries above the per-matrix quantile are the "outliers"
    ``O = sign(U) max(|U| - eps, 0)``; the base ``B = U - O = clip(U, -eps, eps)`` is kept::

        eps = Q_q(|U|) + offset        # linear interpolation, as numpy.quantile
        U  <- clip(U, -eps, eps)

    Args:
      quantile: level ``q`` in [0, 1]. Default 0.9 (ROOT, hard-coded there).
      offset: added to the quantile. Default 1e-9.
      specs: which axes are fan-in/fan-out; the quantile is per matrix of the view.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Raises:
      ValueError: for a leaf with ``ndim < 2`` (path and shape named).

    References:
      He et al., 2025, "ROOT: Robust Orthogonalized Optimizer for Neural Network Training",
      arXiv 2511.20626; code: github.com/huawei-noah/noah-research ``ROOT/examples/
      example_train.py`` at aa0f80c (``simple_quantile``).

    Notes:
      The README calls this soft-thresholding; keeping the base rather than the outliers makes
      it a hard clip. The quantile is selected exactly without a sort (radix selection on the
      float32 bit pattern: three histogram passes and three reductions over each bucket of
      same-shape matrices) and interpolated as ``numpy.quantile`` does.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.clip_by_quantile(0.5, offset=0.0)
      >>> u, _ = tx.update({"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}, tx.init(None))
      >>> u["w"].tolist()
      [[1.0, -2.0], [2.5, -2.5]]
    """

    def clip(u):
        eps = _abs_quantile(u.reshape(u.shape[0], -1), quantile) + offset
        eps = eps[:, None, None]
        return jnp.clip(u.astype(jnp.float32), -eps, eps).astype(u.dtype)

    def init_fn(params):
        if params is not None:
            MatrixLeaves(params, specs, "clip_by_quantile")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return map_matrices(clip, updates, specs, "clip_by_quantile"), state

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))


def _norm(x: jax.Array) -> jax.Array:
    """``||x||_2`` that does not overflow: the entries are scaled by a power of two first.

    The scale is ``2^-e`` with ``2^(e-1) <= max|x| < 2^e``; scaling by a power of two is exact, so
    the result equals ``sqrt(sum(x^2))`` bit for bit wherever that does not overflow or underflow.
    """
    _, e = jnp.frexp(jnp.max(jnp.abs(x), initial=0.0))
    e = jnp.where(jnp.isfinite(x).all(), e, 0)  # non-finite entries keep their plain norm
    return jnp.ldexp(jnp.sqrt(jnp.sum(jnp.square(jnp.ldexp(x, -e)))), e)


def _scale(x: jax.Array, num: jax.Array, den: jax.Array) -> jax.Array:
    """``x num / den`` in the code's order, or ``x (num / den)`` where ``x num`` would overflow."""
    out = x * num / den
    return jnp.where(jnp.isfinite(out) | ~jnp.isfinite(x), out, x * (num / den))


def saturate(x: jax.Array) -> jax.Array:
    """``x`` with ``+inf`` replaced by the largest finite value of its dtype (NaN stays NaN)."""
    return jnp.minimum(x, jnp.finfo(x.dtype).max)


class ScaleByStableSpamState(NamedTuple):
    """State of :func:`scale_by_stable_spam`.

    Attributes:
      count: global 1-based step of the last update (int32), drives the cosine ``sigma_T``.
      k: per-tensor step counter used for debiasing (int32), reset to 1 at momentum resets.
      mu, nu: Adam moments (param-shaped).
      max_ema: per tensor, EMA of ``max |g|`` (float32 scalars).
      norm_ema: per tensor, EMA of ``||g||`` (float32 scalars).
      sq_norm_ema: per tensor, EMA of ``||g||^2`` (float32 scalars).
    """

    count: chex.Array
    k: chex.Array
    mu: optax.Updates
    nu: optax.Updates
    max_ema: optax.Updates
    norm_ema: optax.Updates
    sq_norm_ema: optax.Updates


def scale_by_stable_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    gamma3: float = 0.999,
    reset_every: int = 1000,
    total_steps: int | None = None,
    eta_min: float = 0.5,
    clean_reset: bool = False,
) -> optax.GradientTransformation:
    """Stable-SPAM's preconditioner: adaptive spike clip, adaptive norm, Adam with resets.

    Algorithm (per tensor; ``T`` the global step, ``k`` the per-tensor counter)::

        sigma = eta + (1 - eta)(1 + cos(pi T / (total + 1))) / 2   (1 without total_steps)
        k <- k + 1
        M <- g3 M + (1 - g3) max|g|;  Mh = M / (1 - g3^k);  g <- g Mh / max|g| where |g| > Mh
        n = ||g||;  a <- g1s a + (1 - g1s) n;  b <- g2 b + (1 - g2) n^2      (g1s = g1 sigma)
        g <- g c / n  with  c = (a / (1 - g1s^k)) / (sqrt(b / (1 - g2^k)) + eps)   (if n > 0)
        if T mod reset_every == 0:  k <- 1;  the moments used now are the old ones (code) or 0
                                    (clean_reset); the stored moments end the step at 0
        b1' = b1 sigma;  m <- b1' m + (1 - b1') g;  v <- b2 v + (1 - b2) g^2
        u = (m / (1 - b1'^k)) / (sqrt(v) / sqrt(1 - b2^k) + eps)

    Args:
      b1, b2, eps: Adam constants (PyTorch placement of ``eps``). Defaults 0.9, 0.999, 1e-8.
      gamma1: norm-EMA decay (``-1`` would mean ``b1`` in the reference). Default 0.7.
      gamma2: squared-norm EMA decay. Default 0.9.
      gamma3: max-abs EMA decay (spike threshold ``theta``). Default 0.999.
      reset_every: momentum reset period (``update_proj_gap``); 0 disables. Default 1000.
      total_steps: length of the cosine on the momentum coefficients; None disables.
      eta_min: floor of ``sigma``. Default 0.5.
      clean_reset: zero the moments *before* using them on a reset step (the paper) instead of
        the code's aliasing, which steps with the stale moments and ``k = 1``. Default False.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByStableSpamState`.

    References:
      Huang et al., 2025, "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
      arXiv 2502.17055; code: github.com/TianjinYellow/StableSPAM
      (``galore_torch/stablespam.py`` at 6a54c87).

    Notes:
      The clip rescales entries above ``Mh`` proportionally (the largest lands on ``Mh``); it is
      not a clamp. All-zero gradients: nothing is clipped or renormalised, the statistics are
      still updated and the step still uses the momentum. ``sigma`` keeps following the closed
      form past ``total_steps`` (no clamp), as in the code.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_stable_spam()
      >>> u, s = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))
      >>> int(s.k), float(s.norm_ema)
      (1, 1.5)
    """

    def init_fn(params):
        scalars = lambda: jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)  # noqa: E731
        return ScaleByStableSpamState(
            count=jnp.zeros([], jnp.int32),
            k=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            max_ema=scalars(),
            norm_ema=scalars(),
            sq_norm_ema=scalars(),
        )

    def update_fn(updates, state, params=None):
        del params
        big_t = state.count + 1
        tf = big_t.astype(jnp.float32)
        if total_steps is None:
            sigma = jnp.ones([], jnp.float32)
        else:
            sigma = eta_min + (1 - eta_min) * (1 + jnp.cos(jnp.pi * tf / (total_steps + 1))) / 2
        k = state.k + 1
        kf = k.astype(jnp.float32)
        g1s = gamma1 * sigma
        period = jnp.maximum(jnp.asarray(reset_every, jnp.int32), 1)
        reset = (jnp.asarray(reset_every) > 0) & (big_t % period == 0)
        k_adam = jnp.where(reset, 1, k).astype(jnp.float32)
        b1s = b1 * sigma
        bc1, bc2 = 1 - b1s**k_adam, 1 - b2**k_adam

        def per_tensor(g, m, v, mx, a, b):
            m_dtype, v_dtype = m.dtype, v.dtype
            g32 = g.astype(jnp.float32)
            gmax = jnp.max(jnp.abs(g32), initial=0.0)  # 0 for a zero-size leaf
            mx = gamma3 * mx + (1 - gamma3) * gmax
            mhat = mx / (1 - gamma3**kf)
            safe = jnp.where(gmax > 0, gmax, 1.0)
            g32 = jnp.where(jnp.abs(g32) > mhat, _scale(g32, mhat, safe), g32)
            n = _norm(g32)
            a = g1s * a + (1 - g1s) * n
            b = saturate(gamma2 * b + (1 - gamma2) * saturate(n * n))
            bhat = b / (1 - gamma2**kf)
            # sqrt(b / bc) as in the code; sqrt(b) / sqrt(bc) where b / bc alone would overflow
            root = jnp.where(jnp.isfinite(bhat), jnp.sqrt(bhat), jnp.sqrt(b) / jnp.sqrt(1 - gamma2**kf))
            c = (a / (1 - g1s**kf)) / (root + eps)
            g32 = jnp.where(n > 0, _scale(g32, c, jnp.where(n > 0, n, 1.0)), g32)
            if clean_reset:
                m = jnp.where(reset, jnp.zeros_like(m), m)
                v = jnp.where(reset, jnp.zeros_like(v), v)
            m = b1s * m + (1 - b1s) * g32.astype(m.dtype)
            v = saturate(b2 * v + (1 - b2) * saturate(jnp.square(g32)).astype(v.dtype))
            u = (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)
            m_out = jnp.where(reset, jnp.zeros_like(m), m).astype(m_dtype)
            v_out = jnp.where(reset, jnp.zeros_like(v), v).astype(v_dtype)
            return u.astype(g.dtype), m_out, v_out, mx, a, b

        res = jax.tree.map(
            per_tensor,
            updates,
            state.mu,
            state.nu,
            state.max_ema,
            state.norm_ema,
            state.sq_norm_ema,
        )
        pick = lambda i: jax.tree.map(lambda _, r: r[i], updates, res)  # noqa: E731
        new = ScaleByStableSpamState(
            count=big_t,
            k=jnp.where(reset, 1, k).astype(jnp.int32),
            mu=pick(1),
            nu=pick(2),
            max_ema=pick(3),
            norm_ema=pick(4),
            sq_norm_ema=pick(5),
        )
        return pick(0), new

    return with_boxes(optax.GradientTransformation(init_fn, update_fn))
