"""Parameter labels and the matrix spec rule."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from helpers import small_params

import optax_ext
from optax_ext import MatrixSpec, labels


def test_default_rule_on_transformer_tree():
    lab = labels.param_labels(small_params())
    assert lab["wte"]["embedding"] == "embed"
    assert lab["lm_head"]["kernel"] == "head"
    assert lab["blocks"]["attn"]["kernel"] == "hidden"
    assert lab["blocks"]["stack"]["kernel"] == "hidden"
    assert lab["blocks"]["attn"]["bias"] == "vector"
    two = labels.hidden_matrices(small_params())
    assert set(jax.tree.leaves(two)) == {"hidden", "other"}


def test_overrides_and_renaming():
    lab = labels.param_labels(small_params(), overrides={r"blocks/stack/.*": "vector"})
    assert lab["blocks"]["stack"]["kernel"] == "vector"
    fn = labels.label_fn({"embed": "adam", "head": "adam", "vector": "adam"})
    assert set(jax.tree.leaves(fn(small_params()))) == {"hidden", "adam"}


def test_nnx_state_paths_and_partition():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.wte = nnx.Embed(10, 8, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs)])
            self.lm_head = nnx.Linear(8, 10, use_bias=False, rngs=rngs)

    model = Tiny(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    lab = labels.param_labels(params)
    assert lab["blocks"][0]["kernel"] == "hidden" and lab["wte"]["embedding"] == "embed"
    tx = optax.partition(
        {"hidden": optax_ext.orthogonalize(), "other": optax.adam(1e-3)}, labels.hidden_matrices
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    opt.update(model, grads)


def test_matrix_specs_from_the_same_rule():
    conv = MatrixSpec(fan_in_axes=(0, 1, 2), fan_out_axes=(3,))
    rule = labels.LabelRule(spec=lambda path, x: conv if x.ndim == 4 else MatrixSpec())
    specs = labels.matrix_specs(rule)
    assert specs((), jnp.zeros((3, 3, 4, 8))) == conv
    assert specs((), jnp.zeros((4, 8))) == MatrixSpec()
