"""Overflow-safe second-order statistics: float32 values with a power-of-two exponent.

A Gram matrix ``G G^T`` of float32 gradients overflows once entries reach about ``1e17`` (its
entries sum up to ``d`` squares). Preconditioners whose eigenbases only depend on the direction
of such statistics (SOAP's Gram factors, COSMOS's projected Gram) keep them as ``value * 2**e``
with an ``int32`` exponent ``e >= 0``: the gradient is scaled by a power of two before it is
squared, and the EMA aligns the two exponents. Scaling by powers of two is exact, and ``e``
stays 0 while the gradients are below ``2**SAFE_EXPONENT``, so ordinary runs compute exactly
what they would without this.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

SAFE_EXPONENT = 40
"""Entries below ``2**40`` square to below ``2**80``: sums of up to ``2**40`` such products stay
finite in float32 (max ``~2**128``)."""


def safe_exponent(x: jax.Array, axes: Sequence[int] | None = None) -> jax.Array:
    """The power of two ``e >= 0`` such that ``x * 2**-e`` has entries below ``2**SAFE_EXPONENT``.

    Args:
      x: any float array.
      axes: axes reduced over (None: all); the others are kept as a batch.

    Returns:
      ``int32`` exponents with ``x``'s shape minus ``axes`` (0 for ordinary magnitudes).
    """
    amax = jnp.max(jnp.abs(x), axis=None if axes is None else tuple(axes), initial=0.0)
    amax = jnp.where(jnp.isfinite(amax), amax, 0).astype(jnp.float32)
    _, ex = jnp.frexp(amax)  # amax = mantissa * 2**ex, mantissa in [0.5, 1)
    return jnp.maximum(ex - SAFE_EXPONENT, 0).astype(jnp.int32)


def _bcast(e: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.reshape(e, jnp.shape(e) + (1,) * (jnp.ndim(like) - jnp.ndim(e)))


def scale_down(x: jax.Array, e: jax.Array) -> jax.Array:
    """``x * 2**-e`` (exact; ``e`` broadcast over ``x``'s trailing axes)."""
    return jnp.ldexp(x, -_bcast(e, x))


def ema(
    value: jax.Array, exponent: jax.Array, new: jax.Array, new_exponent: jax.Array, beta
) -> tuple[jax.Array, jax.Array]:
    """``beta (value 2**exponent) + (1 - beta) (new 2**new_exponent)`` as ``(value, exponent)``.

    The result's exponent is the larger one, then lowered (never below 0) while the value's
    largest entry is below 1, so the value neither overflows nor decays into subnormals after
    a spike has passed. With both exponents 0 this is ``beta value + (1 - beta) new`` exactly.

    Args:
      value, exponent: the stored statistic (``exponent`` per leading batch entry, int32).
      new, new_exponent: this step's statistic, in the same form.
      beta: EMA coefficient.

    Returns:
      ``(value, exponent)`` of the EMA.
    """
    e = jnp.maximum(exponent, new_exponent)
    out = beta * jnp.ldexp(value, _bcast(exponent - e, value)) + (1 - beta) * jnp.ldexp(
        new, _bcast(new_exponent - e, new)
    )
    batch_axes = tuple(range(jnp.ndim(e), jnp.ndim(out)))
    amax = jnp.max(jnp.abs(out), axis=batch_axes, initial=0.0) if batch_axes else jnp.abs(out)
    _, ex = jnp.frexp(jnp.where(jnp.isfinite(amax) & (amax > 0), amax, 1.0))
    shift = jnp.clip(ex - 1, -e, 0).astype(jnp.int32)  # only while e > 0: exact otherwise
    return jnp.ldexp(out, -_bcast(shift, out)), e + shift
