"""quantize_state: block-wise 8-bit storage of an inner transformation's statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_ext
from optax_ext.kernels import BlockQuantizer, SVDProjector, dequantize_blockwise, dynamic_map

Q0 = BlockQuantizer(min_size=0)


def _params():
    rng = np.random.default_rng(0)
    return {
        "big": jnp.asarray(rng.standard_normal((20, 30)), jnp.float32),  # 600 entries, 3 blocks
        "small": jnp.asarray(rng.standard_normal(10), jnp.float32),
    }


def _grads(seed, like):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), like)


def _dequantized(tree, signed, block_size=256):
    code = dynamic_map(signed)
    return jax.tree.map(
        lambda q: (
            dequantize_blockwise(q.codes, q.absmax, code, block_size=block_size)
            if isinstance(q, optax_ext.QuantizedArray)
            else q
        ),
        tree,
        is_leaf=lambda x: isinstance(x, optax_ext.QuantizedArray),
    )


def test_state_layout_and_min_size():
    params = _params()
    tx = optax_ext.quantize_state(optax_ext.scale_by_adam(), BlockQuantizer(min_size=100))
    state = jax.jit(tx.init)(params)
    inner = state.inner_state
    for field in (inner.mu, inner.nu):
        assert isinstance(field["big"], optax_ext.QuantizedArray)
        assert field["big"].codes.shape == (20, 30) and field["big"].codes.dtype == jnp.uint8
        assert field["big"].absmax.shape == (3,) and field["big"].absmax.dtype == jnp.float32
        assert field["small"].shape == (10,) and field["small"].dtype == jnp.float32
    assert inner.count.dtype == jnp.int32
    # zeros are stored as the code of 0 with absmax 0
    assert np.all(np.asarray(inner.mu["big"].codes) == 127)
    assert np.all(np.asarray(inner.nu["big"].codes) == 0)
    step = jax.jit(tx.update)
    new = step(_grads(1, params), state, params)[1]
    new = step(_grads(2, params), new, params)[1]
    chex.assert_trees_all_equal_structs(new, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    assert int(new.inner_state.count) == 2


def test_update_is_the_inner_update_on_the_dequantized_statistics():
    # The step uses the unquantized statistics of this step: quantization only affects the
    # next step. So each update equals the plain inner's update from the dequantized state.
    params = _params()
    inner = optax_ext.scale_by_adam()
    tx = optax_ext.quantize_state(inner, Q0)
    state = tx.init(params)
    update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
    for t in range(3):
        g = _grads(t, params)
        plain_state = optax_ext.ScaleByAdamState(
            count=state.inner_state.count,
            mu=_dequantized(state.inner_state.mu, True),
            nu=_dequantized(state.inner_state.nu, False),
        )
        want, fp32 = inner_update(g, plain_state)
        got, state = update(g, state)
        # two different XLA programs: equal up to how each contracts and fuses its arithmetic
        # (a few ulp); quantization errors are ~1e-2 of the statistics, 4 orders above this
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
        # the stored state is the float32 state of this step, rounded to the nearest code
        for name, signed in (("mu", True), ("nu", False)):
            stored = _dequantized(getattr(state.inner_state, name), signed)
            exact = getattr(fp32, name)
            for k in params:
                scale = float(jnp.abs(exact[k]).max())
                # half the largest gap of the maps (0.0141 at the top of the signed map)
                np.testing.assert_allclose(stored[k], exact[k], atol=0.0071 * scale, rtol=0)
    # signed map for mu (negative entries stay negative: sign fix), unsigned map for nu
    mu = _dequantized(state.inner_state.mu, True)["big"]
    assert np.all(np.sign(mu) == np.sign(fp32.mu["big"]))
    assert np.all(_dequantized(state.inner_state.nu, False)["big"] >= 0)


def test_non_finite_gradient_entries_are_skipped_and_reset():
    params = _params()
    tx = optax_ext.quantize_state(
        optax.chain(
            optax_ext.scale_by_adam(),
            optax.scale_by_learning_rate(0.1),
            optax_ext.add_decoupled_weight_decay(0.1, 0.1),
        ),
        Q0,
    )
    state = tx.init(params)
    _, state = tx.update(_grads(0, params), state, params)
    g = _grads(1, params)
    g["big"] = g["big"].at[0, 0].set(jnp.nan).at[5, 7].set(jnp.inf)
    g["small"] = g["small"].at[3].set(-jnp.inf)
    updates, state = jax.jit(tx.update)(g, state, params)
    chex.assert_tree_all_finite(updates)
    # the parameter entry is not updated at all (decay included) ...
    assert float(updates["big"][0, 0]) == float(updates["big"][5, 7]) == 0.0
    assert float(updates["small"][3]) == 0.0
    assert float(jnp.abs(updates["big"]).min(initial=1.0, where=jnp.isfinite(g["big"]))) > 0
    # ... and its statistics restart from zero, quantized or not; the rest of the block is kept
    mu = _dequantized(state.inner_state[0].mu, True)
    nu = _dequantized(state.inner_state[0].nu, False)
    for k, idx in (("big", (0, 0)), ("big", (5, 7)), ("small", 3)):
        assert float(mu[k][idx]) == float(nu[k][idx]) == 0.0
    assert float(state.inner_state[0].mu["big"].absmax[0]) > 0
    chex.assert_tree_all_finite(jax.tree.map(lambda x: x.astype(jnp.float32), state))
    updates, _ = tx.update(_grads(2, params), state, params)
    chex.assert_tree_all_finite(updates)


def test_fields_are_found_anywhere_and_masked_leaves_pass():
    params = _params()
    labels = {"big": "adam", "small": "sgd"}
    inner = optax.partition(
        {"adam": optax.chain(optax.clip(1.0), optax_ext.scale_by_adam()), "sgd": optax.sgd(0.1)},
        labels,
    )
    tx = optax_ext.quantize_state(inner, Q0)
    state = tx.init(params)
    adam_state = state.inner_state.inner_states["adam"].inner_state[1]
    assert isinstance(adam_state.mu["big"], optax_ext.QuantizedArray)
    assert isinstance(adam_state.mu["small"], optax.MaskedNode)
    g = _grads(0, params)
    want, _ = inner.update(g, inner.init(params), params)
    got, state2 = tx.update(g, state, params)
    chex.assert_trees_all_close(got, want, atol=1e-7)
    chex.assert_trees_all_equal_structs(state2, state)


def test_extra_args_are_forwarded():
    def scale_by_factor():
        def update_fn(updates, state, params=None, *, factor):
            del params
            return jax.tree.map(lambda u: u * factor, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)

    tx = optax_ext.quantize_state(optax.chain(optax_ext.scale_by_adam(), scale_by_factor()), Q0)
    g = jnp.ones(300)
    u, _ = jax.jit(tx.update)(g, tx.init(g), factor=3.0)
    np.testing.assert_allclose(u, 3.0, rtol=1e-4)


def test_bf16_params_keep_bf16_updates_and_state():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    tx = optax_ext.quantize_state(optax_ext.scale_by_adam(), BlockQuantizer(min_size=100))
    state = tx.init(params)
    assert state.inner_state.mu["small"].dtype == jnp.bfloat16
    u, new = jax.jit(tx.update)(_grads(0, params), state, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)


def test_errors():
    with pytest.raises(ValueError, match="not in fields"):
        optax_ext.quantize_state(optax_ext.scale_by_adam(), fields=("nu",), signed=("mu",))
    with pytest.raises(ValueError, match="none of the fields"):
        optax_ext.quantize_state(optax.sgd(0.1)).init(_params())
    with pytest.raises(ValueError, match=r"\['big'\].*int32"):
        optax_ext.quantize_state(optax_ext.scale_by_adam(), Q0).init(
            {"big": jnp.zeros(5, jnp.int32)}
        )


def test_orbax_round_trip_of_a_quantized_state(tmp_path):
    params = _params()
    tx = optax_ext.quantize_state(optax_ext.scale_by_adam(), Q0)
    _, state = tx.update(_grads(0, params), tx.init(params))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(
        tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    )
    assert restored.inner_state.mu["big"].codes.dtype == jnp.uint8
    chex.assert_trees_all_equal(restored, state)


def _track(make_inner, steps=50):
    """Loss curves of ``make_inner()`` and its quantized version on a small two-layer model."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k1, (128, 16))
    y = jnp.tanh(x @ jax.random.normal(k2, (16, 8)))
    p0 = {"w1": jax.random.normal(k3, (16, 32)) / 4, "w2": jax.random.normal(k4, (32, 8)) / 6}

    def loss(p):
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    def curve(tx):
        def body(carry, _):
            p, s = carry
            value, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), value

        return jax.lax.scan(body, (p0, tx.init(p0)), None, length=steps)[1]

    full = jax.jit(lambda: curve(make_inner()))()
    quantized = jax.jit(lambda: curve(optax_ext.quantize_state(make_inner(), Q0)))()
    return np.asarray(full), np.asarray(quantized)


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda: optax_ext.column_normalize(projector=SVDProjector(rank=None, update_every=10)),
        lambda: optax_ext.project_low_rank(
            optax_ext.scale_by_adam(), SVDProjector(rank=4, update_every=10)
        ),
    ],
    ids=["column_normalize", "project_low_rank(scale_by_adam)"],
)
def test_composes_with_matrix_primitives_and_tracks_full_precision(make_inner):
    # Their moments are named mu/nu (projected or rotated, nu non-negative), so they are found
    # and quantized; 50 steps at lr 0.01 track the float32 run (measured gaps 2% and 7%).
    full, quantized = _track(lambda: optax.chain(make_inner(), optax.scale_by_learning_rate(1e-2)))
    assert quantized[-1] < 0.3 * full[0]
    np.testing.assert_allclose(quantized, full, rtol=0.1)
