"""The compiled float32 step of every registered recipe, shared by the convention checks
(tests/test_conventions.py) and the bad-input checks (tests/test_bad_input.py).

One parameter tree, :func:`odd_params`, holds the small transformer tree and the awkward leaves
(zero-size, 1x1, 1xN, Nx1, 3-D, 4-D, a larger matrix); the recipe runs under
``optax.apply_if_finite`` (a trainer's guard against a non-finite step, transparent while the
gradients are finite) with an extra update argument it does not know. Both modules' checks of
one recipe run on one xdist worker (tests/conftest.py), so each recipe compiles this step once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from helpers import quadratic_loss, quadratic_target, small_params
from registry import RECIPES, Entry

BY_NAME = {e.name: e for e in RECIPES}
UNRELATED = {"unrelated_extra_arg": jnp.ones(3)}
MAX_CONSECUTIVE_ERRORS = 10


def odd_params(dtype=jnp.float32):
    """The small transformer tree plus zero-size, tiny, 3-D, 4-D and larger leaves."""
    p = small_params(dtype)
    k = jax.random.split(jax.random.PRNGKey(7), 6)
    n = lambda key, shape: (0.1 * jax.random.normal(key, shape)).astype(dtype)  # noqa: E731
    p["blocks"].update(
        empty_in={"kernel": jnp.zeros((0, 8), dtype)},
        empty_out={"kernel": jnp.zeros((8, 0), dtype)},
        empty_stack={"kernel": jnp.zeros((2, 0, 8), dtype)},
        empty_bias={"bias": jnp.zeros((0,), dtype)},
        one={"kernel": n(k[0], (1, 1))},
        row={"kernel": n(k[1], (1, 8))},
        col={"kernel": n(k[2], (8, 1))},
        heads={"kernel": n(k[3], (2, 4, 8))},
        conv={"kernel": n(k[4], (3, 3, 4, 8))},
        wide={"kernel": n(k[5], (48, 64))},
    )
    return p


def regular_part(tree):
    """The small transformer tree's part of an :func:`odd_params`-shaped tree (the added
    leaves dropped)."""
    blocks = small_params()["blocks"]
    return {**tree, "blocks": {k: v for k, v in tree["blocks"].items() if k in blocks}}


def extra_args(entry: Entry, step, params, grads):
    """The recipe's extra update arguments, plus one it does not know (always passed, so the
    'unknown extra arguments are ignored' check shares the compiled step)."""
    extra = entry.extra_args(step, params, grads) if entry.extra_args else {}
    return {**extra, **UNRELATED}


grads_at = jax.jit(jax.grad(quadratic_loss))


def jitted_step(tx: optax.GradientTransformationExtraArgs):
    """``tx``'s jitted ``step(params, state, grads, extra) -> (params, state, updates)``."""

    @jax.jit
    def step(params, state, grads, extra):
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, updates

    return step


@functools.cache
def float32_step(name: str):
    """``(tx, params, target, step)``: the recipe under ``optax.apply_if_finite`` on
    :func:`odd_params`, and its jitted ``step(params, state, grads, extra) -> (params, state,
    updates)``."""
    entry = BY_NAME[name]
    params = odd_params()
    # apply_if_finite passes extra arguments on (it wraps its inner with_extra_args_support)
    tx = optax.apply_if_finite(entry.factory(**entry.kwargs), MAX_CONSECUTIVE_ERRORS)
    return tx, params, quadratic_target(params), jitted_step(tx)
