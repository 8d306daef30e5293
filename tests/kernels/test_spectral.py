"""Spectral constraint kernels against the reference golden (``modula/atom.py``) and properties.

The golden stores every map applied to A = 3 w1 (32 x 64) and B = 3 w2 (64 x 16) in the
reference's ``(fan_out, fan_in)`` layout; kernels take any ``(m, n)``, so they are called on the
stored arrays as they are (the primitives transpose flax kernels into that layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_golden

from optax_ext.kernels import spectral

ARRAYS, META = load_golden("lipschitz")
KEY = jax.random.PRNGKey(0)
ALPHA = META["soft_cap_alpha_used"]

MAPS = {
    "hard_cap": lambda x: spectral.spectral_hard_cap(x),
    "soft_cap": lambda x: spectral.spectral_soft_cap(x, ALPHA),
    "pure_svd": lambda x: spectral.svd_cap(x, w_max=1.0),
    "spectral_hammer": lambda x: spectral.spectral_hammer(x, KEY, w_max=1.0),
    "spectral_normalize": lambda x: spectral.spectral_normalize(x, KEY),
    "spectral_weight_decay": lambda x: spectral.spectral_weight_decay(x, KEY, spectral_wd=0.1),
    "orthogonalize": lambda x: spectral.lipschitz_orthogonalize(x),
}


def svals(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


@pytest.mark.parametrize("matrix", ["A", "B"])
@pytest.mark.parametrize("name", list(MAPS))
def test_maps_match_the_reference(matrix, name):
    x = jnp.asarray(ARRAYS[f"{matrix}/input"])
    out = jax.jit(MAPS[name])(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(out, ARRAYS[f"{matrix}/{name}"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(svals(out), ARRAYS[f"{matrix}/svals_{name}"], atol=1e-5)


@pytest.mark.parametrize("matrix", ["A", "B"])
def test_power_iteration_matches_the_reference(matrix):
    x = jnp.asarray(ARRAYS[f"{matrix}/input"])
    u, sigma, v = jax.jit(spectral.power_iteration)(x, KEY)
    np.testing.assert_allclose(sigma, ARRAYS[f"{matrix}/power_sigma"], atol=1e-5)
    np.testing.assert_allclose(u, ARRAYS[f"{matrix}/power_u"], atol=1e-5)
    np.testing.assert_allclose(v, ARRAYS[f"{matrix}/power_v"], atol=1e-5)
    np.testing.assert_allclose(x @ v, sigma * u, atol=0.05 * float(sigma))  # not converged
    # 16 steps underestimate (3.59 vs 3.72 for A); many steps converge
    _, sigma_long, _ = spectral.power_iteration(x, KEY, steps=500)
    np.testing.assert_allclose(sigma_long, svals(x)[0], rtol=1e-4)


def test_power_iteration_start_depends_on_the_layout():
    """The start is drawn for (m, n) as given: the transposed matrix gets another start, so the
    primitives pass the reference's (fan_out, fan_in) view."""
    x = jnp.asarray(ARRAYS["A/input"])
    _, s1, _ = spectral.power_iteration(x, KEY)
    _, s2, _ = spectral.power_iteration(x.T, KEY)
    assert abs(float(s1) - float(s2)) > 1e-4


@pytest.mark.parametrize("index", range(5))
def test_soft_cap_coupling_table(index):
    w_max, wd, u, alpha = ARRAYS[f"coupling/{index}"]
    got = jax.jit(spectral.soft_cap_coupling)(w_max, wd, u)
    np.testing.assert_allclose(got, alpha, rtol=2e-6)  # the reference solves in float32 (eig)
    k = w_max * (1 - wd) + u
    np.testing.assert_allclose(k - got * k**3 + got * (k - got * k**3) ** 3, w_max, rtol=1e-5)


