"""ModelConfig: validation, presets and the analytic parameter count."""

import ast
import dataclasses
import pathlib

import jax
import pytest
from flax import nnx

from models import PRESETS, ModelConfig, Transformer


def _real_count(config: ModelConfig) -> int:
    """Parameter count of the built module (abstract init: no arrays are allocated)."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_defaults_leave_every_stability_option_off():
    c = ModelConfig()
    assert (c.qk_norm, c.z_loss, c.logit_softcap, c.output) == (False, 0.0, None, "softmax")
    assert (c.sigma_reparam, c.embed_grad_shrink, c.dropout) == (False, 1.0, 0.0)
    assert (c.vocab_size, c.kv_heads, c.tie_embeddings) == (256, c.n_head, False)


def test_config_is_frozen_slotted_and_hashable():
    c = ModelConfig.preset("gpt2-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layer = 3  # type: ignore[misc]
    assert not hasattr(c, "__dict__")
    assert hash(c) == hash(ModelConfig.preset("gpt2-tiny"))


@pytest.mark.parametrize(
    "name, shape",
    [
        ("llama-60m", (512, 8, 8, 1376, 32000)),
        ("llama-130m", (768, 12, 12, 2048, 32000)),
        ("llama-350m", (1024, 24, 16, 2736, 32000)),
        ("llama-1b", (2048, 24, 32, 5461, 32000)),
        ("llama-7b", (4096, 32, 32, 11008, 32000)),
        ("gpt2-124m", (768, 12, 12, 3072, 50304)),
    ],
)
def test_paper_shapes(name, shape):
    c = ModelConfig.preset(name)
    assert (c.d_model, c.n_layer, c.n_head, c.ffn_dim, c.vocab_size) == shape


@pytest.mark.parametrize(
    "name, millions",
    [
        ("gpt2-124m", 124.48),
        ("llama-60m", 58.07),
        ("llama-130m", 134.11),
        ("llama-350m", 367.97),
        ("llama-1b", 1339.08),
        ("llama-7b", 6738.42),
    ],
)
def test_num_params_of_large_presets(name, millions):
    assert ModelConfig.preset(name).num_params() / 1e6 == pytest.approx(millions, abs=0.01)


def test_small_presets_are_small_and_byte_level():
    for name in ("gpt2-tiny", "llama-tiny"):
        c = ModelConfig.preset(name)
        assert c.num_params() <= 1_000_000 and c.vocab_size == 256
    assert 1e6 < ModelConfig.preset("gpt2-small").num_params() < 1e7
    assert 15e6 < ModelConfig.preset("llama-20m").num_params() < 25e6
    assert ModelConfig.preset("llama-20m").vocab_size == 256


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(qk_norm=True),
        dict(sigma_reparam=True),
        dict(tie_embeddings=True),
        dict(n_kv_head=1, d_ff=200),
    ],
    ids=["plain", "qk_norm", "sigma_reparam", "tied", "gqa"],
)
def test_num_params_matches_the_module(name, options):
    config = ModelConfig.preset(name, **options)
    assert config.num_params() == _real_count(config)


def test_preset_overrides_and_unknown_name():
    c = ModelConfig.preset("llama-tiny", qk_norm=True, n_layer=3)
    assert c.qk_norm and c.n_layer == 3 and c.arch == "llama"
    with pytest.raises(ValueError, match="Unknown preset"):
        ModelConfig.preset("gpt5")
    assert set(PRESETS) >= {"gpt2-tiny", "llama-tiny", "gpt2-small", "gpt2-124m", "llama-20m"}


@pytest.mark.parametrize(
    "bad",
    [
        dict(arch="t5"),
        dict(d_model=130, n_head=4),
        dict(n_kv_head=3),
        dict(arch="llama", d_model=12, n_head=4),  # odd head dim for RoPE
        dict(output="sparsemax"),
        dict(dtype="float64"),
        dict(dropout=1.0),
        dict(z_loss=-1.0),
        dict(logit_softcap=0.0),
        dict(embed_grad_shrink=1.5),
    ],
)
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError, match="ModelConfig"):
        ModelConfig(**bad)


def test_derived_defaults():
    assert ModelConfig(arch="gpt2", d_model=64, n_head=4).ffn_dim == 256
    assert ModelConfig(arch="llama", d_model=512, n_head=8).ffn_dim == 1376
    assert ModelConfig(arch="gpt2").eps == 1e-5 and ModelConfig(arch="llama").eps == 1e-6


def test_models_do_not_import_optimizers():
    root = pathlib.Path(__file__).resolve().parents[2] / "models"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("optax", "optax_ext") for n in names), path.name
