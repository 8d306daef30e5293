"""Decoupled weight decay placed after the learning rate, before or after the update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax


class AddDecoupledWeightDecayState(NamedTuple):
    """State of :func:`add_decoupled_weight_decay`: the step ``count`` for schedules."""

    count: chex.Array


def add_decoupled_weight_decay(
    weight_decay: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule,
    *,
    after_update: bool = True,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
    """Decoupled weight decay ``W <- W (1 - lr * wd)``, applied before or after the step.

    Placed **after** ``scale_by_learning_rate`` in a chain, on the final update ``u``::

        after_update=True:   W_new = (W + u) (1 - lr wd)   i.e.  u <- u - lr wd (W + u)
        after_update=False:  W_new = W (1 - lr wd) + u     i.e.  u <- u - lr wd W

    The "after" form is HF ``AdamW``'s (``correct_bias=True`` path) and that of GaLore, Fira,
    APOLLO, Conda, SOAP and SPAM: decay the already-updated weights with the plain ``lr`` (not the
    bias-corrected step size). The "before" form equals ``optax.add_decayed_weights(wd)`` placed
    before the learning rate.

    Args:
      weight_decay: decay coefficient ``wd`` (scalar or schedule of the step count).
      learning_rate: ``lr`` (scalar or schedule), the same value the chain's learning-rate step
        uses; the decay is ``lr * wd`` per step.
      after_update: see above. Default True.
      mask: a tree of booleans or a function ``params -> tree``, as ``optax.add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformation`` that needs ``params``.

    Raises:
      ValueError: if ``update`` is called without ``params``.

    References:
      Loshchilov & Hutter, 2019, arXiv 1711.05101; HF transformers ``AdamW`` (as vendored by
      GaLore ``galore_torch/adamw.py``).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.add_decoupled_weight_decay(0.5, 0.1)
      >>> u, _ = tx.update(jnp.array([-1.0]), tx.init(None), jnp.array([3.0]))
      >>> round(float(u[0]), 6)   # (3 - 1) * (1 - 0.05) - 3
      -1.1
    """

    def init_fn(params):
        del params
        return AddDecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decoupled_weight_decay needs params: call update(g, s, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        wd = weight_decay(state.count) if callable(weight_decay) else weight_decay
        rate = lr * wd

        def decay(u, p):
            base = p + u if after_update else p
            return (u - rate * base).astype(u.dtype)

        updates = jax.tree.map(decay, updates, params)
        return updates, AddDecoupledWeightDecayState(count=optax.safe_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)
