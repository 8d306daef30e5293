"""Matrix norms over the last two axes of ``(..., fan_in, fan_out)`` views, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def frobenius_norm(x: jax.Array, *, keepdims: bool = True) -> jax.Array:
    """``||X||_F`` of each matrix; input ``(..., m, n)``, output ``(..., 1, 1)`` (float32)."""
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=keepdims))


def rms(x: jax.Array, *, keepdims: bool = True) -> jax.Array:
    """Root mean square of the entries of each matrix; ``(..., m, n)`` -> ``(..., 1, 1)``."""
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(x * x, axis=(-2, -1), keepdims=keepdims))


def mean_square(x: jax.Array, *, axis: int) -> jax.Array:
    """Mean of squares along ``axis`` (kept), float32: NorMuon's per-neuron statistic."""
    x = x.astype(jnp.float32)
    return jnp.mean(x * x, axis=axis, keepdims=True)


def vector_norm(x: jax.Array, *, axis: int) -> jax.Array:
    """Euclidean norm along ``axis`` (kept), float32: per-row or per-column norms."""
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))


def projected_norm_ratio(
    n: jax.Array, r: jax.Array, *, axis: int, per_channel: bool, eps: float = 1e-8
) -> jax.Array:
    """Norm ratio ``||N|| / (||R|| + eps)`` of a low-rank update ``N`` to its input ``R``.

    Args:
      n, r: ``(b, r, fan_out)`` if the fan-in side was projected (``axis == 1``), else
        ``(b, fan_in, r)``.
      axis: the projected axis (1 = fan-in, 2 = fan-out).
      per_channel: one ratio per channel of the non-projected side (norms over the rank axis,
        APOLLO/Fira "channel"), or one per matrix (APOLLO-Mini "tensor").
      eps: Default 1e-8.

    Returns:
      float32 ``(b, 1, fan_out)`` / ``(b, fan_in, 1)`` per channel, ``(b, 1, 1)`` per matrix.
    """
    reduce = (axis,) if per_channel else (1, 2)
    nn = jnp.sqrt(jnp.sum(jnp.square(n.astype(jnp.float32)), axis=reduce, keepdims=True))
    rn = jnp.sqrt(jnp.sum(jnp.square(r.astype(jnp.float32)), axis=reduce, keepdims=True))
    return nn / (rn + eps)


def limit_norm_growth(
    s: jax.Array, h: jax.Array, first: jax.Array, *, gamma: float = 1.01, eps: float = 1e-8
) -> tuple[jax.Array, jax.Array]:
    """Fira's norm-growth limiter: the Frobenius norm of ``s`` grows at most ``gamma`` per step.

    ``lam = max(||s|| / (h + eps), gamma) / gamma;  s <- s / lam;  h <- ||s_before|| / lam``,
    except on the first call, which only records ``h = ||s||``.

    Args:
      s: ``(b, m, n)`` updates. h: ``(b,)`` previous norms. first: scalar bool.
      gamma: growth limit. Default 1.01. eps: Default 1e-8.

    Returns:
      ``(limited s, new h)``.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(s.astype(jnp.float32)), axis=(-2, -1)))
    lam = jnp.maximum(norm / (h + eps), gamma) / gamma
    lam = jnp.where(first, jnp.ones_like(lam), lam)
    return (s / lam[:, None, None].astype(s.dtype)), norm / lam
