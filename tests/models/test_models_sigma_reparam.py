"""σReparam linear layer: init, power iteration, eval mode, and the authors' goldens.

Goldens (``tests/goldens/sigma_reparam.npz``, see its json):

- ``torch/*``: 12 training-mode forwards of PyTorch ``SpectralNormedWeight`` (+ ``SNLinear``'s
  ``gamma = sigma_0``) on a drifting weight ``W_t`` of shape ``(out, in) = (32, 64)``, started
  from ``init/w1`` of the standard problem (``RandomState(0)``, x0.1) with ``u0`` its top right
  singular vector: recorded ``u_t``, ``sigma_t``, ``W_hat_t`` and ``dL/dW_t`` for
  ``L = sum(W_hat_t * target_w1)`` (``target_w1``: ``RandomState(1).randn(32, 64) * 0.1``).
  Our kernel is ``W_t^T`` (``(in, out)``); PyTorch's ``u`` lives on the fan-in side, as ours.
- ``flax/*``: three applies of the authors' Flax ``SNDense`` (kernel ``(in, out) = (64, 16)``,
  ``gamma = 1``, zero bias), whose ``u`` lives on the fan-out side: the same power step on the
  transposed kernel.
"""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import (
    ModelConfig,
    SigmaReparamLinear,
    SpectralState,
    Transformer,
    power_iteration_step,
    split_model,
)

GOLDENS = pathlib.Path(__file__).resolve().parents[1] / "goldens"
TOL = dict(atol=1e-5, rtol=1e-5)
RNG = np.random.RandomState(0)


def _golden():
    meta = json.loads((GOLDENS / "sigma_reparam.json").read_text())
    with np.load(GOLDENS / "sigma_reparam.npz") as data:
        return meta, {k: data[k] for k in data.files}


def _layer(fan_in=24, fan_out=40, seed=0, **kw):
    return SigmaReparamLinear(fan_in, fan_out, rngs=nnx.Rngs(seed), **kw)


def test_init_is_exact_and_identity_reparametrisation():
    layer = _layer(use_bias=True)
    kernel = layer.kernel[...]
    true = np.linalg.norm(kernel, 2)
    np.testing.assert_allclose(layer.sigma(), true, rtol=1e-6)
    np.testing.assert_allclose(layer.gamma[...], true, rtol=1e-6)  # gamma_0 = sigma_0
    x = RNG.randn(3, 24).astype(np.float32)
    chex.assert_trees_all_close(layer(x), x @ kernel, **TOL)  # W_hat == W at init, zero bias
    assert layer.u[...].shape == (24,)  # fan-in side
    assert isinstance(layer.u, SpectralState) and not isinstance(layer.u, nnx.Param)


def test_sigma_converges_to_the_spectral_norm_after_training_forwards():
    layer = _layer()
    # a kernel with a spectral gap (5 vs 2): power iteration converges like (2/5)^steps
    u, _ = np.linalg.qr(RNG.randn(24, 24))
    v, _ = np.linalg.qr(RNG.randn(40, 24))
    new_kernel = (u * np.linspace(2.0, 0.5, 24).clip(0.5) * np.r_[2.5, np.ones(23)]) @ v.T
    new_kernel = new_kernel.astype(np.float32)
    layer.kernel[...] = new_kernel
    x = jnp.ones((2, 24))
    first = layer.sigma()
    for _ in range(60):
        layer(x)
    true = np.linalg.norm(new_kernel, 2)
    np.testing.assert_allclose(layer.sigma(), true, rtol=1e-5)
    assert abs(float(first) - float(true)) > 1e-3  # one step from the stale u is not exact


def test_eval_mode_does_not_update_u():
    layer = _layer()
    layer.kernel[...] = jnp.asarray(RNG.randn(24, 40), jnp.float32)
    u0 = layer.u[...]
    x = jnp.ones((2, 24))
    y_eval = layer(x, deterministic=True)
    chex.assert_trees_all_equal(layer.u[...], u0)
    layer.eval()
    chex.assert_trees_all_equal(layer(x), y_eval)
    chex.assert_trees_all_equal(layer.u[...], u0)
    layer.train()
    layer(x)
    assert not np.allclose(layer.u[...], u0)


def test_sigma_gradient_is_the_outer_product_of_singular_vectors():
    kernel = RNG.randn(24, 40).astype(np.float32)
    left, _, right_t = np.linalg.svd(kernel)
    grad = jax.grad(lambda k: power_iteration_step(k, left[:, 0])[0])(kernel)
    chex.assert_trees_all_close(grad, np.outer(left[:, 0], right_t[0]), atol=1e-5)


