"""optax conventions, checked on every registered recipe (tests/registry.py).

Compiled steps are cached per (recipe, dtype) so the checks that can share one compilation do;
the float32 step is the one the bad-input checks record their run with (tests/recipe_steps.py:
the recipe under ``optax.apply_if_finite``, on the small tree plus awkward leaves).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import quadratic_loss, quadratic_target, small_params
from recipe_steps import (
    BY_NAME,
    extra_args,
    float32_step,
    grads_at,
    jitted_step,
    regular_part,
)
from registry import RECIPES

IDS = [e.name for e in RECIPES]


def compiled(name: str, dtype: str = "float32"):
    """(tx, params, target, jitted step) for a recipe; one compilation shared by several checks
    (float32: :func:`recipe_steps.float32_step`)."""
    return float32_step(name) if dtype == "float32" else _compiled(name, dtype)


@functools.cache
def _compiled(name: str, dtype: str):
    entry = BY_NAME[name]
    params = small_params(jnp.dtype(dtype))
    target = quadratic_target(params)
    tx = optax.with_extra_args_support(entry.factory(**entry.kwargs))
    return tx, params, target, jitted_step(tx)


def run_steps(name, n, dtype="float32", zero=False):
    entry = BY_NAME[name]
    tx, params, target, step = compiled(name, dtype)
    state = jax.jit(tx.init)(params)
    updates = None
    for t in range(n):
        g = grads_at(params, target)
        if zero:
            g = jax.tree.map(jnp.zeros_like, g)
        params, state, updates = step(params, state, g, extra_args(entry, t, params, g))
    return params, state, updates


def assert_same_structure_and_dtypes(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


@pytest.mark.parametrize("name", IDS)
def test_jit_init_update_and_state_stable(name):
    tx, params, _, _ = compiled(name)
    state0 = jax.jit(tx.init)(params)
    _, state, updates = run_steps(name, 2)
    assert_same_structure_and_dtypes(state0, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("name", IDS)
def test_no_recompilation_on_later_steps(name):
    _, _, _, step = compiled(name)
    run_steps(name, 1)
    size = step._cache_size()
    run_steps(name, 3)
    assert step._cache_size() == size


@pytest.mark.parametrize("name", IDS)
def test_descends_on_a_quadratic(name):
    """On the regular leaves: SGD-SaI scales a 1-element leaf's steps by |g| / eps (its
    reference's g-SNR with a zero std), which sends that leaf to overflow by design."""
    entry = BY_NAME[name]
    _, params0, target, _ = compiled(name)
    params, _, _ = run_steps(name, entry.descent_steps)
    loss = lambda p: float(quadratic_loss(regular_part(p), regular_part(target)))  # noqa: E731
    assert loss(params) < 0.9 * loss(params0)


@pytest.mark.parametrize("name", IDS)
def test_zero_gradients_stay_finite(name):
    params, state, updates = run_steps(name, 3, zero=True)
    chex.assert_tree_all_finite((params, updates))
    chex.assert_tree_all_finite(
        jax.tree.map(
            lambda x: x.astype(jnp.float32),
            [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)],
        )
    )


@pytest.mark.parametrize("name", IDS)
def test_bf16_params(name):
    params, state, updates = run_steps(name, 2, dtype="bfloat16")
    tx, params0, _, _ = compiled(name, "bfloat16")
    for u in jax.tree.leaves(updates):
        assert u.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(updates)
    assert_same_structure_and_dtypes(jax.jit(tx.init)(params0), state)


@pytest.mark.parametrize("name", IDS)
def test_unknown_extra_args_are_ignored(name):
    """Every compiled step of these checks passes an extra argument the recipe does not know
    (see ``recipe_steps.extra_args``); this runs one more step on the shared compilation."""
    _, _, updates = run_steps(name, 1)
    chex.assert_tree_all_finite(updates)


