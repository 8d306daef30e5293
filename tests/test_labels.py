"""Parameter labels and the matrix spec rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


def test_untied_head_by_vocabulary_and_dense_general_biases():
    params = {
        "decoder": {
            "Embed_0": {"embedding": jnp.zeros((50, 8))},
            "posembed": {"pos_embedding": jnp.zeros((16, 8))},
            "attn": {"query": {"kernel": jnp.zeros((8, 2, 4)), "bias": jnp.zeros((2, 4))}},
            "mlp": {"kernel": jnp.zeros((8, 32))},
            "logitdense": {"kernel": jnp.zeros((8, 50))},
        }
    }
    lab = labels.param_labels(params)["decoder"]
    assert lab["logitdense"]["kernel"] == "head" and lab["mlp"]["kernel"] == "hidden"
    assert lab["attn"]["query"]["bias"] == "vector" and lab["attn"]["query"]["kernel"] == "hidden"
    # two candidates with the vocabulary's fan-out: none is guessed
    params["decoder"]["mlp"]["kernel"] = jnp.zeros((4, 50))
    assert labels.param_labels(params)["decoder"]["logitdense"]["kernel"] == "hidden"


def test_overrides_match_with_and_without_flax_box_paths():
    import flax.linen as nn

    boxed = {"attn_out_proj": {"kernel": nn.Partitioned(jnp.zeros((4, 4)), ("embed", "mlp"))}}
    for pattern in (r".*attn_out_proj/kernel", r".*attn_out_proj/kernel/value"):
        lab = labels.param_labels(boxed, overrides={pattern: "vector"})
        assert jax.tree.leaves(lab) == ["vector"], pattern
    assert jax.tree.leaves(labels.param_labels(boxed)) == ["hidden"]


def test_recipes_accept_four_way_labels_or_say_what_they_expect():
    params = small_params()
    tx = optax_ext.muon(0.02, param_labels=labels.param_labels(params))
    u, _ = tx.update(params, tx.init(params), params)
    assert jax.tree.structure(u) == jax.tree.structure(params)
    optax_ext.galore(param_labels=labels.param_labels).init(params)
    bad = jax.tree.map(lambda _: "adam", params)
    try:
        optax_ext.muon(param_labels=bad).init(params)
    except ValueError as e:
        assert "'adam'" in str(e) and "'hidden'" in str(e) and "'vector'" in str(e)
    else:
        raise AssertionError("unknown labels must raise")


def test_auxiliary_lr_follows_the_main_schedule():
    params = {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}
    grads = {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}
    schedule = optax.linear_schedule(0.0, 0.02, 10)
    for make in (optax_ext.muon, optax_ext.normuon, optax_ext.auon, optax_ext.lipschitz_muon):
        tx = make(schedule)
        u, _ = tx.update(grads, tx.init(params), params)
        assert float(jnp.abs(u["b"]).max()) == 0.0, make.__name__  # warm-up starts at 0
        # an explicit value still wins
        tx = make(schedule, adam_learning_rate=1e-3)
        u, _ = tx.update(grads, tx.init(params), params)
        assert float(jnp.abs(u["b"]).max()) > 0.0, make.__name__
    # a scaled copy at the reference ratio, also through inject_hyperparams
    tx = optax.inject_hyperparams(optax_ext.muon)(learning_rate=0.04)
    u, _ = tx.update(grads, tx.init(params), params)
    ref = optax_ext.muon(0.04, adam_learning_rate=0.04 * 3e-4 / 0.02)
    u_ref, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(u["b"], u_ref["b"], rtol=1e-6)


def test_flax_partitioning_names_settle_views_that_path_and_shape_leave_ambiguous():
    """3-D kernels under names the path rule does not know (``w_a``, ``w_b``): their boxes' logical
    axis names give the view, in ``describe`` and in every recipe built on the boxed params."""
    import flax.linen as nn

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.initializers.lecun_normal()
            wq = self.param("w_a", nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                            (8, 2, 4))
            wo = self.param("w_b", nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
                            (2, 4, 8))
            return jnp.einsum("bhk,hkd->bd", jnp.einsum("bd,dhk->bhk", x, wq), wo)

    boxed = Attn().init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    plain = nn.unbox(boxed)
    views = {"w_a": MatrixSpec(fan_in_axes=(0,), fan_out_axes=(1, 2)),
             "w_b": MatrixSpec(fan_in_axes=(0, 1), fan_out_axes=(2,))}
    # without names the rule refuses to guess, and says so
    rows = {r.path: r for r in labels.describe(plain, optax_ext.muon).rows}
    assert rows["w_a"].view is None and "ambiguous" in rows["w_a"].note
    rows = {r.path: r for r in labels.describe(boxed, optax_ext.muon).rows}
    assert (rows["w_a"].view, rows["w_b"].view) == ((1, 8, 8), (1, 8, 8))
    # a recipe on the boxed params updates exactly as with the views written out by hand
    grads = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape),
                         plain)
    by_hand = optax_ext.muon(0.02, specs=lambda path, x: views[labels.path_names(path)[-1]])
    want, _ = by_hand.update(grads, by_hand.init(plain), plain)
    tx = optax_ext.muon(0.02)
    got, state = tx.update(nn.meta.replace_boxed(boxed, grads), tx.init(boxed), boxed)
    for k in ("w_a", "w_b"):
        np.testing.assert_allclose(nn.unbox(got)[k], want[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="ambiguous"):
        tx.init(plain)


def test_a_raw_primitive_on_boxed_params_reads_their_axis_names():
    """Primitives that map over boxed trees directly (orthogonalize) see the names too."""
    import flax.linen as nn

    kernel = nn.LogicallyPartitioned(jnp.ones((8, 2, 4)), ("embed", "heads", "kv"))
    tx = optax_ext.orthogonalize()
    tx.init({"w_a": kernel})  # no ambiguity error: the names settle the view
    with pytest.raises(ValueError, match="ambiguous"):
        tx.init({"w_a": jnp.ones((8, 2, 4))})
