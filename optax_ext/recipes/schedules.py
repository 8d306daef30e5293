"""Learning-rate schedules from the papers: REX."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def rex_schedule(
    init_value: float,
    decay_steps: int,
    *,
    end_value: float = 0.0,
    warmup_steps: int = 0,
    beta: float = 0.5,
) -> optax.Schedule:
    """REX: a reflected-exponential decay profile for budgeted training.

    Algorithm (``z = min(t / T, 1)`` the fraction of the decay budget spent)::

        lr(t) = end + (init - end) (1 - z) / ((1 - beta) + beta (1 - z))

    ``beta = 1/2`` is the paper's REX (between linear, ``beta = 0``, and the sharp drop of
    ``beta -> 1``); it keeps the lr high for longer than linear decay and drops it quickly at
    the end. With ``warmup_steps``, a linear warm-up from 0 precedes it
    (``optax.join_schedules``).

    Args:
      init_value: peak learning rate.
      decay_steps: ``T``, the length of the decay.
      end_value: final learning rate. Default 0.
      warmup_steps: linear warm-up steps before the decay. Default 0.
      beta: profile parameter. Default 0.5.

    Returns:
      An ``optax.Schedule`` of the step count.

    References:
      Chen, Wolfe, Kyrillidis, 2022, "REX: Revisiting Budgeted Training with an Improved
      Schedule", MLSys 2022, arXiv 2107.04197.

    Example:
      >>> from optax_ext import rex_schedule
      >>> s = rex_schedule(1.0, 100)
      >>> [round(float(s(t)), 4) for t in (0, 50, 100)]
      [1.0, 0.6667, 0.0]
    """

    def rex(count):
        z = jnp.clip(jnp.asarray(count, jnp.float32) / decay_steps, 0.0, 1.0)
        return end_value + (init_value - end_value) * (1 - z) / ((1 - beta) + beta * (1 - z))

    if warmup_steps <= 0:
        return rex
    warm = optax.linear_schedule(0.0, init_value, warmup_steps)
    return optax.join_schedules([warm, rex], [warmup_steps])
