"""memory.py --mesh: per-device bytes on an abstract mesh (no devices, nothing allocated)."""

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from experiments import memory


def test_parse_mesh_and_its_errors():
    assert memory.parse_mesh("data=8,model=2") == {"data": 8, "model": 2}
    assert memory.parse_mesh("data=64") == {"data": 64, "model": 1}
    for bad in ("data=0", "pipe=2", "data=2,data=4", "data"):
        with pytest.raises(ValueError, match="--mesh"):
            memory.parse_mesh(bad)


def test_param_spec_is_fsdp_by_tensor_parallel_where_sizes_divide():
    axes = {"data": 8, "model": 2}
    assert memory.param_spec((64, 32), axes) == P("data", "model")
    assert memory.param_spec((6, 32), axes) == P("model", "data")  # first divisible axes
    assert memory.param_spec((3, 64, 30), axes) == P(None, "data", "model")
    assert memory.param_spec((64,), axes) == P(None)


def test_per_device_bytes_count_one_shard():
    tree = {"a": jax.ShapeDtypeStruct((8, 4), jnp.float32), "b": jnp.zeros(3, jnp.int8)}
    assert memory.per_device_nbytes(tree) == 8 * 4 * 4 + 3


def test_state_is_sharded_like_the_parameters_on_64_devices(tmp_path):
    axes = {"data": 16, "model": 4}
    adamw = memory.sharded_bytes("adamw", "llama-60m", axes)
    # every matrix of llama-60m divides 16 x 4: Adam's moments are split 64 ways, up to the
    # replicated vectors (norm scales) and counts
    assert adamw["state_bytes_per_device"] <= 1.02 * adamw["state_bytes"] / 64
    assert adamw["param_bytes_per_device"] * 2 == pytest.approx(
        adamw["state_bytes_per_device"], rel=0.01
    )
    galore = memory.sharded_bytes("galore", "llama-60m", axes)
    assert galore["state_bytes_per_device"] <= 1.3 * galore["state_bytes"] / 64
    argv = ["--mesh", "data=16,model=4", "--models", "llama-60m", "--optimizers", "adamw,galore"]
    assert memory.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mesh_data16_model4.json").read_text())
    assert {r["optimizer"] for r in rows} == {"adamw", "galore"}
    assert "(1.0" in (tmp_path / "mesh_data16_model4.md").read_text()
    assert memory.main(["--mesh", "data=x", "--out", str(tmp_path)]) == 2
