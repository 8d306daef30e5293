"""1-bit Adam on fake CPU devices; run by tests/test_distributed.py (8 devices).

Steps are synchronised (``block_until_ready``) one by one: the CPU backend runs the devices of
concurrently dispatched collective programs on one small thread pool.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import onebit_reference as ref
import optax
import pytest
from helpers import load_golden
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ext
from optax_ext.kernels.communication import collective_traffic, padded_size

ARRAYS, META = load_golden("onebit_adam")


def sharded_trainer(tx, params, mesh, grad_fn):
    """(state, step) wired as the recipe's docstring says: local gradients, per-device errors."""
    specs = optax_ext.per_device_state_specs(tx, params, mesh, "data")
    state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs))(params)

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data")), out_specs=(P(), specs)
    )
    def step(params, state, batch):
        grads = grad_fn(params, batch)  # this device's gradient, not averaged
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return state, step, specs


def golden_tx():
    hp = META["hyperparameters"]
    return optax_ext.onebit_adam(hp["lr"], *hp["betas"], hp["eps"], freeze_step=hp["freeze_step"])


def test_golden_w4_on_four_devices():
    run, workers = "W4_wd0", 4
    mesh = jax.make_mesh((workers,), ("data",), devices=jax.devices()[:workers])
    params = {k: jnp.asarray(ARRAYS[f"init/{k}"]) for k in ref.KEYS}
    local = lambda p, g: jax.tree.map(lambda x: x[0], g)  # noqa: E731
    state, step, specs = sharded_trainer(golden_tx(), params, mesh, local)
    assert specs[0].worker_error["w1"] == P("data") and specs[0].mu["w1"] == P()
    for t in range(12):
        grads = {
            k: jax.device_put(ARRAYS[f"{run}/local_grad/{k}"][t], NamedSharding(mesh, P("data")))
            for k in ref.KEYS
        }
        params, state = jax.block_until_ready(step(params, state, grads))
        s = state[0]
        for k in ref.KEYS:
            np.testing.assert_allclose(
                params[k],
                ARRAYS[f"{run}/params/{k}"][t],
                atol=1e-5,
                rtol=0,
                err_msg=f"step {t + 1}, leaf {k}",
            )
            np.testing.assert_allclose(s.mu[k], ARRAYS[f"{run}/exp_avg/{k}"][t], atol=1e-6)
            if t >= 4:  # global error buffer = the 4 ranks' buffers concatenated
                we = np.asarray(s.worker_error[k]).reshape(workers, -1)
                se = np.asarray(s.server_error[k]).reshape(workers, -1)
                np.testing.assert_allclose(we, ARRAYS[f"{run}/worker_error/{k}"][t], atol=1e-6)
                np.testing.assert_allclose(se, ARRAYS[f"{run}/server_error/{k}"][t], atol=1e-6)


