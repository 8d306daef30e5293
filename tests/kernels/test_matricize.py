"""matricize / unmatricize / bucket_apply."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from optax_ext import MatrixSpec
from optax_ext.kernels import bucket_apply, matricize, matrix_shape, unmatricize


@st.composite
def array_and_spec(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axes = draw(st.permutations(range(ndim)))
    n_in = draw(st.integers(1, ndim - 1))
    n_out = draw(st.integers(1, ndim - n_in))
    spec = MatrixSpec(tuple(axes[:n_in]), tuple(axes[n_in : n_in + n_out]))
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape), spec


@given(array_and_spec())
def test_round_trip_and_shape(case):
    x, spec = case
    with jax.numpy_dtype_promotion("strict"):
        y = matricize(jnp.asarray(x), spec=spec)
        assert y.shape == matrix_shape(x.shape, spec)
        back = unmatricize(y, shape=x.shape, spec=spec)
    np.testing.assert_array_equal(np.asarray(back), x)


def test_default_spec_reads_last_two_axes_as_fan_in_fan_out():
    x = jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(matricize(x), x)
    conv = jnp.arange(2 * 2 * 3 * 5.0).reshape(2, 2, 3, 5)  # flax HWIO
    y = matricize(conv, spec=MatrixSpec(fan_in_axes=(0, 1, 2), fan_out_axes=(3,)))
    assert y.shape == (1, 12, 5)
    np.testing.assert_array_equal(y[0], conv.reshape(12, 5))


@pytest.mark.parametrize(
    "spec", [MatrixSpec((0,), (0,)), MatrixSpec((5,), (1,)), MatrixSpec((), (1,))]
)
def test_bad_spec_raises(spec):
    with pytest.raises(ValueError):
        matricize(jnp.zeros((2, 3)), spec=spec)


@pytest.mark.parametrize("jit", [False, True])
def test_bucketing_equals_leaf_by_leaf(jit):
    rng = np.random.default_rng(0)
    shapes = [(2, 4, 6), (1, 4, 6), (3, 6, 4), (1, 4, 6), (2, 5, 5)]
    items = [(jnp.asarray(rng.standard_normal(s), jnp.float32),) for s in shapes]
    calls = []

    def fn(x):
        calls.append(x.shape)
        return x @ jnp.swapaxes(x, -1, -2), 2 * x

    run = lambda it, stack: bucket_apply(fn, it, stack=stack)  # noqa: E731
    if jit:
        run = jax.jit(run, static_argnums=1)
    stacked = run(items, True)
    assert sorted(calls)[:3] == [(2, 5, 5), (3, 6, 4), (4, 4, 6)]  # one call per bucket
    per_leaf = run(items, False)
    for a, b in zip(stacked, per_leaf):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a[1], b[1])


def test_bucketing_static_joins_key():
    items = [(jnp.ones((1, 2, 2)),), (jnp.ones((1, 2, 2)),)]
    out = bucket_apply(lambda s, x: x * s, items, static=[2.0, 3.0])
    assert float(out[0][0, 0, 0]) == 2.0 and float(out[1][0, 0, 0]) == 3.0
