"""The experiments' optimizer registry covers every recipe and builds each one."""

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_ext
from experiments import registry


def _recipe_names():
    """Public functions defined in the recipe modules, less their ``scale_by_*`` forms."""
    return {
        name
        for name in dir(optax_ext)
        if inspect.isfunction(obj := getattr(optax_ext, name))
        and obj.__module__.startswith("optax_ext.recipes.")
        and not name.startswith("scale_by_")
    }


def test_every_recipe_is_registered():
    missing = _recipe_names() - set(registry.OPTIMIZERS) - registry.NOT_OPTIMIZERS
    assert not missing, f"recipes without a registry entry: {sorted(missing)}"
    assert {"adamw", "optax_muon"} <= set(registry.OPTIMIZERS)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(registry.UnknownOptimizer, match="unknown optimizer 'adamx'.*conda"):
        registry.get("adamx")


@pytest.mark.parametrize("name", sorted(registry.OPTIMIZERS))
def test_each_entry_builds_with_a_schedule_and_initialises(name):
    entry = registry.get(name)
    assert entry.grid == tuple(sorted(entry.grid)) and min(entry.grid) <= entry.lr <= max(
        entry.grid
    )
    tx = entry.build(optax.linear_schedule(0.0, entry.lr, 10), 100)
    params = {
        "wte": {"embedding": jax.ShapeDtypeStruct((256, 64), jnp.float32)},
        "h_0": {"attn": {"kernel": jax.ShapeDtypeStruct((64, 192), jnp.float32)},
                "ln": {"scale": jax.ShapeDtypeStruct((64,), jnp.float32)}},
        "lm_head": {"kernel": jax.ShapeDtypeStruct((64, 256), jnp.float32)},
    }
    state = jax.eval_shape(tx.init, params)
    assert optax_ext.state_nbytes(state) > 0
