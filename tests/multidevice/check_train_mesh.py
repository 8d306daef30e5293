"""train.py --mesh on 8 fake CPU devices matches the single-device run."""

import json

import jax
import numpy as np

from experiments import train

TINY = dict(steps=5, batch_size=8, seq_len=32, eval_every=5, log_every=1, max_files=40,
            progress=False)


def _losses(out):
    return [json.loads(line)["train_loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_with_data_and_model_axes_matches_one_device(tmp_path):
    for name in ("muon",):
        one = train.train(train.TrainConfig(optimizer=name, **TINY, out=str(tmp_path / name)))
        sharded = train.train(train.TrainConfig(optimizer=name, **TINY, mesh="data=4,model=2",
                                                out=str(tmp_path / f"{name}-mesh")))
        np.testing.assert_allclose(_losses(tmp_path / f"{name}-mesh"), _losses(tmp_path / name),
                                   rtol=2e-4)
        assert abs(sharded["final_val_loss"] - one["final_val_loss"]) < 2e-3


def test_param_sharding_rule():
    mesh = train.parse_mesh("data=4,model=2")
    w = jax.ShapeDtypeStruct((128, 384), np.float32)
    assert train.param_sharding(mesh, w).spec == jax.sharding.PartitionSpec("data", "model")
    odd = jax.ShapeDtypeStruct((6, 7), np.float32)  # neither axis divides: replicated
    assert train.param_sharding(mesh, odd).spec == jax.sharding.PartitionSpec(None, None)
    vec = jax.ShapeDtypeStruct((128,), np.float32)
    assert train.param_sharding(mesh, vec).spec == jax.sharding.PartitionSpec(None)
