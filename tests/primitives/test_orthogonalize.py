"""orthogonalize and scale_by_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import small_params

import optax_ext
from optax_ext import MatrixSpec
from optax_ext.kernels import NewtonSchulz, PolarSVD, newton_schulz

NS32 = NewtonSchulz(dtype="float32")


def hidden_only(params):
    return {
        "blocks": {
            "attn": {"kernel": params["blocks"]["attn"]["kernel"]},
            "mlp": {"kernel": params["blocks"]["mlp"]["kernel"]},
            "stack": params["blocks"]["stack"],
        }
    }


def test_matches_kernel_leaf_by_leaf_with_bucketing():
    rng = np.random.default_rng(0)
    g = {
        f"w{i}" if len(s) == 2 else "stack": jnp.asarray(rng.standard_normal(s), jnp.float32)
        for i, s in enumerate([(8, 16), (8, 16), (16, 8), (3, 8, 16)])
    }
    tx = optax_ext.orthogonalize(NS32)
    u, _ = jax.jit(tx.update)(g, tx.init(g))
    for k, x in g.items():
        np.testing.assert_allclose(u[k], newton_schulz(x, dtype="float32"), atol=1e-5)


def test_positive_scale_invariance_and_polar():
    x = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((8, 12)), jnp.float32)}
    tx = optax_ext.orthogonalize(PolarSVD())
    a, _ = tx.update(x, tx.init(x))
    b, _ = tx.update(jax.tree.map(lambda v: 37.0 * v, x), tx.init(x))
    np.testing.assert_allclose(a["w"], b["w"], atol=1e-5)
    np.testing.assert_allclose(a["w"] @ a["w"].T, np.eye(8), atol=1e-5)


def test_conv_spec_orthogonalizes_whole_kernel():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 4, 8)), jnp.float32)
    spec = MatrixSpec(fan_in_axes=(0, 1, 2), fan_out_axes=(3,))
    tx = optax_ext.orthogonalize(PolarSVD(), specs=spec)
    u, _ = tx.update({"conv": w}, tx.init({"conv": w}))
    m = np.asarray(u["conv"]).reshape(36, 8)
    np.testing.assert_allclose(m.T @ m, np.eye(8), atol=1e-5)
    # default view of a leaf under a conv name: the same whole-kernel matrix
    u2, _ = optax_ext.orthogonalize(PolarSVD()).update({"conv": w}, optax.EmptyState())
    np.testing.assert_allclose(u2["conv"], u["conv"], atol=1e-5)
    # MatrixSpec(): leading axes are batch -> each (4, 8) slice is orthogonalized on its own
    u3, _ = optax_ext.orthogonalize(PolarSVD(), specs=MatrixSpec()).update({"w": w}, None)
    np.testing.assert_allclose(u3["w"][1, 2] @ u3["w"][1, 2].T, np.eye(4), atol=1e-5)


def test_vector_leaf_error_names_path_shape_and_rule():
    tx = optax_ext.orthogonalize()
    with pytest.raises(ValueError, match=r"\['blocks'\]\['attn'\]\['bias'\].*\(16,\).*ndim >= 2"):
        tx.init(small_params())


def test_masked_leaves_pass_through_partition():
    params = small_params()
    tx = optax.partition(
        {"hidden": optax_ext.orthogonalize(NS32), "other": optax.identity()},
        optax_ext.labels.hidden_matrices,
    )
    g = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(u["blocks"]["attn"]["bias"], g["blocks"]["attn"]["bias"])
    assert not np.allclose(u["blocks"]["mlp"]["kernel"], 1.0)


def test_zero_finite_and_nonfinite_documented():
    params = hidden_only(small_params())
    tx = optax_ext.orthogonalize()
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
    # NaN propagates to its matrix only; optax.apply_if_finite skips the step.
    bad = jax.tree.map(jnp.ones_like, params)
    bad["blocks"]["mlp"]["kernel"] = bad["blocks"]["mlp"]["kernel"].at[0, 0].set(jnp.nan)
    u, _ = tx.update(bad, tx.init(params))
    assert bool(jnp.isnan(u["blocks"]["mlp"]["kernel"]).all())
    assert bool(jnp.isfinite(u["blocks"]["attn"]["kernel"]).all())
    safe = optax.apply_if_finite(optax.chain(tx, optax.sgd(0.1)), max_consecutive_errors=3)
    u, s = safe.update(bad, safe.init(params), params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
    assert int(s.notfinite_count) == 1


def test_bf16_updates_stay_bf16():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), hidden_only(small_params()))
    tx = optax_ext.orthogonalize()
    u, _ = tx.update(params, tx.init(params))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))


@pytest.mark.parametrize(
    "rule,shape,factor",
    [
        ("sqrt_fan_out_over_fan_in", (4, 16), 2.0),
        ("sqrt_fan_out_over_fan_in", (16, 4), 1.0),
        ("sqrt_max_dim", (4, 16), 4.0),
        ("moonlight", (16, 4), 0.8),
        ("none", (3, 5), 1.0),
    ],
)
def test_scale_by_shape_rules(rule, shape, factor):
    tx = optax_ext.scale_by_shape(rule)
    u, _ = tx.update({"stack": jnp.ones((2, *shape))}, tx.init(None))
    np.testing.assert_allclose(u["stack"], factor, rtol=1e-6)


def test_scale_by_shape_unknown_rule():
    with pytest.raises(ValueError, match="unknown shape rule"):
        optax_ext.scale_by_shape("kj_raw")
