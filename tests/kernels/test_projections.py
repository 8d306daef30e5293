"""Projectors and projections."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from optax_ext.kernels import (
    FAN_IN,
    FAN_OUT,
    RandomProjector,
    SVDProjector,
    project,
    project_back,
    projected_axis,
    svd_basis,
)

SHAPES = [(1, 8, 8), (2, 8, 16), (3, 24, 8)]


def test_projected_axis_rules():
    assert projected_axis(8, 16, "std") == FAN_IN
    assert projected_axis(16, 8, "std") == FAN_OUT
    assert projected_axis(8, 8, "std") == FAN_IN  # ties: fan-in (GaLore 'std', square Linear)
    assert projected_axis(8, 8, "reverse_std") == FAN_OUT
    assert projected_axis(16, 8, "reverse_std") == FAN_IN
    assert projected_axis(16, 8, "fan_in") == FAN_IN
    with pytest.raises(ValueError):
        projected_axis(2, 2, "left")


@pytest.mark.parametrize("jit", [False, True])
@given(shape=st.sampled_from(SHAPES), rank=st.integers(1, 8), seed=st.integers(0, 999))
def test_svd_basis_orthonormal_top_singular_vectors(jit, shape, rank, seed):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
    for axis in (FAN_IN, FAN_OUT):
        f = jax.jit(svd_basis, static_argnames=("rank", "axis")) if jit else svd_basis
        with jax.numpy_dtype_promotion("strict"):
            q = f(x, rank=rank, axis=axis)
        d = shape[axis]
        assert q.shape == (shape[0], d, min(rank, min(shape[1:])))
        gram = jnp.swapaxes(q, -1, -2) @ q
        np.testing.assert_allclose(
            gram, np.broadcast_to(np.eye(q.shape[-1]), gram.shape), atol=1e-5
        )
        u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
        ref = u if axis == FAN_IN else np.swapaxes(vt, -1, -2)
        overlap = np.abs(np.swapaxes(ref[..., : q.shape[-1]], -1, -2) @ np.asarray(q))
        np.testing.assert_allclose(np.diagonal(overlap, axis1=-2, axis2=-1), 1.0, atol=1e-4)


@given(shape=st.sampled_from(SHAPES), rank=st.integers(1, 8), seed=st.integers(0, 999))
def test_projection_round_trip_stays_in_subspace(shape, rank, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    for axis in (FAN_IN, FAN_OUT):
        q = svd_basis(jnp.asarray(rng.standard_normal(shape), jnp.float32), rank=rank, axis=axis)
        p = project_back(project(x, q, axis=axis), q, axis=axis)
        assert p.shape == x.shape
        # idempotent: projecting the projection changes nothing
        p2 = project_back(project(p, q, axis=axis), q, axis=axis)
        np.testing.assert_allclose(p2, p, atol=1e-5)
        # an element of the subspace is reproduced exactly
        inside = project_back(project(x, q, axis=axis), q, axis=axis)
        np.testing.assert_allclose(
            project_back(project(inside, q, axis=axis), q, axis=axis), inside, atol=1e-5
        )


def test_random_projector_statistics_and_determinism():
    proj = RandomProjector(rank=64, update_every=10, seed=3)
    mats = [jnp.zeros((1, 128, 512)), jnp.zeros((1, 128, 512))]
    a = proj.bases(mats, count=jnp.asarray(0))
    b = proj.bases(mats, count=jnp.asarray(0))
    c = proj.bases(mats, count=jnp.asarray(10))
    assert a[0].shape == (1, 128, 64)  # fan-in is the smaller side
    np.testing.assert_array_equal(a[0], b[0])  # same seed, leaf and step
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[0], c[0])  # per leaf, per refresh
    assert abs(float(jnp.mean(a[0]))) < 0.01
    np.testing.assert_allclose(float(jnp.var(a[0])), 1 / 64, rtol=0.05)


def test_svd_projector_bucketed_equals_per_leaf_and_full_rank():
    rng = np.random.default_rng(0)
    mats = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(1, 6, 4), (2, 6, 4)]]
    proj = SVDProjector(rank=None, update_every=1)
    together = proj.bases(mats, count=jnp.asarray(0))
    alone = [proj.bases([m], count=jnp.asarray(0))[0] for m in mats]
    for t, a in zip(together, alone):
        assert t.shape[-2:] == (4, 4)  # full rank, smaller (fan-out) side
        np.testing.assert_allclose(np.abs(t), np.abs(a), atol=1e-5)
