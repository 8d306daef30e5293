"""Adam-family, sign and schedule recipes against the authors' code (goldens) and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_golden, matrix_layout, replay, run_sequences

import optax_ext


def golden(name, run):
    arrays, _ = load_golden(name)
    return arrays, run_sequences(arrays, run, layout=matrix_layout)


@pytest.mark.parametrize("run,rectify", [("rect_wd0", True), ("norect_wd0", False)])
def test_golden_adabelief(run, rectify):
    _, (init, grads, expected) = golden("adabelief", run)
    replay(optax_ext.adabelief(1e-3, rectify=rectify), init, grads, expected, atol=1e-5)


@pytest.mark.parametrize(
    "run,wd,nesterov",
    [("wd0", 0.0, False), ("si_wd0", 0.0, False), ("si_nesterov_wd0.1", 0.1, True)],
)
def test_golden_adamp(run, wd, nesterov):
    arrays, (init, grads, expected) = golden("adamp", run)
    tx = optax_ext.adamp(1e-3, weight_decay=wd, nesterov=nesterov)
    replay(tx, init, grads, expected, atol=1e-5)
    # the projection decisions match the reference's (0 none, 1 channel, 2 layer)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    for t in range(3):
        g = {k: jnp.asarray(v[t]) for k, v in grads.items()}
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        for k in ("w1", "w2"):
            assert int(state[0].projected[k]) == int(arrays[f"{run}/projected/{k}"][t])


@pytest.mark.parametrize("run,schedule", [("wd0", False), ("v1_wd0", True)])
def test_golden_exadam(run, schedule):
    _, (init, grads, expected) = golden("exadam", run)
    lr = optax_ext.exadam_v1_schedule(1e-3) if schedule else 1e-3
    replay(optax_ext.exadam(lr), init, grads, expected, atol=1e-5)


@pytest.mark.parametrize("schedule", [False, True])
def test_exadam_decays_with_the_plain_group_lr(schedule):
    # spec step 1: W <- W (1 - lr wd) with the group lr; v1's ln(sqrt(2 (k + 1))) scales the
    # update only (1.63 lr at step 12). Same updates with and without decay, so only the decay
    # term differs: float32 rounding of one product, hence the 1e-7 tolerance.
    lr, wd = 1e-2, 0.1
    lr_arg = optax_ext.exadam_v1_schedule(lr) if schedule else lr
    plain, decayed = optax_ext.exadam(lr_arg), optax_ext.exadam(lr_arg, weight_decay=wd)
    p = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    s0, s1 = plain.init(p), decayed.init(p)
    for t in range(12):
        g = jnp.cos(jnp.arange(6.0) + t).reshape(2, 3)
        u0, s0 = plain.update(g, s0, p)
        u1, s1 = decayed.update(g, s1, p)
    np.testing.assert_allclose(u1, u0 - lr * wd * p, atol=1e-7)


def test_golden_lion():
    _, (init, grads, expected) = golden("lion", "wd0")
    replay(optax_ext.lion(1e-4, 0.9, 0.99), init, grads, expected, atol=1e-5)


def test_golden_sgd_sai_and_gsnr():
    arrays, (init, grads, expected) = golden("sgd_sai", "wd0")
    tx = optax_ext.sgd_sai(1e-3, 0.9, 0.0)
    replay(tx, init, grads, expected, atol=1e-5)
    state = tx.init(init)
    _, state = tx.update({k: jnp.asarray(v[0]) for k, v in grads.items()}, state, init)
    for k in ("w1", "w2", "b"):
        np.testing.assert_allclose(state[0].gsnr[k], arrays[f"wd0/gsnr/{k}"], rtol=1e-5)


def test_golden_spam():
    arrays, (init, grads, expected) = golden("spam", "wd0")
    tx = optax_ext.spam(
        1e-3, eps=1e-6, threshold=5000, reset_every=5, warmup_steps=3, grace_steps=2
    )
    replay(tx, init, grads, expected, atol=1e-5)


@pytest.mark.parametrize("run,total", [("wd0", None), ("totalT12", 12)])
def test_golden_stable_spam_and_stats(run, total):
    arrays, (init, grads, expected) = golden("stablespam", run)
    kw = dict(gamma1=0.7, gamma2=0.9, gamma3=0.999, reset_every=5, total_steps=total)
    tx = optax_ext.stable_spam(1e-3, **kw)
    replay(tx, init, grads, expected, atol=1e-5)
    state = tx.init(init)
    update = jax.jit(tx.update)
    for t in range(12):
        _, state = update({k: jnp.asarray(v[t]) for k, v in grads.items()}, state, init)
        m, a, b, k = arrays[f"{run}/stats/w1"][t]
        core = state[0]
        np.testing.assert_allclose(
            [core.max_ema["w1"], core.norm_ema["w1"], core.sq_norm_ema["w1"]], [m, a, b], rtol=1e-4
        )
        assert int(core.k) == int(k)


def test_stable_spam_clean_reset_zeroes_before_use():
    g = {"w": jnp.ones((2, 2))}
    stale = optax_ext.scale_by_stable_spam(reset_every=2)
    clean = optax_ext.scale_by_stable_spam(reset_every=2, clean_reset=True)
    s1, s2 = stale.init(g), clean.init(g)
    _, s1 = stale.update(g, s1)
    _, s2 = clean.update(g, s2)
    u1, s1 = stale.update(g, s1)  # reset step: stale moments, k = 1
    u2, s2 = clean.update(g, s2)  # reset step: fresh moments, k = 1 -> exactly an Adam step 1
    np.testing.assert_allclose(u2["w"], 1.0, rtol=1e-4)
    assert not np.allclose(u1["w"], u2["w"])
    assert float(jnp.abs(s1.mu["w"]).max()) == 0.0 == float(jnp.abs(s2.mu["w"]).max())


def test_lion_k_variants_numpy():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 4)).astype(np.float32)
    for k, fn in [
        ("l1", np.sign),
        ("l2", lambda x: x / np.linalg.norm(x)),
        ("huber", lambda x: np.clip(x / 0.05, -1, 1)),
    ]:
        tx = optax_ext.lion_k(0.1, 0.9, 0.99, k=k, k_param=0.05)
        u, s = tx.update(jnp.asarray(g), tx.init(jnp.zeros((3, 4))), jnp.zeros((3, 4)))
        np.testing.assert_allclose(u, -0.1 * fn(0.1 * g), rtol=1e-5, atol=1e-7)
    u, _ = optax_ext.lion(0.1).update(
        jnp.zeros(3), optax_ext.lion().init(jnp.zeros(3)), jnp.zeros(3)
    )
    assert not jnp.any(u)  # sign(0) = 0


def test_sgdp_matches_numpy_on_scale_invariant_weights():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 6)).astype(np.float32)  # flax (in, out): channels = columns
    g = rng.standard_normal((4, 6)).astype(np.float32)
    g = g - np.sum(g * w, axis=0) / np.sum(w * w, axis=0) * w  # orthogonal per output column
    tx = optax_ext.sgdp(0.1, 0.9, weight_decay=0.5, wd_ratio=0.1)
    u, s = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.asarray(w)}), {"w": jnp.asarray(w)})
    wn = w / (np.linalg.norm(w, axis=0) + 1e-8)
    d = g - wn * np.sum(wn * g, axis=0)
    np.testing.assert_allclose(w + u["w"], w * (1 - 0.1 * 0.5 * 0.1) - 0.1 * d, atol=1e-6)
    assert int(s[0].projected["w"]) == 1


def test_perp_adamw_removes_parallel_component():
    w = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    g = 3.0 * w  # fully parallel: nothing left, so only decay moves W
    tx = optax_ext.perp_adamw(0.1, weight_decay=0.5)
    u, _ = tx.update(g, tx.init(w), w)
    np.testing.assert_allclose(w + u, w * (1 - 0.05), rtol=1e-5)


def test_rex_schedule_values_and_warmup():
    s = optax_ext.rex_schedule(2.0, 10, end_value=0.2, warmup_steps=4)
    z = 0.3
    np.testing.assert_allclose(s(2), 1.0, rtol=1e-6)  # warm-up half way
    np.testing.assert_allclose(s(4 + 3), 0.2 + 1.8 * (1 - z) / (0.5 + 0.5 * (1 - z)), rtol=1e-6)
    np.testing.assert_allclose(s(100), 0.2, rtol=1e-6)


def test_sgd_sai_edge_cases():
    tx = optax_ext.sgd_sai(0.1, weight_decay=0.0)
    p = {"zero": jnp.ones(3), "one": jnp.ones(1)}
    g0 = {"zero": jnp.zeros(3), "one": jnp.array([2.0])}
    s = tx.init(p)
    _, s = tx.update(g0, s, p)
    assert float(s[0].gsnr["zero"]) == 0.0  # frozen forever
    np.testing.assert_allclose(s[0].gsnr["one"], 2.0 / 1e-8, rtol=1e-5)  # std of 1 entry = 0
    u, _ = tx.update({"zero": jnp.ones(3), "one": jnp.ones(1)}, s, p)
    assert not jnp.any(u["zero"])


def test_spam_absorbs_a_gradient_spike_where_adamw_does_not():
    """A x1000 gradient spike (random direction) at one step of a small MLP regression.

    AdamW's moments carry the spike for many steps: its loss stops falling and rises. SPAM
    clips the spike against its second moment and keeps descending: its excess loss over its
    own spike-free run stays well below AdamW's."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "w1": 0.3 * jax.random.normal(k[0], (8, 32)),
        "w2": 0.3 * jax.random.normal(k[1], (32, 1)),
    }
    x = jax.random.normal(k[2], (64, 8))
    y = jnp.sin(x.sum(1, keepdims=True))
    spike = jax.tree.map(lambda a: jax.random.normal(k[3], a.shape), params)
    spike = jax.tree.map(lambda d: d / optax.tree.norm(spike), spike)

    def loss(p):
        return jnp.mean((jax.nn.gelu(x @ p["w1"]) @ p["w2"] - y) ** 2)

    @jax.jit
    def grad_and_loss(p):
        return jax.grad(loss)(p), loss(p)

    def run(tx, with_spike):
        p, s = params, tx.init(params)
        losses = []
        for t in range(41):
            g, value = grad_and_loss(p)
            losses.append(float(value))
            if with_spike and t == 30:
                scale = 1000.0 * optax.tree.norm(g)
                g = jax.tree.map(lambda a, d, c=scale: a + c * d, g, spike)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return np.array(losses)

    adam = optax.adamw(1e-2, eps=1e-6, weight_decay=0.0)
    spam = optax_ext.spam(1e-2, reset_every=500, grace_steps=5)
    adam_excess = run(adam, True)[40] - run(adam, False)[40]
    spam_excess = run(spam, True)[40] - run(spam, False)[40]
    adam_spiked = run(adam, True)
    assert adam_spiked[40] > adam_spiked[31]  # AdamW's loss rises after the spike
    assert spam_excess < 0.5 * adam_excess
