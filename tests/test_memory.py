"""state_nbytes, and the optimizer-state memory of the 8-bit recipes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext
from optax_ext.kernels import BlockQuantizer


def test_counts_arrays_structs_and_skips_masked_nodes():
    tree = {
        "a": jnp.zeros((3, 4), jnp.float32),
        "b": np.zeros(5, np.uint8),
        "c": jax.ShapeDtypeStruct((2, 8), jnp.bfloat16),
        "d": None,
        "e": optax.MaskedNode(),
        "f": jnp.zeros([], jnp.int32),
    }
    assert optax_ext.state_nbytes(tree) == 48 + 5 + 32 + 0 + 0 + 4
    with pytest.raises(TypeError, match=r"\['x'\]"):
        optax_ext.state_nbytes({"x": 1.0})


def _bytes_per_param(tx, params):
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return optax_ext.state_nbytes(jax.eval_shape(tx.init, params)) / n


def test_state_bytes_per_parameter_of_large_tensors():
    # Never allocated: the states are measured on shape-dtype structs.
    big = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
    # 2 codes + 2 float32 scales per 256 entries (+ a few scalars): 2 + 8/256 bytes
    assert _bytes_per_param(optax_ext.adamw_8bit(), big) == pytest.approx(2 + 8 / 256, abs=1e-5)
    assert _bytes_per_param(optax.adamw(1e-3), big) == pytest.approx(8.0, abs=1e-5)
    # one code + one scale per 256 entries
    assert _bytes_per_param(optax_ext.lion_8bit(), big) == pytest.approx(1 + 4 / 256, abs=1e-5)
    assert _bytes_per_param(optax.lion(1e-4), big) == pytest.approx(4.0, abs=1e-5)


def test_small_tensors_keep_float32_states():
    params = {
        "w": jax.ShapeDtypeStruct((64, 64), jnp.float32),  # 4096 entries: quantized
        "b": jax.ShapeDtypeStruct((4095,), jnp.float32),  # one fewer: float32 moments
    }
    nbytes = optax_ext.state_nbytes(jax.eval_shape(optax_ext.adamw_8bit().init, params))
    scalars = 4 + 4  # Adam's count and the weight decay's count (int32)
    assert nbytes - scalars == (2 * 4096 + 2 * 4 * 16) + 8 * 4095
    quantized = jax.eval_shape(
        optax_ext.adamw_8bit(quantizer=BlockQuantizer(min_size=0)).init, params
    )
    assert optax_ext.state_nbytes(quantized) - scalars == (2 * 4096 + 2 * 4 * 16) + (
        2 * 4095 + 2 * 4 * 16
    )
