"""momentum and scale_by_adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext

G = [np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, -1.0]), np.array([-1.0, 0.0, 2.0])]


def run(tx, grads=G, params=None):
    params = jnp.zeros(3) if params is None else params
    state = tx.init(params)
    outs = []
    for g in grads:
        u, state = tx.update(jnp.asarray(g, params.dtype), state, params)
        outs.append(np.asarray(u, np.float64))
    return outs, state


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_forms(ema, nesterov):
    b = 0.9
    outs, _ = run(optax_ext.momentum(b, nesterov=nesterov, ema=ema))
    m = np.zeros(3)
    for g, u in zip(G, outs):
        m = b * m + ((1 - b) * g if ema else g)
        want = (((1 - b) * g if ema else g) + b * m) if nesterov else m
        np.testing.assert_allclose(u, want, rtol=1e-6)


def test_momentum_dtype():
    outs, state = run(optax_ext.momentum(mu_dtype=jnp.bfloat16))
    assert state.mu.dtype == jnp.bfloat16
    _, state = run(optax_ext.momentum(), params=jnp.zeros(3, jnp.bfloat16))
    assert state.mu.dtype == jnp.bfloat16


def test_adam_standard_equals_optax():
    ours, s = run(optax_ext.scale_by_adam(0.9, 0.95, 1e-8, 1e-9))
    ref, _ = run(optax.scale_by_adam(0.9, 0.95, 1e-8, 1e-9))
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert int(s.count) == 3


@pytest.mark.parametrize("mode", ["hf", "none"])
def test_adam_hf_and_uncorrected(mode):
    b1, b2, eps = 0.9, 0.99, 1e-3
    outs, _ = run(optax_ext.scale_by_adam(b1, b2, eps, bias_correction=mode))
    m = v = np.zeros(3)
    for t, (g, u) in enumerate(zip(G, outs), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        want = m / (np.sqrt(v) + eps)
        if mode == "hf":
            want = want * np.sqrt(1 - b2**t) / (1 - b1**t)
        np.testing.assert_allclose(u, want, rtol=1e-5)


def test_adam_validation_and_zero_grads():
    with pytest.raises(ValueError, match="bias_correction"):
        optax_ext.scale_by_adam(bias_correction="torch")
    outs, _ = run(optax_ext.scale_by_adam(), grads=[np.zeros(3)] * 2)
    assert all(np.all(u == 0) for u in outs)


def test_adam_bf16_state_and_updates():
    outs, s = run(optax_ext.scale_by_adam(), params=jnp.zeros(3, jnp.bfloat16))
    assert s.mu.dtype == s.nu.dtype == jnp.bfloat16
    tx = optax_ext.scale_by_adam(nu_dtype=jnp.float32)
    u, s = jax.jit(tx.update)(jnp.ones(3, jnp.bfloat16), tx.init(jnp.zeros(3, jnp.bfloat16)))
    assert u.dtype == jnp.bfloat16 and s.nu.dtype == jnp.float32
