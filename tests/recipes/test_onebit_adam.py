"""1-bit Adam: golden replays (simulated workers), an independent numpy check, phases, edges.

The golden (``tests/goldens/onebit_adam.json``) ran DeepSpeed's ``OnebitAdam`` with W simulated
ranks; here the W workers are simulated by ``jax.vmap(..., axis_name="data")``, which runs the
real collectives' semantics (the same runs on 4 fake devices with ``shard_map`` are in
``tests/multidevice/check_onebit_adam.py``). 1-bit Adam is elementwise except for the order in
which a tensor is flattened into server chunks, so the reference's arrays are used as stored
(no ``(out, in)`` -> ``(in, out)`` transpose): the chunks then coincide with the reference's.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import onebit_reference as ref
import optax
import pytest
from helpers import load_golden, replay

import optax_ext

ARRAYS, META = load_golden("onebit_adam")
HP = META["hyperparameters"]
SHAPES = {k: tuple(ARRAYS[f"init/{k}"].shape) for k in ref.KEYS}


def make(weight_decay=0.0, axis_name="data", **kw):
    return optax_ext.onebit_adam(
        HP["lr"],
        *HP["betas"],
        HP["eps"],
        weight_decay,
        freeze_step=HP["freeze_step"],
        axis_name=axis_name,
        **kw,
    )


def simulated(tx, workers, init):
    """(params, state, step) with ``workers`` workers simulated by vmap over axis "data"."""
    params = {k: jnp.broadcast_to(jnp.asarray(v), (workers, *v.shape)) for k, v in init.items()}
    state = jax.vmap(tx.init, axis_name="data")(params)

    @jax.jit
    def step(params, state, local_grads):
        def one(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.vmap(one, axis_name="data")(params, state, local_grads)

    return params, state, step


def test_golden_w4_replayed_with_four_simulated_workers():
    run = "W4_wd0"
    init = {k: ARRAYS[f"init/{k}"] for k in ref.KEYS}
    params, state, step = simulated(make(), 4, init)
    for t in range(12):
        grads = {k: jnp.asarray(ARRAYS[f"{run}/local_grad/{k}"][t]) for k in ref.KEYS}
        params, state = step(params, state, grads)
        s = state[0]
        for k in ref.KEYS:
            for w in range(4):  # identical params and moments on every worker
                np.testing.assert_allclose(
                    params[k][w],
                    ARRAYS[f"{run}/params/{k}"][t],
                    atol=1e-5,
                    rtol=0,
                    err_msg=f"step {t + 1}, leaf {k}, worker {w}",
                )
                np.testing.assert_allclose(s.mu[k][w], ARRAYS[f"{run}/exp_avg/{k}"][t], atol=1e-6)
                np.testing.assert_allclose(
                    s.nu[k][w], ARRAYS[f"{run}/exp_avg_sq/{k}"][t], atol=1e-8
                )
            if t >= 4:  # error buffers exist from the first compressed step on; one per rank
                np.testing.assert_allclose(
                    s.worker_error[k], ARRAYS[f"{run}/worker_error/{k}"][t], atol=1e-6
                )
                np.testing.assert_allclose(
                    s.server_error[k], ARRAYS[f"{run}/server_error/{k}"][t], atol=1e-6
                )


def test_golden_w1_replayed_on_a_single_device():
    run = "W1_wd0"
    init = {k: ARRAYS[f"init/{k}"] for k in ref.KEYS}
    grads = {k: ARRAYS[f"{run}/local_grad/{k}"][:, 0] for k in ref.KEYS}
    expected = {k: ARRAYS[f"{run}/params/{k}"] for k in ref.KEYS}
    report = replay(make(axis_name=None), init, grads, expected, atol=1e-5)
    assert max(max(d.values()) for d in report) < 1e-6


def test_numpy_reference_reproduces_the_golden():
    """The independent transcription used below is itself checked on the stored run."""
    opt = ref.OnebitAdam({k: ARRAYS[f"init/{k}"] for k in ref.KEYS}, 4)
    target = {k: ARRAYS[f"target/{k}"] for k in ref.KEYS}
    for t in range(1, 13):
        grads = ref.local_gradients(opt.p, target, t, 4, SHAPES)
        for k in ref.KEYS:
            np.testing.assert_allclose(grads[k], ARRAYS[f"W4_wd0/local_grad/{k}"][t - 1], atol=1e-6)
        p = opt.step(grads)
        for k in ref.KEYS:
            np.testing.assert_allclose(p[k], ARRAYS[f"W4_wd0/params/{k}"][t - 1], atol=1e-6)


@pytest.mark.parametrize(("workers", "weight_decay"), [(4, 0.1), (3, 0.0), (2, 0.1)])
def test_settings_not_in_the_golden_match_the_numpy_reference(workers, weight_decay):
    """W4_wd0.1 (listed by the spec, not stored) and odd worker counts (other padding)."""
    init = {k: ARRAYS[f"init/{k}"] for k in ref.KEYS}
    target = {k: ARRAYS[f"target/{k}"] for k in ref.KEYS}
    opt = ref.OnebitAdam(init, workers, wd=weight_decay)
    params, state, step = simulated(make(weight_decay), workers, init)
    for t in range(1, 13):
        grads = ref.local_gradients(opt.p, target, t, workers, SHAPES)
        want = opt.step(grads)
        params, state = step(params, state, {k: jnp.asarray(v) for k, v in grads.items()})
        for k in ref.KEYS:
            np.testing.assert_allclose(
                params[k][0], want[k], atol=1e-5, rtol=0, err_msg=f"step {t}, leaf {k}"
            )
            if t > 4:
                np.testing.assert_allclose(state[0].worker_error[k], np.stack(opt.we[k]), atol=1e-5)


@pytest.mark.parametrize("freeze_step", [0, 1, 2, 5])
def test_phases_follow_the_reference_step_count(freeze_step):
    """Init call (no change), warm-up through step max(F, 2), then frozen v."""
    tx = optax_ext.scale_by_onebit_adam(weight_decay=0.5, freeze_step=freeze_step, axis_name=None)
    p = jnp.array([1.0, -2.0, 3.0])
    state = tx.init(p)
    last_warmup = max(freeze_step, 2)
    for t in range(1, 9):
        g = jnp.array([0.5, -1.0, 2.0]) * t
        u, new = tx.update(g, state, p)
        assert int(new.count) == t
        if t == 1:
            np.testing.assert_array_equal(u, 0.0)  # the decay term too
            chex.assert_trees_all_equal(new.mu, state.mu)
            chex.assert_trees_all_equal(new.nu, state.nu)
        elif t <= last_warmup:
            np.testing.assert_allclose(new.nu, 0.999 * state.nu + 0.001 * g * g, rtol=1e-6)
        else:
            chex.assert_trees_all_equal(new.nu, state.nu)  # frozen
            np.testing.assert_allclose(new.mu, 0.9 * state.mu + 0.1 * g, rtol=1e-6)
        if t > 1:
            np.testing.assert_allclose(u, new.mu / (jnp.sqrt(new.nu) + 1e-8) + 0.5 * p, rtol=1e-6)
        state = new


def test_without_the_initialization_call_the_first_call_is_warm_up():
    tx = optax_ext.scale_by_onebit_adam(freeze_step=3, axis_name=None, skip_first_step=False)
    state = tx.init(jnp.zeros(2))
    nus = []
    for _ in range(5):
        u, state = tx.update(jnp.array([1.0, -2.0]), state)
        nus.append(np.asarray(state.nu))
        assert float(jnp.abs(u).min()) > 0
    np.testing.assert_allclose(nus[0], [1e-3, 4e-3], rtol=1e-5)  # step 1 already updates v
    assert not np.array_equal(nus[1], nus[2]) and np.array_equal(nus[2], nus[4])  # frozen after 3


def test_momentum_mask_zeroes_masked_entries_after_compressed_steps():
    mask = {"w": jnp.array([1.0, 0.0, 1.0])}
    tx = optax_ext.scale_by_onebit_adam(freeze_step=2, axis_name=None, momentum_mask=mask)
    p = {"w": jnp.zeros(3)}
    state = tx.init(p)
    for t in range(1, 5):  # 1: init call, 2: warm-up, 3-4: compressed
        _, state = tx.update({"w": jnp.ones(3)}, state, p)
        if t > 1:
            assert (float(state.mu["w"][1]) == 0.0) == (t > 2)
            assert float(state.mu["w"][0]) > 0.0


def test_unbound_axis_and_missing_params_raise():
    tx = optax_ext.onebit_adam(axis_name="data")
    with pytest.raises(ValueError, match="inside jax.shard_map or jax.pmap"):
        tx.init({"w": jnp.zeros(2)})
    tx = optax_ext.onebit_adam(weight_decay=0.1, axis_name=None)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.zeros(2)}, tx.init({"w": jnp.zeros(2)}))


def test_bf16_params_keep_bf16_moments_and_fp32_error_buffers():
    tx = make(axis_name="data")
    run = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        init = {k: ARRAYS[f"init/{k}"].astype(dtype) for k in ref.KEYS}
        params, state, step = simulated(tx, 4, init)
        for t in range(7):
            grads = {k: jnp.asarray(ARRAYS[f"W4_wd0/local_grad/{k}"][t], dtype) for k in ref.KEYS}
            params, state = step(params, state, grads)
            if t == 3:  # end of warm-up: bf16 rounding of params and moments only
                for k in ref.KEYS:
                    np.testing.assert_allclose(
                        np.asarray(params[k][0], np.float32),
                        ARRAYS[f"W4_wd0/params/{k}"][t],
                        atol=5e-3,
                    )
        run[jnp.dtype(dtype).name] = params
    s = state[0]
    for k in ref.KEYS:
        assert params[k].dtype == s.mu[k].dtype == s.nu[k].dtype == jnp.bfloat16
        assert s.worker_error[k].dtype == s.server_error[k].dtype == jnp.float32
        diff = np.abs(np.asarray(run["bfloat16"][k], np.float32) - run["float32"][k])
        # After the freeze, entries with a tiny frozen v amplify any rounding (m / sqrt(v));
        # the bulk stays at bf16 resolution.
        assert np.all(np.isfinite(diff)) and np.median(diff) < 2e-3, np.median(diff)
