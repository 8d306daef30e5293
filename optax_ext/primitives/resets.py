"""Periodic resets of named fields of an inner transformation's state (SPAM, Stable-SPAM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_ext.primitives._state import map_fields


class MomentumResetState(NamedTuple):
    """State of :func:`momentum_reset`: step ``count`` (int32) and the wrapped ``inner_state``."""

    count: chex.Array
    inner_state: optax.OptState


def momentum_reset(
    inner: optax.GradientTransformation,
    every: int = 500,
    *,
    fields: Sequence[str] = ("mu", "nu"),
) -> optax.GradientTransformation:
    """Zeroes the named fields of ``inner``'s state at the start of every ``every``-th step.

    Algorithm (``t`` the 1-based step of this wrapper)::

        if every > 0 and t mod every == 0:  inner_state.<field> <- 0   for field in fields
        u, inner_state <- inner.update(g, inner_state)

    Only the named fields change; every other field (e.g. the step ``count`` that drives bias
    correction, unless named) is kept. Fields are found by name anywhere in the nested inner
    state (``optax.chain`` tuples, wrappers' ``inner_state``), like ``optax.tree.get``.

    Args:
      inner: the wrapped transformation.
      every: reset period ``Delta T`` in steps; 0 disables. Default 500 (SPAM).
      fields: state fields to zero. Default ``("mu", "nu")``; Stable-SPAM adds ``"count"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments of ``update`` are forwarded
      to ``inner``) with :class:`MomentumResetState`.

    Raises:
      ValueError: in ``init`` if ``inner``'s state has none of the named fields.

    References:
      Huang et al., 2025, "SPAM", arXiv 2501.06842 (resets at steps ``Delta T, 2 Delta T, ...``).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.momentum_reset(optax_ext.scale_by_adam(), every=2)
      >>> s = tx.init(jnp.zeros(1))
      >>> _, s = tx.update(jnp.ones(1), s)
      >>> _, s = tx.update(jnp.ones(1), s)        # step 2: reset, then this step's moments
      >>> round(float(s.inner_state.mu[0]), 6), int(s.inner_state.count)
      (0.1, 2)
    """
    fields = tuple(fields)

    def init_fn(params):
        inner_state = inner.init(params)
        _, hits = map_fields(inner_state, fields, lambda _, v: v)
        if hits == 0:
            raise ValueError(
                f"momentum_reset: the inner state has none of the fields {fields}; "
                "name fields it has (e.g. 'mu', 'nu', 'count' of optax_ext.scale_by_adam)"
            )
        return MomentumResetState(count=jnp.zeros([], jnp.int32), inner_state=inner_state)

    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        t = state.count + 1
        period = jnp.maximum(jnp.asarray(every, jnp.int32), 1)
        reset = (jnp.asarray(every) > 0) & (t % period == 0)
        zero = lambda x: jnp.where(reset, jnp.zeros_like(x), x)  # noqa: E731
        inner_state, _ = map_fields(state.inner_state, fields, lambda _, v: jax.tree.map(zero, v))
        updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
        return updates, MomentumResetState(
            count=optax.safe_increment(state.count), inner_state=inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByResetWarmupState(NamedTuple):
    """State of :func:`scale_by_reset_warmup`: the step ``count`` (int32)."""

    count: chex.Array


def scale_by_reset_warmup(
    every: int = 500, warmup_steps: int = 150
) -> optax.GradientTransformation:
    """Cosine re-warm-up of the update after each momentum reset (SPAM).

    Algorithm (``t`` the 1-based step, ``N = warmup_steps``; ``c = t mod every`` once ``t >=
    every``, counting steps since the last reset)::

        s_t = 1 - 0.99 (1 + cos(pi c / (N + 1))) / 2   if c < N   else 1
        u <- s_t u

    so the multipliers after a reset are 0.01, ..., reaching 1 at the N-th step after it (no
    scaling before the first reset).

    Args:
      every: reset period ``Delta T`` (the enclosing :func:`momentum_reset`'s). Default 500.
      warmup_steps: ``N``. Default 150 (the paper's; the released launcher passes its LR
        warm-up length instead, see the SPAM spec).

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByResetWarmupState`.

    References:
      Huang et al., 2025, "SPAM", arXiv 2501.06842; code: github.com/TianjinYellow/SPAM-Optimizer
      (``galore_torch/SPAM.py`` at e8185fb, ``CosineDecay`` warm-up).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.scale_by_reset_warmup(every=5, warmup_steps=3)
      >>> s, out = tx.init(None), []
      >>> for _ in range(8):
      ...     u, s = tx.update(jnp.ones(1), s)
      ...     out.append(round(float(u[0]), 3))
      >>> out
      [1.0, 1.0, 1.0, 1.0, 0.01, 0.155, 0.505, 1.0]
    """

    def init_fn(params):
        del params
        return ScaleByResetWarmupState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        t = state.count + 1
        period = jnp.maximum(jnp.asarray(every, jnp.int32), 1)
        c = jnp.where(t >= period, t % period, warmup_steps + t).astype(jnp.float32)
        d = 0.99 * (1 + jnp.cos(jnp.pi * c / (warmup_steps + 1))) / 2
        scale = 1 - jnp.where(c < warmup_steps, d, 0.0)
        updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        return updates, ScaleByResetWarmupState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
