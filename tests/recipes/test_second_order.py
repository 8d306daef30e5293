"""Sophia and AdaHessian against the authors' code (goldens) and the estimators' properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_golden, matrix_layout, replay, run_sequences

import optax_ext
from optax_ext.kernels import gauss_newton_bartlett, hutchinson, spatial_average

SOPHIA, _ = load_golden("sophia")
ADAH, _ = load_golden("adahessian")


def to_ours_seq(a):
    """(T, out, in) PyTorch sequences -> (T, in, out); vectors unchanged."""
    return np.swapaxes(a, -1, -2) if a.ndim == 3 else a


def test_golden_sophia_g():
    init, grads, expected = run_sequences(SOPHIA, "gnb_wd0", layout=matrix_layout)
    est = {k: to_ours_seq(SOPHIA[f"gnb_wd0/gnb_grad/{k}"]) for k in init}

    def extra(t):  # 0-based t; refresh at 1-based steps 4, 7, 10 with estimates 0, 1, 2
        step = t + 1
        if step > 1 and (step - 1) % 3 == 0:
            j = (step - 1) // 3 - 1
            return {"hessian": {k: jnp.asarray(v[j] ** 2) for k, v in est.items()}}
        return {"hessian": {k: jnp.zeros_like(jnp.asarray(v[0])) for k, v in est.items()}}

    tx = optax_ext.sophia(1e-4, 0.965, 0.99, 0.04, 0.0, batch_size=25, update_every=3)
    replay(tx, init, grads, expected, atol=1e-5, extra_args=extra)


def hv_products(run):
    """v * (H v) of the golden quadratic: H v = D v + c rowsum(v) (PyTorch layout)."""
    out = {}
    for k in ("w1", "w2", "b"):
        v = ADAH[f"{run}/probe/{k}"]
        d = ADAH[f"hess_D/{k}"]
        rows = v.sum(axis=-1, keepdims=True)
        out[k] = to_ours_seq(v * (d * v + 0.005 * rows))
    return out


@pytest.mark.parametrize(
    "run,power,spatial",
    [("ic_wd0", 1.0, "none"), ("ic_pow0.5", 0.5, "none"), ("instr_wd0", 1.0, "row")],
)
def test_golden_adahessian(run, power, spatial):
    init, grads, expected = run_sequences(ADAH, run, layout=matrix_layout)
    hv = hv_products(run)
    tx = optax_ext.adahessian(0.1, 0.9, 0.999, 1e-4, hessian_power=power, spatial=spatial)
    replay(
        tx,
        init,
        grads,
        expected,
        atol=1e-5,
        extra_args=lambda t: {"hessian": {k: jnp.asarray(v[t]) for k, v in hv.items()}},
    )


def test_hutchinson_is_unbiased_and_hvp_matches():
    a = jnp.asarray(np.random.default_rng(0).standard_normal((5, 5)), jnp.float32)
    h = a @ a.T + jnp.eye(5)

    def loss(p):
        return 0.5 * p["x"] @ h @ p["x"]

    params = {"x": jnp.ones(5)}
    ests = jax.vmap(lambda k: hutchinson(loss, params, k)["x"])(
        jax.random.split(jax.random.PRNGKey(0), 4000)
    )
    np.testing.assert_allclose(ests.mean(0), jnp.diag(h), rtol=0.1, atol=0.2)
    gauss = jax.vmap(lambda k: hutchinson(loss, params, k, probe="gaussian")["x"])(
        jax.random.split(jax.random.PRNGKey(1), 4000)
    )
    np.testing.assert_allclose(gauss.mean(0), jnp.diag(h), rtol=0.15, atol=0.5)


def test_gnb_on_a_tiny_model():
    from flax import nnx

    model = nnx.Linear(4, 7, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))

    def logits(p):
        st = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(x)

    est = gauss_newton_bartlett(logits, params, jax.random.PRNGKey(1), max_norm=1.0)
    assert jax.tree.map(jnp.shape, est) == jax.tree.map(jnp.shape, params)
    assert all(bool(jnp.all(e >= 0)) and bool(jnp.isfinite(e).all()) for e in jax.tree.leaves(est))
    tx = optax_ext.sophia(1e-3, update_every=2, batch_size=8)
    s = tx.init(params)
    step = jax.jit(
        lambda g, s, p: tx.update(
            g, s, p, hessian_fn=lambda q: gauss_newton_bartlett(logits, q, jax.random.PRNGKey(2))
        )
    )
    for _ in range(3):
        u, s = step(params, s, params)
    assert float(jnp.abs(s[0].hessian["kernel"]).sum()) > 0


def test_missing_extras_zero_h_and_negative_h():
    tx = optax_ext.sophia()
    with pytest.raises(ValueError, match="hessian_fn"):
        tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
    with pytest.raises(ValueError, match="hessian_fn"):
        optax_ext.adahessian().update(
            jnp.ones(2), optax_ext.adahessian().init(jnp.zeros(2)), jnp.zeros(2)
        )
    h = optax_ext.scale_by_sophia(variant="h", update_every=1)
    s = h.init(jnp.zeros(2))
    _, s = h.update(jnp.ones(2), s, hessian=-jnp.ones(2))
    u, s = h.update(jnp.ones(2), s, hessian=-jnp.ones(2))  # negative estimate: guarded
    assert bool(jnp.all(u == 1.0))


def test_spatial_average_modes():
    d = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(spatial_average(d, "none"), d)
    np.testing.assert_allclose(spatial_average(d, "row")[0], d.mean(axis=0))
    np.testing.assert_allclose(spatial_average(d, 4).reshape(3, 4)[:, 0], [1.5, 5.5, 9.5])
    conv = jnp.ones((3, 3, 2, 4)).at[0, 0].set(10.0)
    np.testing.assert_allclose(spatial_average(conv)[1, 1], jnp.full((2, 4), 2.0))
    with pytest.raises(ValueError):
        spatial_average(d, 5)


def test_bf16_and_zero_gradients():
    p = {"w": jnp.ones((3, 4), jnp.bfloat16)}
    for tx in (optax_ext.sophia(update_every=1), optax_ext.adahessian()):
        s = tx.init(p)
        for _ in range(3):
            u, s = tx.update(
                jax.tree.map(jnp.zeros_like, p), s, p, hessian=jax.tree.map(jnp.ones_like, p)
            )
        assert u["w"].dtype == jnp.bfloat16 and bool(jnp.isfinite(u["w"]).all())