def test_pmap_wiring_replays_the_golden_start():
    run, workers = "W4_wd0", 4
    tx = golden_tx()
    devices = jax.devices()[:workers]
    params = {
        k: jnp.broadcast_to(ARRAYS[f"init/{k}"], (workers, *ARRAYS[f"init/{k}"].shape))
        for k in ref.KEYS
    }
    state = jax.pmap(tx.init, axis_name="data", devices=devices)(params)

    def one(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.pmap(one, axis_name="data", devices=devices)
    for t in range(7):
        grads = {k: ARRAYS[f"{run}/local_grad/{k}"][t] for k in ref.KEYS}
        params, state = jax.block_until_ready(step(params, state, grads))
        for k in ref.KEYS:
            np.testing.assert_allclose(params[k][3], ARRAYS[f"{run}/params/{k}"][t], atol=1e-5)


MODEL = {  # a transformer-shaped tree (flax layouts)
    "wte": {"embedding": (256, 64)},
    "blocks": {
        str(i): {
            "attn": {n: {"kernel": (64, 64)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {"fc": {"kernel": (64, 256)}, "proj": {"kernel": (256, 64)}},
            "ln": {"scale": (64,)},
        }
        for i in range(2)
    },
    "lm_head": {"kernel": (64, 256)},
}


def test_compressed_steps_move_about_one_thirty_second_of_the_fp32_bytes():
    workers = 8
    mesh = jax.make_mesh((workers,), ("data",))
    params = jax.tree.map(
        lambda s: jnp.zeros(s, jnp.float32), MODEL, is_leaf=lambda x: isinstance(x, tuple)
    )
    tx = optax_ext.onebit_adam(freeze_step=10)
    specs = optax_ext.per_device_state_specs(tx, params, mesh, "data")
    state = jax.eval_shape(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs), params)
    typed = lambda x, spec: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, spec)
    )  # noqa: E731
    state = jax.tree.map(typed, state, specs)
    grads = jax.tree.map(lambda p: typed(jnp.zeros((workers, *p.shape)), P("data")), params)
    params = jax.tree.map(lambda p: typed(p, P()), params)
    update = jax.shard_map(
        lambda g, s, p: tx.update(jax.tree.map(lambda x: x[0], g), s, p),
        mesh=mesh,
        in_specs=(P("data"), specs, P()),
        out_specs=(P(), specs),
    )
    transfers = collective_traffic(update, grads, state, params)
    warmup = [t for t in transfers if t.where == ("cond[1]",)]
    compressed = [t for t in transfers if t.where == ("cond[2]",)]
    assert len(transfers) == len(warmup) + len(compressed)  # nothing outside the phases
    assert not [t for t in transfers if t.where == ("cond[0]",)]  # the init call is silent
    numel = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    padded = sum(padded_size(int(np.prod(p.shape)), workers) for p in jax.tree.leaves(params))
    leaves = len(jax.tree.leaves(params))
    # warm-up: one float32 all-reduce of every gradient entry
    assert {t.primitive for t in warmup} <= {"psum", "psum_invariant"}
    assert sum(t.operand_bytes for t in warmup) == 4 * numel
    # compression: packed signs (uint8) + one float32 scale per tensor and level
    kinds = sorted((t.primitive, t.dtype) for t in compressed)
    assert kinds == sorted(
        [("all_to_all", "uint8"), ("all_gather_invariant", "uint8")]
        + [("all_gather_invariant", "float32")] * 2
    ), kinds
    sign_bytes = [t.operand_bytes for t in compressed if t.dtype == "uint8"]
    assert sorted(sign_bytes) == [padded // 8 // workers, padded // 8]
    fp32_wire = sum(t.wire_bytes for t in warmup)
    onebit_wire = sum(t.wire_bytes for t in compressed)
    scales_wire = 2 * (workers - 1) * 4 * leaves
    assert onebit_wire == pytest.approx((padded / 32 / numel) * fp32_wire + scales_wire, rel=1e-12)
    assert 1 / 32 <= onebit_wire / fp32_wire < 1.05 / 32, onebit_wire / fp32_wire


def test_tiny_mlp_on_eight_devices_reaches_adams_loss():
    """Regression MLP, 32 samples per device; 1-bit Adam (freeze at 20% of the steps) vs
    data-parallel Adam (pmean-ed gradients) at the same lr: within 25% of Adam's loss."""
    workers, steps = 8, 150
    mesh = jax.make_mesh((workers,), ("data",))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((workers * 32, 8)).astype(np.float32)
    a = rng.standard_normal((8, 16)).astype(np.float32) / np.sqrt(8)
    b = rng.standard_normal((16, 1)).astype(np.float32) / 4
    y = np.tanh(x @ a) @ b + 0.01 * rng.standard_normal((workers * 32, 1)).astype(np.float32)
    batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params0 = {
        "w1": jax.random.normal(k1, (8, 32)) / np.sqrt(8),
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 1)) / np.sqrt(32),
    }

    def loss(p, batch):
        x, y = batch
        return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

    def train(tx, grad_fn):
        state, step, _ = sharded_trainer(tx, params0, mesh, grad_fn)
        p = params0
        for _ in range(steps):
            p, state = jax.block_until_ready(step(p, state, batch))
        return float(loss(p, (x, y))), state

    local = jax.grad(loss)
    adam_loss, _ = train(optax.adam(1e-2), lambda p, b: jax.lax.pmean(local(p, b), "data"))
    onebit_loss, state = train(optax_ext.onebit_adam(1e-2, freeze_step=steps // 5), local)
    initial = float(loss(params0, (x, y)))
    assert int(state[0].count) == steps and onebit_loss < 0.01 * initial
    assert onebit_loss <= 1.25 * adam_loss, (onebit_loss, adam_loss)
