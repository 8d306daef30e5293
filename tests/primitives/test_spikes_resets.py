"""clip_spikes and momentum_reset."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import optax_ext


@given(seed=st.integers(0, 10_000), theta=st.floats(0.5, 100.0))
def test_clip_bound_holds_exactly(seed, theta):
    rng = np.random.default_rng(seed)
    tx = optax_ext.clip_spikes(optax_ext.scale_by_adam(b2=0.9), threshold=theta)
    state = tx.init(jnp.zeros(64))
    _, state = tx.update(jnp.asarray(rng.standard_normal(64), jnp.float32), state)
    v_prev = np.asarray(state.inner_state.nu, np.float64)
    g = jnp.asarray(rng.standard_normal(64) * 1e3, jnp.float32)
    # recover the clipped gradient from the first moment: m = b1 m0 + (1 - b1) g'
    m0 = np.asarray(state.inner_state.mu, np.float64)
    _, state = tx.update(g, state)
    clipped = (np.asarray(state.inner_state.mu, np.float64) - 0.9 * m0) / 0.1
    bound = np.sqrt(theta * v_prev)
    assert np.all(np.abs(clipped) <= bound * (1 + 1e-5) + 1e-6)
    spiky = np.asarray(g) ** 2 > theta * v_prev
    np.testing.assert_allclose(np.abs(clipped[spiky]), bound[spiky], rtol=1e-4)
    np.testing.assert_allclose(clipped[~spiky], np.asarray(g)[~spiky], rtol=1e-4, atol=1e-3)


def test_clip_window_follows_reset_schedule():
    # every=5, grace=2: active at t in {2,3,4,7,8,9,12} (SPAM golden's window)
    tx = optax_ext.clip_spikes(
        optax_ext.scale_by_adam(b2=0.5), threshold=1.0, every=5, grace_steps=2
    )
    state = tx.init(jnp.zeros(1))
    active = []
    for t in range(1, 13):
        _, new = tx.update(jnp.array([10.0**t]), state)
        expected_nu = 0.5 * state.inner_state.nu + 0.5 * (10.0**t) ** 2
        active.append(bool(new.inner_state.nu[0] < 0.999 * expected_nu[0]))
        state = new
    assert [t for t, a in zip(range(1, 13), active) if a] == [2, 3, 4, 7, 8, 9, 12]


def test_clip_disabled_and_unseen_entries():
    tx = optax_ext.clip_spikes(optax_ext.scale_by_adam(), threshold=0.0)
    s = tx.init(jnp.zeros(2))
    _, s = tx.update(jnp.array([1.0, 1.0]), s)
    _, s = tx.update(jnp.array([1e6, 1.0]), s)
    assert float(s.inner_state.mu[0]) > 1e4
    tx = optax_ext.clip_spikes(optax_ext.scale_by_adam(), threshold=5.0)
    _, s = tx.update(jnp.array([3.0, 0.0]), tx.init(jnp.zeros(2)))  # v = 0: not clipped to 0
    assert float(s.inner_state.mu[0]) == pytest.approx(0.3)


def test_clip_requires_second_moment():
    with pytest.raises(ValueError, match="'nu'"):
        optax_ext.clip_spikes(optax.sgd(1.0)).init(jnp.zeros(2))


def test_reset_zeroes_exactly_on_schedule_and_only_named_fields():
    inner = optax.chain(optax_ext.scale_by_adam(), optax_ext.momentum(0.5))
    tx = optax_ext.momentum_reset(inner, every=3, fields=("nu",))
    s = tx.init(jnp.zeros(2))
    for t in range(1, 8):
        before = s
        _, s = tx.update(jnp.ones(2), s)
        adam, mom = s.inner_state[0], s.inner_state[1]
        prev_nu = before.inner_state[0].nu
        if t % 3 == 0:
            np.testing.assert_allclose(adam.nu, 0.001, rtol=1e-6)  # zeroed, then one EMA step
        else:
            np.testing.assert_allclose(adam.nu, 0.999 * prev_nu + 0.001, rtol=1e-6)
        assert int(adam.count) == t  # count untouched
        assert float(mom.mu[0]) >= 0.49 * (t > 0)  # the momentum buffer is never zeroed


def test_reset_count_field_and_validation():
    tx = optax_ext.momentum_reset(optax_ext.scale_by_adam(), every=2, fields=("mu", "nu", "count"))
    s = tx.init(jnp.zeros(1))
    for _ in range(4):
        _, s = tx.update(jnp.ones(1), s)
    assert int(s.inner_state.count) == 1
    with pytest.raises(ValueError, match="none of the fields"):
        optax_ext.momentum_reset(optax.sgd(1.0), every=2).init(jnp.zeros(1))


def test_reset_under_jit_with_injected_period():
    tx = optax.inject_hyperparams(
        lambda every: optax_ext.momentum_reset(optax_ext.scale_by_adam(), every=every)
    )(every=2)
    s = tx.init(jnp.zeros(1))
    step = jax.jit(tx.update)
    for _ in range(2):
        _, s = step(jnp.ones(1), s)
    np.testing.assert_allclose(s.inner_state.inner_state.mu, 0.1, rtol=1e-6)


_VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0]),  # ties and zeros
    st.floats(-2.0**66, 2.0**66, width=32, allow_subnormal=False).filter(
        lambda v: abs(v) >= 2.0**-66
    ),
)


@st.composite
def _rows_and_level(draw):
    rows, n = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 7, 16, 41]))
    x = np.array(draw(st.lists(_VALUES, min_size=rows * n, max_size=rows * n)), np.float32)
    level = draw(st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.floats(0.0, 1.0)))
    return x.reshape(rows, n), level


@settings(max_examples=30, deadline=None)
@given(case=_rows_and_level())
def test_abs_quantile_equals_numpy_bit_for_bit(case):
    """The sort-free quantile of clip_by_quantile is numpy.quantile (linear) exactly, ties,
    zeros, negative entries and one-entry rows included."""
    from optax_ext.primitives.spikes import _abs_quantile

    x, level = case
    want = np.quantile(np.abs(x), level, axis=1).astype(np.float32)
    # jitted as the recipes run it (one program per example; eager would compile each of its
    # ~30 passes per shape): test_abs_quantile_nan_rows_and_injected_level runs it eagerly
    got = jax.jit(_abs_quantile, static_argnums=1)(jnp.asarray(x), level)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_abs_quantile_nan_rows_and_injected_level():
    from optax_ext.primitives.spikes import _abs_quantile

    x = np.array([[1.0, np.nan, -2.0], [1.0, -2.0, 3.0]], np.float32)
    got = np.asarray(_abs_quantile(jnp.asarray(x), 0.9))
    np.testing.assert_array_equal(got, np.quantile(np.abs(x), 0.9, axis=1).astype(np.float32))
    assert np.isnan(got[0]) and got[1] == np.float32(2.8)
    # Under jit too (no fused multiply-add), over forty decades.
    rng = np.random.default_rng(0)
    jitted = jax.jit(_abs_quantile, static_argnums=1)
    for _ in range(20):
        normal = rng.standard_normal((3, 17))
        x = (normal * 10.0 ** rng.uniform(-30, 10, (3, 17))).astype(np.float32)
        want = np.quantile(np.abs(x), 0.9, axis=1).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(x), 0.9)), want)
    # A traced level (optax.inject_hyperparams) interpolates in float32: equal to rounding.
    x = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
    for level in (0.1, 0.5, 0.9, 0.97):
        got = jax.jit(_abs_quantile)(jnp.asarray(x), jnp.float32(level))
        np.testing.assert_allclose(got, np.quantile(np.abs(x), level, axis=1), rtol=1e-6)


def test_clip_by_quantile_under_inject_hyperparams():
    tx = optax.inject_hyperparams(optax_ext.clip_by_quantile)(quantile=0.5, offset=0.0)
    w = {"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}
    u, _ = jax.jit(tx.update)(w, tx.init(w))
    np.testing.assert_array_equal(np.asarray(u["w"]), [[1.0, -2.0], [2.5, -2.5]])
