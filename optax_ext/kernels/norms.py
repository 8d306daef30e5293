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