def test_replays_pytorch_spectral_normed_weight_golden():
    meta, g = _golden()
    target = (np.random.RandomState(1).randn(32, 64) * 0.1).astype(np.float32)  # (out, in)
    layer = SigmaReparamLinear(64, 32, use_bias=False, rngs=nnx.Rngs(0))
    layer.u[...] = jnp.asarray(g["torch/u0"])  # [in]
    layer.gamma[...] = jnp.asarray(meta["torch_gamma"], jnp.float32)
    np.testing.assert_allclose(meta["torch_gamma"], g["torch/sigma0"][0], rtol=1e-7)
    eye = jnp.eye(64)

    def loss(layer):
        w_hat_t = layer(eye)  # [in, out] = W_hat^T
        return jnp.sum(w_hat_t * target.T), w_hat_t

    for t in range(g["torch/W"].shape[0]):
        layer.kernel[...] = jnp.asarray(g["torch/W"][t].T)  # (out, in) -> (in, out)
        sigma = layer.sigma()
        (_, w_hat_t), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
        msg = f"step {t}"
        np.testing.assert_allclose(layer.u[...], g["torch/u"][t], **TOL, err_msg=msg)
        np.testing.assert_allclose(sigma, g["torch/sigma"][t, 0], **TOL, err_msg=msg)
        np.testing.assert_allclose(w_hat_t.T, g["torch/W_hat"][t], **TOL, err_msg=msg)
        np.testing.assert_allclose(grads.kernel[...].T, g["torch/dW"][t], **TOL, err_msg=msg)


def test_replays_flax_sndense_golden():
    _, g = _golden()
    kernel = jnp.asarray(g["flax/kernel"])  # (in, out) = (64, 16)
    gamma = jnp.asarray(g["flax/sigma_param"][0])
    # SNDense keeps u on the fan-out side: our step on the transposed kernel.
    u = jnp.asarray(g["flax/u_init"])
    np.testing.assert_allclose(g["flax/norm_init"][0], np.linalg.norm(kernel, 2), rtol=1e-5)
    for i in range(3):
        sigma, u = power_iteration_step(kernel.T, u)
        np.testing.assert_allclose(u, g[f"flax/u_{i}"], **TOL, err_msg=f"apply {i}")
        np.testing.assert_allclose(sigma, g[f"flax/norm_{i}"], **TOL, err_msg=f"apply {i}")
    # The layer (u on the fan-in side, from its own SVD) gives the same outputs.
    layer = SigmaReparamLinear(64, 16, rngs=nnx.Rngs(0))
    layer.kernel[...] = kernel
    layer.u[...] = jnp.asarray(np.linalg.svd(g["flax/kernel"])[0][:, 0])
    layer.gamma[...] = gamma
    for i in range(3):
        y = layer(jnp.asarray(g["flax/x"]))
        np.testing.assert_allclose(y, g[f"flax/y_{i}"], **TOL, err_msg=f"apply {i}")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_hidden_linears_are_reparametrised_and_u_lives_outside_params(arch):
    config = ModelConfig(arch=arch, vocab_size=64, block_size=16, n_layer=1, n_head=4, d_model=32,
                         sigma_reparam=True)  # fmt: skip
    model = Transformer(config, rngs=nnx.Rngs(0))
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, SigmaReparamLinear)]
    assert len(layers) == (6 if arch == "gpt2" else 7)
    assert not isinstance(model.lm_head, SigmaReparamLinear)
    _, params, other = split_model(model)
    param_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    other_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(other)]
    assert not any("['u']" in p for p in param_paths)
    assert sum("['u']" in p for p in other_paths) == len(layers)
    assert sum("['gamma']" in p for p in param_paths) == len(layers)

    # Drift the kernels: a training forward moves every u, an evaluation forward none.
    for layer in layers:
        layer.kernel[...] = layer.kernel[...] + 0.05 * jnp.ones_like(layer.kernel[...])
    before = [layer.u[...] for layer in layers]
    tokens = jnp.arange(16).reshape(2, 8)
    model.eval()
    model(tokens)
    chex.assert_trees_all_equal([layer.u[...] for layer in layers], before)
    model.train()
    model(tokens)
    assert all(not np.allclose(layer.u[...], u) for layer, u in zip(layers, before))