@functools.cache
def wrapped_run(name: str):
    """The recipe as trainers wrap it, compiled once for three conventions: hyperparameters
    injected into the state (``optax.inject_hyperparams``, no static arguments), gradients
    accumulated over two calls (``optax.MultiSteps``) and every call under ``lax.cond``.

    Returns the initial state, the ``(updates, state)`` of ``2 * (noop_calls + 1)`` calls with
    the update taken, the state of one more call with the update not taken, and the update
    emitted after the learning rate in the state is set to zero.
    """
    entry = BY_NAME[name]
    inner = optax.inject_hyperparams(entry.factory)(**entry.kwargs)
    tx = optax.MultiSteps(inner, every_k_schedule=2).gradient_transformation()
    params = small_params()
    g = grads_at(params, quadratic_target(params))

    @jax.jit
    def step(pred, state, extra):
        skip = lambda s: (jax.tree.map(jnp.zeros_like, g), s)  # noqa: E731
        return jax.lax.cond(pred, lambda s: tx.update(g, s, params, **extra), skip, state)

    state0 = state = tx.init(params)
    calls = []
    for call in range(2 * (entry.noop_calls + 1)):
        updates, state = step(True, state, extra_args(entry, call, params, g))
        calls.append((updates, state))
    _, kept = step(False, state, extra_args(entry, len(calls), params, g))
    hyper = state.inner_opt_state.hyperparams
    zero_lr = {k: (jnp.zeros_like(v) if "learning_rate" in k else v) for k, v in hyper.items()}
    state = state._replace(inner_opt_state=state.inner_opt_state._replace(hyperparams=zero_lr))
    for call in range(2):  # accumulate, then emit
        emitted, state = step(True, state, extra_args(entry, len(calls) + call, params, g))
    return state0, calls, kept, emitted


@pytest.mark.parametrize("name", IDS)
def test_inject_hyperparams_without_static_args(name):
    state0, calls, _, emitted = wrapped_run(name)
    assert "learning_rate" in state0.inner_opt_state.hyperparams
    for updates, _ in calls:
        chex.assert_tree_all_finite(updates)
    # zero, up to the rounding of recipes that re-project the weights at every step (the
    # Lipschitz constraint computes s * P(W / s), the identity in exact arithmetic): at most a
    # few ulp of the parameter, against updates of ~lr at any nonzero lr
    for leaf, p in zip(jax.tree.leaves(emitted), jax.tree.leaves(small_params())):
        ulp = np.finfo(np.float32).eps * float(np.abs(np.asarray(p, np.float32)).max(initial=0))
        np.testing.assert_allclose(np.asarray(leaf, np.float32), 0.0, rtol=0, atol=4 * ulp)


@pytest.mark.parametrize("name", IDS)
def test_multisteps_accumulates(name):
    noop_calls = BY_NAME[name].noop_calls
    _, calls, _, _ = wrapped_run(name)
    for call, (updates, _) in enumerate(calls):
        chex.assert_tree_all_finite(updates)
        nonzero = any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(updates))
        assert nonzero == (call % 2 == 1 and call // 2 >= noop_calls), call


@pytest.mark.parametrize("name", IDS)
def test_state_survives_lax_cond(name):
    state0, calls, kept, _ = wrapped_run(name)
    for _, state in calls:  # the update taken under lax.cond, from the first call on
        assert_same_structure_and_dtypes(state, state0)
    chex.assert_trees_all_equal(kept, calls[-1][1])  # and not taken: the state as it was


@pytest.mark.parametrize("name", IDS)
def test_orbax_round_trip(name, tmp_path):
    """The state restores exactly and continues exactly like the original.

    On the bfloat16 run (its state mixes bfloat16 and float32 leaves): the float32 run's tree
    holds zero-size parameters, and orbax saves no zero-size array (of a parameter or of its
    state)."""
    entry = BY_NAME[name]
    params, state, _ = run_steps(name, 2, dtype="bfloat16")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckpt.restore(tmp_path / "state", abstract)
    chex.assert_trees_all_equal(restored, state)
    assert_same_structure_and_dtypes(restored, state)
    _, _, target, step = compiled(name, "bfloat16")
    g = grads_at(params, target)
    e = extra_args(entry, 2, params, g)
    # orbax restores committed arrays, which jit caches apart from the uncommitted ones of the
    # run: continuing from the restored values (uncommitted) reuses the run's compiled step
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
    chex.assert_trees_all_equal(step(params, state, g, e), step(params, restored, g, e))
