"""COSMOS against the authors' code (goldens/cosmos.*)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_golden, matrix_layout, replay, run_sequences

import optax_ext
from optax_ext import OnlinePCA
from optax_ext.kernels import NewtonSchulz

COSMOS, META = load_golden("cosmos")
NS32 = NewtonSchulz.muon(dtype="float32")


def make(lr=1e-3, wd=0.0, nesterov=True, ns=NS32):
    return optax_ext.cosmos(
        lr,
        0.95,
        0.95,
        1e-8,
        wd,
        lr_ratio=0.2,
        gamma=0.2,
        subspace=OnlinePCA(rank=4),
        nesterov=nesterov,
        ns=ns,
    )


@pytest.mark.parametrize(
    "run,kwargs",
    [
        ("fp32_wd0", {}),
        ("fp32_nonesterov_wd0", dict(nesterov=False)),
        ("readme_fp32", dict(lr=2e-3, wd=0.1)),
    ],
)
def test_golden_fp32(run, kwargs):
    init, grads, expected = run_sequences(COSMOS, run, layout=matrix_layout)
    replay(make(**kwargs), init, grads, expected, atol=1e-5)


def test_golden_bf16_newton_schulz():
    """bf16 NS: within 4x the reference's own bf16-vs-fp32 gap (5.1e-4, json)."""
    init, grads, expected = run_sequences(COSMOS, "bf16_wd0", layout=matrix_layout)
    replay(
        make(ns=NewtonSchulz.muon()),
        init,
        grads,
        expected,
        atol=4 * META["bf16_vs_fp32_max_abs_diff"],
    )


def test_basis_and_gram_track_the_reference_up_to_signs():
    init, grads, _ = run_sequences(COSMOS, "fp32_wd0", layout=matrix_layout)
    tx = make()
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(12):
        g = {k: jnp.asarray(v[t]) for k, v in grads.items()}
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        core = state.inner_states["hidden"].inner_state[0]
        for k in ("w1", "w2", "w3"):
            p, ref = np.asarray(core.basis[k]), COSMOS[f"P/{k}"][t]
            # P P^T is sign-free; S = P^T (...) P transforms with the signs of P's columns
            np.testing.assert_allclose(p @ p.T, ref @ ref.T, atol=1e-5)
            signs = np.sign(np.sum(p * ref, axis=0))
            s = np.asarray(core.gram[k]) * signs[:, None] * signs[None, :]
            np.testing.assert_allclose(s, COSMOS[f"GG/{k}"][t], rtol=1e-4, atol=1e-6)


def test_update_rms_and_rank_clamped_to_fan_in():
    rng = np.random.default_rng(0)
    g = {"w": jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)}
    tx = optax_ext.scale_by_cosmos(subspace=OnlinePCA(rank=3))
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(u["w"] ** 2)), 1.0, rtol=1e-5)
    tx = optax_ext.scale_by_cosmos(subspace=OnlinePCA(rank=8))  # fan-in 6: rank 6
    s = tx.init(g)
    assert s.basis["w"].shape == (6, 6) and s.nu["w"].shape == (10, 6)
    u, _ = tx.update(g, s)
    assert bool(jnp.isfinite(u["w"]).all())
    with pytest.raises(ValueError, match="OnlinePCA: rank must be a positive int, got 0"):
        OnlinePCA(rank=0)


def test_default_rank_on_a_small_model():
    """The default rank 64 on gpt2-tiny's matrices (fan-in 128 and 512) and on 16/32-wide
    ones: every hidden matrix gets min(64, fan_in) and a finite update."""
    from flax import nnx

    from models import gpt

    params = nnx.to_pure_dict(nnx.state(gpt.make_model("gpt2-tiny", n_layer=1), nnx.Param))
    params["small"] = {"kernel": jnp.ones((16, 32)) / 4}
    tx = optax_ext.cosmos()
    state = tx.init(params)
    core = state.inner_states["hidden"].inner_state[0]
    widths = {tuple(p.shape[-2:]) for p in jax.tree.leaves(core.basis)}
    assert (16, 16) in widths and all(r == min(64, n) for n, r in widths), widths
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_overflow_safe_basis(scale):
    """A gradient spike near the float32 range leaves the basis, the Gram EMA and every
    later update finite (G^T G and S are kept with a power-of-two exponent)."""
    rng = np.random.default_rng(0)
    tx = optax_ext.scale_by_cosmos(subspace=OnlinePCA(rank=3))
    g = lambda t: {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)}  # noqa: E731
    state = tx.init(g(0))
    update = jax.jit(tx.update)
    for t in range(6):
        gt = g(t)
        if t == 2:
            gt = {"w": gt["w"] * scale}
        u, state = update(gt, state)
        assert bool(jnp.isfinite(u["w"]).all()), t
        assert bool(jnp.isfinite(state.gram["w"]).all())
        assert bool(jnp.isfinite(state.basis["w"]).all())
    assert int(state.gram_exponent["w"]) > 0


def test_nonesterov_fix_uses_momentum_and_edge_cases():
    rng = np.random.default_rng(1)
    p = {"w": jnp.asarray(rng.standard_normal((6, 8)), jnp.float32), "b": jnp.zeros(8)}
    code = optax_ext.cosmos(nesterov=False, subspace=OnlinePCA(2))
    fixed = optax_ext.cosmos(
        nesterov=False, use_momentum_without_nesterov=True, subspace=OnlinePCA(2)
    )
    s1, s2 = code.init(p), fixed.init(p)
    g1 = jax.tree.map(lambda x: x + 1.0, p)
    g2 = jax.tree.map(lambda x: -x, p)
    code_update, fixed_update = jax.jit(code.update), jax.jit(fixed.update)
    _, s1 = code_update(g1, s1, p)
    _, s2 = fixed_update(g1, s2, p)
    u1, _ = code_update(g2, s1, p)
    u2, _ = fixed_update(g2, s2, p)
    assert not np.allclose(u1["w"], u2["w"])
    for x in (jnp.zeros((2, 6, 8)), jnp.ones((2, 6, 8), jnp.bfloat16)):
        tx = optax_ext.cosmos(subspace=OnlinePCA(2))
        u, _ = jax.jit(tx.update)({"stack": x}, tx.init({"stack": x}), {"stack": x})
        assert u["stack"].dtype == x.dtype and bool(jnp.isfinite(u["stack"]).all())
