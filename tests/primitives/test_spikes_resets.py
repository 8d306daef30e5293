"""clip_spikes and momentum_reset."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

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
