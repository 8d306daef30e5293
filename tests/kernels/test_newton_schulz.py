"""Newton-Schulz iterations and the exact polar factor."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tol
from hypothesis import given

from optax_ext.kernels import (
    MUON_BAND,
    MUON_COEFFS,
    POLAR_EXPRESS_BAND,
    ROOT_COEFFS,
    NewtonSchulz,
    PolarSVD,
    newton_schulz,
    polar_svd,
)

SHAPES = [(8, 8), (8, 16), (24, 8), (32, 64)]


def with_spectrum(shape, s, seed):
    rng = np.random.default_rng(seed)
    m, n = shape
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * s) @ v.T).astype(np.float32), u, v


def scalar_map(s, coeffs):
    for a, b, c in coeffs:
        s = a * s + b * s**3 + c * s**5
    return s


PRESETS = [
    (NewtonSchulz.muon("float32"), MUON_BAND, [MUON_COEFFS] * 5),
    (NewtonSchulz.polar_express("float32"), POLAR_EXPRESS_BAND, None),
]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("preset,band,_", PRESETS)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_singular_values_within_documented_band(preset, band, _, jit, shape, seed):
    (lo_in, _hi_in), (lo_out, hi_out) = band
    k = min(shape)
    rng = np.random.default_rng(seed)
    # Spectrum whose Frobenius-normalised values all lie in the preset's input range.
    s = np.exp(rng.uniform(np.log(lo_in * np.sqrt(k) * 1.01), 0, k))
    x, _, _ = with_spectrum(shape, s / np.linalg.norm(s), seed)
    f = jax.jit(preset.apply) if jit else preset.apply
    with jax.numpy_dtype_promotion("strict"):
        y = f(jnp.asarray(x))
    sv = np.linalg.svd(np.asarray(y, np.float64), compute_uv=False)
    assert lo_out - 1e-3 <= sv.min() and sv.max() <= hi_out + 1e-3


@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_matches_scalar_polynomial_on_singular_values(shape, seed):
    k = min(shape)
    s = np.linspace(0.2, 1.0, k)
    x, u, v = with_spectrum(shape, s, seed)
    y = np.asarray(newton_schulz(jnp.asarray(x), dtype="float32", eps=0.0), np.float64)
    expected = (u * scalar_map(s / np.linalg.norm(s), [MUON_COEFFS] * 5)) @ v.T
    np.testing.assert_allclose(y, expected, atol=2e-5)


@pytest.mark.parametrize("jit", [False, True])
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_polar_svd_exact(jit, shape, seed):
    s = np.random.default_rng(seed).uniform(0.1, 3.0, min(shape))
    x, u, v = with_spectrum(shape, s, seed)
    f = jax.jit(polar_svd) if jit else polar_svd
    with jax.numpy_dtype_promotion("strict"):
        p = np.asarray(f(jnp.asarray(x)))
    np.testing.assert_allclose(p, u @ v.T, atol=1e-5)


def test_polar_svd_zero_and_rank_deficient():
    assert float(jnp.abs(polar_svd(jnp.zeros((4, 6)))).max()) == 0.0
    x, u, v = with_spectrum((6, 4), np.array([2.0, 1.0, 0.0, 0.0]), 0)
    np.testing.assert_allclose(polar_svd(jnp.asarray(x)), u[:, :2] @ v[:, :2].T, atol=1e-5)


@pytest.mark.parametrize("method", [NewtonSchulz(dtype="float32"), PolarSVD()])
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16), c=st.floats(1e-3, 1e3))
def test_invariant_to_positive_scaling(method, shape, seed, c):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    a = np.asarray(method.apply(jnp.asarray(x)))
    b = np.asarray(method.apply(jnp.asarray(np.float32(c) * x)))
    np.testing.assert_allclose(a, b, atol=5e-5)


@pytest.mark.parametrize("method", [NewtonSchulz(dtype="float32"), PolarSVD()])
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_transpose_equivariant(method, shape, seed):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
    np.testing.assert_allclose(method.apply(x.T), method.apply(x).T, **tol(jnp.float32))


def test_batched_equals_per_matrix_and_shapes():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8, 16)), jnp.float32)
    y = newton_schulz(x, dtype="float32")
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y[1, 2], newton_schulz(x[1, 2], dtype="float32"), atol=1e-6)


def test_bf16_close_to_fp32_and_keeps_dtype():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 32)), jnp.float32)
    y16 = newton_schulz(x.astype(jnp.bfloat16), dtype="bfloat16")
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y16, np.float32), newton_schulz(x, dtype="float32"), atol=5e-2
    )
    # fp32 input, bf16 compute (Muon's reference): fp32 output.
    assert newton_schulz(x).dtype == jnp.float32


def test_zero_stays_zero_and_nonfinite_propagates():
    assert float(jnp.abs(newton_schulz(jnp.zeros((4, 6)))).max()) == 0.0
    x = jnp.ones((2, 4, 4)).at[0, 1, 1].set(jnp.nan)
    y = newton_schulz(x, dtype="float32")
    assert bool(jnp.all(jnp.isnan(y[0]))) and bool(jnp.all(jnp.isfinite(y[1])))


def test_coefficient_validation():
    with pytest.raises(ValueError, match="2 per-step"):
        newton_schulz(jnp.ones((2, 2)), steps=5, coeffs=((1, 0, 0), (1, 0, 0)))
    with pytest.raises(ValueError, match="ndim >= 2"):
        newton_schulz(jnp.ones(3))


def test_shape_table_is_orientation_free():
    assert (
        ROOT_COEFFS.lookup(3072, 2048)
        == ROOT_COEFFS.lookup(2048, 3072)
        == (
            3.4509,
            -4.5790,
            1.9325,
        )
    )
    assert ROOT_COEFFS.lookup(64, 24) == MUON_COEFFS


def test_per_step_coefficients_applied_in_order():
    x = jnp.eye(2) * 0.5
    y = newton_schulz(x, steps=2, coeffs=((2, 0, 0), (1, 1, 0)), normalize=False, dtype="float32")
    # 0.5 -> 1.0 (a=2) -> 1 + 1 = 2 (a=1, b=1)
    np.testing.assert_allclose(y, 2 * jnp.eye(2), atol=1e-6)
