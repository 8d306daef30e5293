"""Transformer (gpt2 / llama): shapes, options, parameter paths, metrics, dtypes, functional API."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import (
    ModelConfig,
    SigmaReparamLinear,
    Transformer,
    apply,
    apply_rope,
    lm_loss,
    loss_fn,
    make_model,
    shrink_gradient,
    split_model,
)

ARCHS = ("gpt2", "llama")
SMALL = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, d_model=32)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)), jnp.int32)
TARGETS = jnp.roll(TOKENS, -1, axis=1)
# Compiled tests use one layer: XLA compile time grows with the unrolled depth.
ONE_LAYER = dict(n_layer=1)


def small(arch: str, seed: int = 0, **options) -> Transformer:
    return Transformer(ModelConfig(arch=arch, **{**SMALL, **options}), rngs=nnx.Rngs(seed))


def paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


OPTIONS = {
    "plain": {},
    "qk_norm": dict(qk_norm=True),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(logit_softcap=0.05),
    "stablemax": dict(output="stablemax"),
    "sigma_reparam": dict(sigma_reparam=True),
    "embed_grad_shrink": dict(embed_grad_shrink=0.1),
    "dropout": dict(dropout=0.1),
    "gqa": dict(n_kv_head=2),
    "tied": dict(tie_embeddings=True),
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_finite_loss(arch, option):
    model = small(arch, **OPTIONS[option])
    logits, metrics = model(TOKENS, return_metrics=True)
    chex.assert_shape(logits, (2, 8, 64))
    chex.assert_shape(metrics["attn_entropy"], (2, 4))
    assert logits.dtype == jnp.float32
    loss, loss_metrics = model.loss(TOKENS, TARGETS)
    chex.assert_tree_all_finite((logits, metrics, loss, loss_metrics))
    # At init the logits are small: the loss is close to log(vocab) for both outputs.
    assert abs(float(loss_metrics["ce"]) - math.log(64)) < 0.15


@pytest.mark.parametrize("arch", ARCHS)
def test_model_loss_applies_the_config_options(arch):
    plain = small(arch)
    logits = plain(TOKENS)
    for options in (dict(z_loss=1e-2), dict(output="stablemax")):
        model = small(arch, **options)  # same seed and structure: same parameters
        loss, _ = model.loss(TOKENS, TARGETS)
        expected, _ = lm_loss(logits, TARGETS, **options)
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        assert abs(float(loss) - float(plain.loss(TOKENS, TARGETS)[0])) > 1e-4

    capped = small(arch, logit_softcap=0.05)(TOKENS)
    assert np.max(np.abs(capped)) <= 0.05
    chex.assert_trees_all_close(capped, 0.05 * np.tanh(np.asarray(logits) / 0.05), atol=1e-6)


def test_causality():
    model = small("llama")
    changed = TOKENS.at[:, 5].set((TOKENS[:, 5] + 1) % 64)
    a, b = model(TOKENS), model(changed)
    chex.assert_trees_all_close(a[:, :5], b[:, :5], atol=1e-6)
    assert np.max(np.abs(np.asarray(a[:, 5:]) - np.asarray(b[:, 5:]))) > 1e-6


def test_sequence_longer_than_block_size_raises():
    with pytest.raises(ValueError, match="block_size"):
        small("gpt2")(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_paths_and_shapes(arch):
    model = small(arch, n_kv_head=2)
    _, params, other = split_model(model)
    names = paths(params)
    for part in ("['wte']['embedding']", "['lm_head']['kernel']", "['blocks'][1]", "['kernel']"):
        assert any(part in p for p in names), part
    assert other == {}
    d, hd = 32, 8
    attn = params["blocks"][0]["attn"]
    chex.assert_shape(
        [attn[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
        [(d, 4 * hd), (d, 2 * hd), (d, 2 * hd), (4 * hd, d)],
    )
    chex.assert_shape(params["lm_head"]["kernel"], (d, 64))
    chex.assert_shape(params["wte"]["embedding"], (64, d))
    mlp = params["blocks"][0]["mlp"]
    block = params["blocks"][0]
    if arch == "gpt2":
        chex.assert_shape([mlp["fc"]["kernel"], mlp["proj"]["kernel"]], [(d, 4 * d), (4 * d, d)])
        chex.assert_shape(params["wpe"]["embedding"], (16, d))
        assert set(block["ln_1"]) == set(params["ln_f"]) == {"scale", "bias"}
        chex.assert_trees_all_equal(attn["q_proj"]["bias"], jnp.zeros(4 * hd))
    else:
        f = model.config.ffn_dim
        chex.assert_shape(
            [mlp[n]["kernel"] for n in ("gate", "up", "down")], [(d, f), (d, f), (f, d)]
        )
        assert "wpe" not in params and not any("bias" in p for p in names)
        assert set(block["ln_1"]) == set(params["ln_f"]) == {"scale"}
    # Init: N(0, 0.02^2), residual projections scaled by 1 / sqrt(2 * n_layer).
    first, last = ("fc", "proj") if arch == "gpt2" else ("up", "down")
    kernels = np.concatenate([np.ravel(attn["q_proj"]["kernel"]), np.ravel(mlp[first]["kernel"])])
    residual = np.concatenate([np.ravel(attn["o_proj"]["kernel"]), np.ravel(mlp[last]["kernel"])])
    np.testing.assert_allclose(np.std(kernels), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(residual), 0.02 / math.sqrt(4), rtol=0.05)


def test_tied_model_has_no_head_and_uses_the_embedding():
    model = small("gpt2", tie_embeddings=True)
    _, params, _ = split_model(model)
    assert "lm_head" not in params
    hidden = model.wte(TOKENS) + model.wpe(jnp.arange(8))[None]  # [B, T, D]
    for block in model.blocks:
        hidden, _ = block(hidden)
    expected = model.ln_f(hidden) @ params["wte"]["embedding"].T  # [B, T, V]
    chex.assert_trees_all_close(model(TOKENS), expected, atol=1e-6)


def test_gqa_equals_mha_with_repeated_key_value_heads():
    gqa = small("llama", n_kv_head=2)
    mha = small("llama", seed=1)
    _, gqa_params, _ = split_model(gqa)
    graphdef, mha_params, other = split_model(mha)
    params = jax.tree.map(lambda x: x, gqa_params)
    for block in params["blocks"].values():
        for name in ("k_proj", "v_proj"):
            kernel = block["attn"][name]["kernel"].reshape(32, 2, 8)  # [D, K, Dh]
            block["attn"][name]["kernel"] = jnp.repeat(kernel, 2, axis=1).reshape(32, 32)
    chex.assert_trees_all_equal_shapes(params, mha_params)
    logits, _, _ = apply(graphdef, params, other, TOKENS, train=False)
    chex.assert_trees_all_close(logits, gqa(TOKENS), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_qk_norm_makes_attention_invariant_to_query_key_scale(arch):
    changes = {}
    for qk_norm in (True, False):
        model = small(arch, qk_norm=qk_norm)
        before = model(TOKENS)
        for block in model.blocks:
            block.attn.q_proj.kernel[...] *= 30.0
            block.attn.k_proj.kernel[...] *= 30.0
        changes[qk_norm] = np.max(np.abs(np.asarray(model(TOKENS)) - np.asarray(before)))
    # Up to the norm's epsilon (gpt2 LayerNorm: 1e-5 against a query variance of ~1e-2).
    assert changes[True] < 1e-3 and changes[False] > 1e-2, changes


def test_attention_entropy_is_bounded_and_log_t_for_uniform_attention():
    model = small("gpt2")
    _, metrics = model(TOKENS, return_metrics=True)
    entropy = np.asarray(metrics["attn_entropy"])
    assert np.all(entropy >= 0.0) and np.all(entropy <= math.log(8))
    # Zero queries give uniform causal attention: position t spreads over t + 1 keys.
    for block in model.blocks:
        block.attn.q_proj.kernel[...] = jnp.zeros_like(block.attn.q_proj.kernel[...])
    _, metrics = model(TOKENS, return_metrics=True)
    expected = np.mean(np.log(np.arange(1, 9)))
    chex.assert_trees_all_close(metrics["attn_entropy"], np.full((2, 4), expected), atol=1e-5)


def test_attention_entropy_with_rope_and_gqa_uniform_value():
    model = small("llama", n_kv_head=1)
    for block in model.blocks:
        block.attn.k_proj.kernel[...] = jnp.zeros_like(block.attn.k_proj.kernel[...])
    _, metrics = model(TOKENS, return_metrics=True)
    expected = np.mean(np.log(np.arange(1, 9)))
    chex.assert_trees_all_close(metrics["attn_entropy"], np.full((2, 4), expected), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = np.random.RandomState(1).randn(2, 1, 1, 1, 8).astype(np.float32)

    @jax.jit
    def score(m, n):
        qm = apply_rope(q, jnp.array([m]), theta=10000.0)
        kn = apply_rope(k, jnp.array([n]), theta=10000.0)
        return jnp.sum(qm * kn)

    np.testing.assert_allclose(score(5, 2), score(9, 6), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), np.sum(q * k), rtol=1e-6)
    assert abs(float(score(5, 2)) - float(score(5, 3))) > 1e-4


def test_embed_grad_shrink_scales_the_embedding_gradient():
    alpha = 0.5  # a power of two: the scaled gradient is exact
    graphdef, params, other = split_model(small("gpt2", **ONE_LAYER))
    shrunk_graphdef, _, _ = split_model(small("gpt2", embed_grad_shrink=alpha, **ONE_LAYER))
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True), static_argnums=0)
    (loss, _), base = step(graphdef, params, other, TOKENS, TARGETS)
    (shrunk_loss, _), shrunk = step(shrunk_graphdef, params, other, TOKENS, TARGETS)
    assert float(loss) == float(shrunk_loss)  # the forward pass is unchanged
    # two programs, each fused and contracted its own way by XLA: equal up to a few ulp of the
    # largest gradient entry (a missing or doubled scale would be off by 100%)
    for name in ("wte", "wpe"):
        expected = jax.tree.map(lambda g: alpha * g, base[name])
        chex.assert_trees_all_close(shrunk[name], expected, rtol=1e-6, atol=1e-8)
    rest = [k for k in base if k not in ("wte", "wpe")]
    chex.assert_trees_all_close({k: base[k] for k in rest}, {k: shrunk[k] for k in rest},
                                rtol=1e-6, atol=1e-8)


def test_shrink_gradient_is_identity_forward_and_alpha_backward():
    x = jnp.array([1.5, -2.0, 3.0])
    value, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(shrink_gradient(x, 0.3) ** 2)))(x)
    np.testing.assert_array_equal(value, np.sum(np.asarray(x) ** 2))
    np.testing.assert_allclose(grad, 0.3 * 2 * x, rtol=1e-7)
    assert shrink_gradient(x, 1.0) is x


def test_dropout_is_random_in_training_and_off_in_evaluation():
    model = small("gpt2", dropout=0.2)
    a, b = model(TOKENS), model(TOKENS)
    assert not np.allclose(a, b)
    model.eval()
    c, d = model(TOKENS), model(TOKENS)
    chex.assert_trees_all_equal(c, d)
    chex.assert_trees_all_equal(model(TOKENS, deterministic=True), c)
    graphdef, params, other = split_model(model)
    logits, new_other, _ = apply(graphdef, params, other, TOKENS, train=False)
    chex.assert_trees_all_close(logits, c, atol=1e-6)
    chex.assert_trees_all_equal(new_other, other)


def test_bf16_compute_matches_fp32():
    forward = jax.jit(apply, static_argnums=0, static_argnames=("train", "return_metrics"))
    reference = small("gpt2", **ONE_LAYER)(TOKENS)
    model = small("gpt2", dtype="bfloat16", **ONE_LAYER)
    graphdef, params, other = split_model(model)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    logits, _, metrics = forward(graphdef, params, other, TOKENS, return_metrics=True)
    assert logits.dtype == jnp.float32
    chex.assert_trees_all_close(logits, reference, atol=2e-2)
    chex.assert_tree_all_finite(metrics)
    # bf16 parameters too, with the options that touch the compute path.
    half = small("llama", dtype="bfloat16", param_dtype="bfloat16", sigma_reparam=True,
                 qk_norm=True, n_kv_head=2, **ONE_LAYER)  # fmt: skip
    graphdef, params, other = split_model(half)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(other)} == {jnp.dtype(jnp.float32)}  # u
    loss, (new_other, _) = jax.jit(loss_fn, static_argnums=0)(
        graphdef, params, other, TOKENS, TARGETS
    )
    assert loss.dtype == jnp.float32 and abs(float(loss) - math.log(64)) < 0.1
    chex.assert_trees_all_equal_dtypes(new_other, other)


def _spectral_vectors(other) -> list[jax.Array]:
    flat = jax.tree_util.tree_leaves_with_path(other)
    return [x for path, x in flat if jax.tree_util.keystr(path).endswith("['u']")]


def test_jit_train_forward_carries_sigma_reparam_and_dropout_state():
    model = small("llama", sigma_reparam=True, dropout=0.1, **ONE_LAYER)
    for _, layer in nnx.iter_modules(model):
        if isinstance(layer, SigmaReparamLinear):  # drift the kernels so the power step moves u
            layer.kernel[...] = layer.kernel[...] + 0.02
    graphdef, params, other = split_model(model)
    forward = jax.jit(apply, static_argnums=0, static_argnames=("train", "return_metrics"))
    logits, new_other, metrics = forward(graphdef, params, other, TOKENS, return_metrics=True)
    chex.assert_shape(metrics["attn_entropy"], (1, 4))
    chex.assert_trees_all_equal_structs(new_other, other)
    us, new_us = _spectral_vectors(other), _spectral_vectors(new_other)
    assert len(us) == 7 and all(not np.allclose(a, b) for a, b in zip(us, new_us))
    # The stateful eager forward gives the same logits and the same new state.
    chex.assert_trees_all_close(model(TOKENS), logits, atol=1e-5)
    chex.assert_trees_all_close(_spectral_vectors(split_model(model)[2]), new_us, atol=1e-6)
    # A second step draws new dropout masks from the carried random state.
    logits_2, _, _ = forward(graphdef, params, new_other, TOKENS, return_metrics=True)
    assert not np.allclose(logits, logits_2)


def test_make_model_from_preset_name_and_config():
    shape = {**SMALL, "n_layer": 1, "d_ff": None}
    model = make_model("llama-tiny", seed=3, **shape)
    assert isinstance(model, Transformer) and model.config.n_layer == 1
    assert model.config == ModelConfig(arch="llama", **shape)
    again = make_model(model.config, seed=3)
    chex.assert_trees_all_equal(split_model(model)[1], split_model(again)[1])