def test_soft_cap_coupling_fallbacks_and_batching():
    # k == w_max: nothing to cap; k < w_max (u < w_max wd): no non-negative root -> 1
    np.testing.assert_array_equal(spectral.soft_cap_coupling(1.0, 0.0, 0.0), 0.0)
    np.testing.assert_array_equal(spectral.soft_cap_coupling(1.0, 0.1, 0.001), 1.0)
    # tiny k (root beyond alpha = 1) -> 1, as the reference's padded minimum
    np.testing.assert_array_equal(spectral.soft_cap_coupling(0.1, 0.0, 0.5), 1.0)
    batch = spectral.soft_cap_coupling(jnp.array([1.0, 2.0]), 0.0, jnp.array([0.1, 0.1]))
    np.testing.assert_allclose(batch, [0.15886441, 0.03060984], rtol=2e-6)


def test_soft_cap_keeps_singular_values_up_to_k_below_w_max():
    w_max, u = 1.0, 0.1
    alpha = spectral.soft_cap_coupling(w_max, 0.0, u)
    s = jnp.linspace(0.0, w_max + u, 50)
    out = svals(spectral.spectral_soft_cap(jnp.diag(s), alpha))
    assert out.max() <= w_max + 1e-5
    np.testing.assert_allclose(out.max(), w_max, rtol=1e-5)  # k maps exactly to w_max


def test_dualized_gradient_matches_the_reference():
    """``Linear.dualize``: orthogonalize(grad) * sqrt(fan_out / fan_in), golden step input."""
    grad = jnp.asarray(ARRAYS["step/grad"])  # (fan_out, fan_in) = (32, 64)
    got = spectral.lipschitz_orthogonalize(grad) * np.sqrt(32 / 64)
    np.testing.assert_allclose(got, ARRAYS["step/dualized"], atol=1e-5)
    # the result is orientation-free: the flax (fan_in, fan_out) view gives the transpose
    np.testing.assert_allclose(
        spectral.lipschitz_orthogonalize(grad.T).T, got / np.sqrt(0.5), atol=1e-5
    )


def test_batched_maps_equal_per_matrix_calls():
    x = jnp.stack([jnp.asarray(ARRAYS["A/input"]), 0.5 * jnp.asarray(ARRAYS["A/input"])[::-1]])
    for name, fn in MAPS.items():
        np.testing.assert_allclose(fn(x)[1], fn(x[1]), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", list(MAPS))
def test_zero_matrices_stay_zero_and_finite(name):
    out = MAPS[name](jnp.zeros((8, 4)))
    assert bool(jnp.all(jnp.isfinite(out)))
    if name != "spectral_hammer":  # hammer: u = v = 0, so the zero matrix stays zero too
        np.testing.assert_array_equal(out, 0.0)
    u, sigma, v = spectral.power_iteration(jnp.zeros((8, 4)), KEY)
    assert float(sigma) == 0.0 and not jnp.any(jnp.isnan(u)) and not jnp.any(jnp.isnan(v))


@pytest.mark.parametrize("name", list(MAPS))
def test_bf16_inputs(name):
    x = jnp.asarray(ARRAYS["B/input"])
    out = MAPS[name](x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    # bf16 matmuls drift (the spec's "bf16 maps drift"); the map is still recognisable
    np.testing.assert_allclose(
        svals(out.astype(jnp.float32))[0], ARRAYS[f"B/svals_{name}"][0], rtol=0.05
    )


def test_rms_cap_caps_or_normalises_token_vectors():
    e = jnp.array([[3.0, 4.0], [0.01, 0.0], [0.5, 0.5]])
    rms = lambda x: np.sqrt(np.mean(np.asarray(x) ** 2, axis=-1))  # noqa: E731
    np.testing.assert_allclose(rms(spectral.rms_cap(e)), [1.0, rms(e)[1], 0.5], rtol=1e-6)
    inflated = spectral.rms_cap(e, max_inflation=16.0)  # unit RMS, small rows at most 16x
    np.testing.assert_allclose(rms(inflated), [1.0, 16 * rms(e)[1], 1.0], rtol=1e-6)
    np.testing.assert_allclose(spectral.rms_cap(e.T, axis=-2), spectral.rms_cap(e).T)
