"""Maps that bound the singular values of weight matrices (Newhouse et al., 2025).

Every map takes a batch of matrices ``(..., m, n)`` and returns the same shape and dtype; the
reference (``modula/atom.py``) applies them to PyTorch-layout weights ``(fan_out, fan_in)``,
and where the result depends on the layout (the power iteration's random start) the functions
say so. ``sigma`` below is the largest singular value.

- :func:`power_iteration`: ``(u, sigma, v)`` from 16 steps on the smaller Gram matrix;
- :func:`spectral_normalize` ``M / max(1, sigma)``, :func:`spectral_hammer` (top singular value
  set to ``w_max``), :func:`spectral_weight_decay` (top singular value shrunk by ``1 - wd``);
- :func:`spectral_hard_cap` (four quintics, ``s -> ~min(1, s)``), :func:`spectral_soft_cap`
  (``s -> s' + alpha s'^3`` with ``s' = s - alpha s^3``) with :func:`soft_cap_coupling`;
- :func:`svd_cap` (exact clip of the singular values, the reference's ``pure_svd``);
- :func:`lipschitz_orthogonalize`: the reference's six-step orthogonalization (also as the
  :class:`~optax_ext.kernels.NewtonSchulz` spec :data:`LIPSCHITZ_ORTHO`);
- :func:`rms_cap`: per-vector RMS cap of embedding tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_ext.kernels import lapack
from optax_ext.kernels.newton_schulz import (
    HARD_CAP_COEFFS,
    LIPSCHITZ_ORTHO_COEFFS,
    NewtonSchulz,
    newton_schulz,
)

LIPSCHITZ_ORTHO = NewtonSchulz(steps=6, coeffs=LIPSCHITZ_ORTHO_COEFFS, eps=1e-12, dtype=None)
"""``modula.atom.orthogonalize`` as a spec for :func:`optax_ext.orthogonalize`:
``M / (||M||_F + 1e-12)``, then six per-step quintics, in the input dtype (the reference's
docstring says bfloat16; its code does not cast)."""


def lipschitz_orthogonalize(x: jax.Array) -> jax.Array:
    """The reference's ``orthogonalize`` on ``(..., m, n)`` (:data:`LIPSCHITZ_ORTHO`): every
    singular value of the Frobenius-normalised input is driven to about 1 (0.9993 for the
    golden's inputs); input dtype kept."""
    return newton_schulz(
        x, steps=6, coeffs=LIPSCHITZ_ORTHO_COEFFS, eps=1e-12, normalize=True, dtype=None
    )


def _work(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
    """Batched matrix-vector product ``a @ x`` for ``a (..., m, n)``, ``x (..., n)``."""
    return jnp.einsum("...ij,...j->...i", a, x, precision=jax.lax.Precision.HIGHEST)


def _normalized(w: jax.Array) -> jax.Array:
    norm = jnp.linalg.norm(w, axis=-1, keepdims=True)
    return w / jnp.where(norm > 0, norm, 1)


def power_iteration(
    x: jax.Array, key: jax.Array, *, steps: int = 16
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top singular triple ``(u, sigma, v)`` with ``x v = sigma u`` by power iteration.

    Algorithm (``x`` of shape ``(m, n)``, reference ``_power_iterate``)::

        start ~ N(0, I) from fold_in(fold_in(key, m), n), normalised
        m < n:   u <- normalize(x x^T u) (steps times);  sigma = ||x^T u||;  v = x^T u / sigma
        m >= n:  v <- normalize(x^T x v) (steps times);  sigma = ||x v||;    u = x v / sigma

    A fresh start every call (no persistent vector). Few steps may underestimate ``sigma``
    (reference golden: 3.59 for a true 3.72). The start depends on ``(m, n)`` in the given
    order: pass the ``(fan_out, fan_in)`` view to reproduce the reference, which draws it for
    its PyTorch-layout weight.

    Args:
      x: ``(..., m, n)``; every matrix of the batch starts from the same vector.
      key: a PRNG key.
      steps: number of iterations (static). Default 16.

    Returns:
      ``u (..., m)``, ``sigma (...)``, ``v (..., n)`` in at least float32. A zero matrix gives
      ``sigma = 0`` and ``u = v = 0`` (the reference divides 0 by 0).
    """
    x = _work(x)
    m, n = x.shape[-2:]
    start_key = jax.random.fold_in(jax.random.fold_in(key, m), n)
    xt = jnp.swapaxes(x, -1, -2)
    a, b = (x, xt) if m < n else (xt, x)  # w <- a (b w): the smaller Gram matrix's side
    start = _normalized(jax.random.normal(start_key, (a.shape[-2],), x.dtype))
    w = jnp.broadcast_to(start, (*x.shape[:-2], a.shape[-2]))
    w = jax.lax.fori_loop(0, steps, lambda _, w: _normalized(_mv(a, _mv(b, w))), w)
    other = _mv(b, w)
    sigma = jnp.linalg.norm(other, axis=-1)
    other = other / jnp.where(sigma > 0, sigma, 1)[..., None]
    return (w, sigma, other) if m < n else (other, sigma, w)


def spectral_normalize(x: jax.Array, key: jax.Array, *, steps: int = 16) -> jax.Array:
    """``x / max(1, sigma)`` with ``sigma`` from :func:`power_iteration`; ``(..., m, n)``."""
    _, sigma, _ = power_iteration(x, key, steps=steps)
    return (_work(x) / jnp.maximum(1.0, sigma)[..., None, None]).astype(x.dtype)


def spectral_hammer(
    x: jax.Array, key: jax.Array, *, w_max: float | jax.Array = 1.0, steps: int = 16
) -> jax.Array:
    """Sets the top singular value to ``w_max``: ``x + (w_max - sigma) u v^T``.

    Only the top direction moves, so the result respects ``w_max`` only if at most one
    singular value exceeded it (true after a small step from a constrained matrix).
    """
    u, sigma, v = power_iteration(x, key, steps=steps)
    change = (w_max - sigma)[..., None, None]
    return (_work(x) + change * u[..., :, None] * v[..., None, :]).astype(x.dtype)


def spectral_weight_decay(
    x: jax.Array, key: jax.Array, *, spectral_wd: float | jax.Array = 0.1, steps: int = 16
) -> jax.Array:
    """Shrinks the top singular value by ``1 - spectral_wd``: ``x - wd sigma u v^T``."""
    u, sigma, v = power_iteration(x, key, steps=steps)
    change = (spectral_wd * sigma)[..., None, None]
    return (_work(x) - change * u[..., :, None] * v[..., None, :]).astype(x.dtype)


def spectral_hard_cap(x: jax.Array) -> jax.Array:
    """Maps each singular value ``s`` to about ``min(1, s)`` with four quintics (no SVD).

    Algorithm: no normalisation; four steps ``X <- a X + (b A + c A^2) X``, ``A = X X^T`` with
    :data:`~optax_ext.kernels.HARD_CAP_COEFFS`, in the input dtype. Overshoot: the reference
    golden maps 3.72 to 1.0099 and 3.15 to 1.0100; values far above that range are not capped.
    """
    return newton_schulz(x, steps=4, coeffs=HARD_CAP_COEFFS, normalize=False, dtype=None)


def spectral_soft_cap(x: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """``X <- X - alpha X X^T X``, then ``X <- X + alpha X X^T X``: ``s -> s' + alpha s'^3``.

    With ``alpha = soft_cap_coupling(w_max, wd, u)`` every singular value up to
    ``k = w_max (1 - wd) + u`` stays below ``w_max`` and ``k`` maps exactly to it; far above
    ``k`` the map explodes (golden: 3.72 -> 18.8 with alpha 0.159). Computed like the
    reference on the tall orientation, ``X (I -+ alpha X^T X)``, in the input dtype.
    """
    tall = x.shape[-1] > x.shape[-2]
    m = jnp.swapaxes(x, -1, -2) if tall else x
    precision = jax.lax.Precision.HIGHEST if m.dtype == jnp.float32 else None
    mm = lambda p, q: jnp.matmul(p, q, precision=precision)  # noqa: E731
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)
    alpha = jnp.asarray(alpha, m.dtype)
    for sign in (-1, 1):
        gram = mm(jnp.swapaxes(m, -1, -2), m)
        m = mm(m, eye + sign * alpha * gram)
    return jnp.swapaxes(m, -1, -2) if tall else m


def soft_cap_coupling(
    w_max: float | jax.Array,
    wd: float | jax.Array,
    max_update_norm: float | jax.Array,
    *,
    iterations: int = 64,
) -> jax.Array:
    """Soft-cap strength ``alpha`` under which a step of norm ``u`` keeps ``sigma <= w_max``.

    With ``k = w_max (1 - wd) + u`` (the largest singular value reachable after decay and a step),
    ``alpha`` is the smallest non-negative real root of
    ``-k^9 a^4 + 3 k^7 a^3 - 3 k^5 a^2 + (k - w_max) = 0``, so that :func:`spectral_soft_cap`
    maps ``k`` to ``w_max``. Substituting ``b = a k^2`` gives ``b^2 (b^2 - 3 b + 3) = 1 - w_max /
    k =: c``, whose left side increases strictly on ``b >= 0``: the root is found by bisection
    (jit-safe, no eigenvalue solver) and equals the reference's ``jnp.roots`` choice, including
    its fallbacks: ``alpha = 0`` when ``c = 0``, ``alpha = 1`` when ``c < 0`` (no non-negative
    root; e.g. ``u < w_max wd``) and ``min(alpha, 1)`` otherwise.

    Args:
      w_max: the cap. wd: the decay factor applied before the step (``wd * lr`` in
        ``Linear.project``). max_update_norm: the step's spectral norm ``u``. All may be arrays.
      iterations: bisection steps (static). Default 64 (below float32 resolution).

    Returns:
      ``alpha``, a float32 (or wider) array of the broadcast shape of the inputs.
    """
    dtype = jnp.result_type(float, w_max, wd, max_update_norm)
    dtype = jnp.promote_types(dtype, jnp.float32)
    w_max, wd, u = (jnp.asarray(v, dtype) for v in (w_max, wd, max_update_norm))
    k = w_max * (1 - wd) + u
    c = (k - w_max) / k
    f = lambda b: b * b * (b * b - 3 * b + 3)  # noqa: E731
    hi = jnp.broadcast_to(k * k, c.shape)  # b = k^2 is alpha = 1: no need to look further
    capped = f(hi) <= c

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = f(mid) < c
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, bisect, (jnp.zeros_like(hi), hi))
    alpha = jnp.where(capped, 1.0, 0.5 * (lo + hi) / (k * k))
    return jnp.where(c < 0, 1.0, jnp.where(c == 0, 0.0, alpha)).astype(dtype)


def svd_cap(x: jax.Array, *, w_max: float | jax.Array = 1.0) -> jax.Array:
    """Exact ``U min(S, w_max) V^T`` (the reference's ``pure_svd``), in at least float32."""
    u, s, vt = lapack.svd(_work(x))  # one LAPACK call per matrix on CPU
    s = jnp.minimum(s, w_max)
    out = jnp.matmul(u * s[..., None, :], vt, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


def rms_cap(x: jax.Array, *, axis: int = -1, max_inflation: float | jax.Array = 1.0) -> jax.Array:
    """Divides each vector along ``axis`` by ``max(1 / max_inflation, its RMS)``.

    ``max_inflation = 1`` caps every vector's RMS at 1 (the reference's ``Embed.project``);
    larger values normalise vectors to RMS 1 but amplify small ones at most by
    ``max_inflation`` (its ``Embed.dualize``). The reference's ``(d_embed, num_embed)`` tables
    use ``axis=-2``; a flax ``Embed`` table ``(num_embed, d_embed)`` uses ``axis=-1``.
    """
    w = _work(x)
    rms = jnp.linalg.norm(w, axis=axis, keepdims=True) / jnp.sqrt(float(x.shape[axis]))
    return (w / jnp.maximum(1 / max_inflation, rms)).astype(x.dtype)
