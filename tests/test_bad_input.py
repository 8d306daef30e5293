"""Bad input, checked on every registered recipe (tests/registry.py).

One parameter tree holds the awkward leaves (zero-size, 1x1, 1xN, Nx1, 3-D, 4-D, a larger matrix
next to the small transformer tree) and one jitted step (under ``optax.apply_if_finite``) runs a
fixed sequence of gradients through it: regular, zero, one non-finite entry, regular, 1e20-scale,
regular. Each check reads the recorded run; the step is the one the convention checks run
(tests/recipe_steps.py), so every recipe compiles once per dtype.

Defined behaviour:
- zero-size leaves get zero-size updates and a state whose structure, shapes and dtypes do not
  change; they never reach a matrix kernel (no division by a zero dimension);
- zero gradients give finite updates;
- a non-finite gradient is propagated by the recipes (as optax's); ``optax.apply_if_finite``
  skips that step, leaving the recipe's state untouched, and the next step is finite;
- 1e20-scale gradients give finite updates, at the spike and after it;
- float16 parameters give finite float16 updates (or a ValueError naming the leaf);
- an update whose shape differs from its parameter (e.g. transposed) raises at trace time.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import quadratic_target, small_params, strict_xfail
from recipe_steps import BY_NAME, extra_args, float32_step, grads_at, odd_params
from registry import RECIPES

IDS = [e.name for e in RECIPES]

EMPTY = ("empty_in", "empty_out", "empty_stack", "empty_bias")
# steps of the recorded run: which gradient is fed
SCHEDULE = ("regular", "regular", "zero", "nonfinite", "regular", "huge", "regular")
HUGE = 1e20

# Primitive chains run in the parameters' dtype (their AdamW fallback is optax.adamw, which
# divides 0 by 0 in float16 too); the recipes wrap themselves in float32 on float16 leaves.
FLOAT16_NAN = {
    "chain:momentum+orthogonalize+scale_by_shape",
    "chain:column_normalize",
    "chain:project_low_rank(svd)",
    "chain:project_low_rank(random)",
    "chain:momentum_reset+clip_spikes",
}


def _gradient(kind, g):
    if kind == "zero":
        return jax.tree.map(jnp.zeros_like, g)
    if kind == "huge":
        return jax.tree.map(lambda x: (x * HUGE).astype(x.dtype), g)
    if kind == "nonfinite":
        g["blocks"]["attn"]["kernel"] = g["blocks"]["attn"]["kernel"].at[0, 0].set(jnp.nan)
    return g


@functools.cache
def recorded(name: str):
    """(init state, [(updates, state) per step of SCHEDULE]) of the recipe on ``odd_params``."""
    entry = BY_NAME[name]
    tx, params, target, step = float32_step(name)
    state0 = state = jax.jit(tx.init)(params)
    for _ in range(entry.noop_calls):  # calls that only build state (SOAP, 1-bit Adam)
        g = grads_at(params, target)
        _, state, _ = step(params, state, g, extra_args(entry, 0, params, g))
    out = []
    for t, kind in enumerate(SCHEDULE):
        g = _gradient(kind, grads_at(params, target))
        params, state, updates = step(params, state, g, extra_args(entry, t, params, g))
        out.append((updates, state))
    return state0, out


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _steps(kind):
    return [i for i, k in enumerate(SCHEDULE) if k == kind]


@pytest.mark.parametrize("name", IDS)
def test_zero_size_leaves_pass_through_with_stable_state(name):
    state0, run = recorded(name)
    params = odd_params()
    for updates, state in run:
        for leaf in EMPTY:
            got = next(iter(updates["blocks"][leaf].values()))
            assert got.shape == next(iter(params["blocks"][leaf].values())).shape
        chex.assert_trees_all_equal_structs(state0, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)


@pytest.mark.parametrize("name", IDS)
def test_tiny_and_nd_leaves_give_finite_updates(name):
    # 1x1, 1x8, 8x1, (2, 4, 8), (3, 3, 4, 8) and (48, 64) next to the regular tree
    _, run = recorded(name)
    for t in _steps("regular"):
        assert _finite(run[t][0]), f"step {t}"


@pytest.mark.parametrize("name", IDS)
def test_zero_gradients_give_finite_updates(name):
    _, run = recorded(name)
    (t,) = _steps("zero")
    assert _finite(run[t])


@pytest.mark.parametrize("name", IDS)
def test_nonfinite_gradient_step_is_skipped_by_apply_if_finite(name):
    _, run = recorded(name)
    (t,) = _steps("nonfinite")
    updates, state = run[t]
    assert int(state.notfinite_count) == 1
    chex.assert_trees_all_equal(jax.tree.map(jnp.zeros_like, updates), updates)
    chex.assert_trees_all_equal(run[t - 1][1].inner_state, state.inner_state)
    assert _finite(run[t + 1][0])


@pytest.mark.parametrize("name", IDS)
def test_huge_gradients_give_finite_updates(name):
    _, run = recorded(name)
    (t,) = _steps("huge")
    assert _finite(run[t][0]), "at the spike"
    assert _finite(run[t + 1][0]), "after the spike"


@pytest.mark.parametrize("name", strict_xfail(IDS, FLOAT16_NAN, "float16 chain: NaN"))
def test_float16_params_give_finite_float16_updates(name):
    entry = BY_NAME[name]
    params = small_params(jnp.float16)
    target = quadratic_target(params)
    tx = optax.with_extra_args_support(entry.factory(**entry.kwargs))
    step = jax.jit(lambda g, s, p, extra: tx.update(g, s, p, **extra))
    try:
        state = tx.init(params)
        for t in range(2 + entry.noop_calls):
            g = grads_at(params, target)
            updates, state = step(g, state, params, extra_args(entry, t, params, g))
            params = optax.apply_updates(params, updates)
    except ValueError as e:  # the alternative to working: an error naming the leaf
        assert "parameter [" in str(e) and "float16" in str(e)
        return
    for u in jax.tree.leaves(updates):
        assert u.dtype == jnp.float16
    assert _finite(updates)
    assert _finite(params)


def _transposed_update(name):
    entry = BY_NAME[name]
    params = small_params()
    tx = optax.with_extra_args_support(entry.factory(**entry.kwargs))
    grads = jax.tree.map(jnp.ones_like, params)
    grads["blocks"]["attn"]["kernel"] = jnp.ones((16, 8))  # the (8, 16) parameter, transposed
    state = jax.eval_shape(tx.init, params)
    extra = extra_args(entry, 0, params, jax.tree.map(jnp.ones_like, params))
    for _ in range(1 + entry.noop_calls):
        _, state = jax.eval_shape(lambda g, s, p: tx.update(g, s, p, **extra), grads, state, params)


@pytest.mark.parametrize("name", IDS)
def test_transposed_gradient_is_rejected(name):
    with pytest.raises((ValueError, TypeError)):
        _transposed_update(name)


PROJECTION = ["galore", "fira", "apollo", "apollo:svd", "apollo_mini", "conda"]


@pytest.mark.parametrize("name", PROJECTION)
def test_projection_recipes_name_the_leaf_and_shapes(name):
    with pytest.raises(ValueError) as e:
        _transposed_update(name)
    msg = str(e.value)
    assert "['blocks']['attn']['kernel']" in msg and "(16, 8)" in msg and "(8, 16)" in msg


def test_apollo_mini_rejects_a_transposed_row_vector_state():
    # the case: a (1, 128) parameter fed a (128, 1) gradient broadcast its state
    tx = BY_NAME["apollo_mini"].factory(**BY_NAME["apollo_mini"].kwargs)
    params = {"blocks": {"w": {"kernel": jnp.ones((1, 32))}}}
    state = tx.init(params)
    g = {"blocks": {"w": {"kernel": jnp.ones((32, 1))}}}
    with pytest.raises(ValueError, match=r"\(32, 1\).*\(1, 32\)"):
        tx.update(g, state, params)


def test_stable_spam_norm_does_not_overflow_and_matches_the_plain_norm():
    from optax_ext.primitives.spikes import _norm

    x = jnp.asarray(np.random.RandomState(0).randn(64, 48).astype(np.float32))
    assert float(_norm(x)) == float(jnp.sqrt(jnp.sum(x * x)))  # bit-identical where finite
    plain = float(jnp.sqrt(jnp.sum(x * x)))
    np.testing.assert_allclose(float(_norm(x * 1e30)), plain * 1e30, rtol=1e-6)
    assert float(_norm(jnp.zeros((0, 8)))) == 0.0
