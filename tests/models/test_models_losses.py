"""lm_loss: softmax / StableMax cross-entropy, z-loss, masks; soft-cap.

References are computed in NumPy float64; the functions under test are jitted (one compilation
per signature instead of one per primitive).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import lm_loss as lm_loss_eager
from models import log_stablemax, softcap

lm_loss = jax.jit(lm_loss_eager, static_argnames=("output",))
RNG = np.random.RandomState(0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _log_stablemax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    s = np.where(x >= 0, x + 1.0, 1.0 / (1.0 - np.minimum(x, 0.0)))
    return np.log(s / s.sum(-1, keepdims=True))


def test_softmax_cross_entropy_and_z_loss_by_hand():
    logits = np.log(np.array([[1.0, 3.0], [2.0, 2.0]], np.float32))  # lse = log 4 in both rows
    targets = jnp.array([1, 1])
    loss, metrics = lm_loss(logits, targets, z_loss=0.1)
    ce = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    z = 0.1 * math.log(4.0) ** 2
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(metrics["z_loss"], z, rtol=1e-6)
    np.testing.assert_allclose(loss, ce + z, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)  # row 2 is a tie: argmax picks 0, a miss


def test_z_loss_gradient_and_off_by_default():
    logits = RNG.randn(3, 5, 7).astype(np.float32)
    targets = jnp.zeros((3, 5), jnp.int32)
    base, metrics = lm_loss(logits, targets)
    assert float(metrics["z_loss"]) == 0.0 and float(base) == float(metrics["ce"])
    coef = 1e-2
    grad_fn = jax.jit(jax.grad(lambda x, z: lm_loss_eager(x, targets, z_loss=z)[0]))
    grad, grad0 = grad_fn(logits, coef), grad_fn(logits, 0.0)
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x).sum(-1, keepdims=True))
    softmax = np.exp(x - lse)
    np.testing.assert_allclose(grad0, (softmax - np.eye(7)[0]) / 15, atol=1e-7)
    np.testing.assert_allclose(grad - grad0, coef * 2 * lse * softmax / 15, atol=1e-7)


def test_stablemax_by_hand():
    logits = jnp.array([[0.0, 1.0, -1.0]] * 3)  # s = (1, 2, 1/2), sum 3.5
    _, metrics = lm_loss(logits, jnp.array([0, 1, 2]), output="stablemax")
    expected = -np.mean(np.log([1 / 3.5, 2 / 3.5, 0.5 / 3.5]))
    np.testing.assert_allclose(metrics["ce"], expected, rtol=1e-6)


def test_stablemax_matches_float64_reference_and_is_safe_for_huge_logits():
    x = (RNG.randn(4, 9) * 30.0).astype(np.float32)
    logp = jax.jit(log_stablemax)(x)
    np.testing.assert_allclose(logp, _log_stablemax(x), rtol=1e-5, atol=1e-6)
    targets = np.array([1, 2, 3, 4])
    loss, _ = lm_loss(x, targets, output="stablemax")
    expected = -np.mean(_log_stablemax(x)[np.arange(4), targets])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

    huge = jnp.array([[3e38, -3e38, 0.0, 1e-30]])
    loss_fn = lambda z: lm_loss_eager(z, jnp.array([2]), output="stablemax")[0]  # noqa: E731
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(huge)
    np.testing.assert_allclose(loss, np.log(3e38), rtol=1e-6)  # p_2 = s(0) / sum s ~ 1 / 3e38
    assert np.all(np.isfinite(grad))


def test_stablemax_probabilities_sum_to_one_for_bf16_input():
    x = jnp.asarray(RNG.randn(6, 11) * 4, jnp.bfloat16)
    logp = jax.jit(log_stablemax)(x)
    assert logp.dtype == jnp.float32
    np.testing.assert_allclose(np.exp(np.asarray(logp, np.float64)).sum(-1), 1.0, rtol=1e-6)


def test_mask_weights_the_mean_and_ignores_masked_targets():
    logits = RNG.randn(2, 4, 6).astype(np.float32)
    targets = np.array([[1, 2, 3, -100], [0, 5, -100, -100]])  # -100: padding
    mask = targets >= 0
    loss, metrics = lm_loss(logits, targets, mask=mask, z_loss=1e-3)
    logp = _log_softmax(logits)[mask]
    ce = -np.mean(logp[np.arange(mask.sum()), targets[mask]])
    lse = np.log(np.exp(logits[mask].astype(np.float64)).sum(-1))
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(loss, ce + 1e-3 * np.mean(lse**2), rtol=1e-6)
    empty, _ = lm_loss(logits, targets, mask=np.zeros_like(mask), z_loss=1e-3)
    assert float(empty) == 0.0


def test_unknown_output_raises():
    with pytest.raises(ValueError, match="output"):
        lm_loss_eager(jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), output="sparsemax")


def test_softcap_bounds_and_identity_near_zero():
    x = np.array([-1e4, -30.0, -1e-3, 0.0, 1e-3, 30.0, 1e4], np.float32)
    y = np.asarray(jax.jit(softcap, static_argnums=1)(x, 30.0))
    assert np.all(np.abs(y) <= 30.0)
    np.testing.assert_allclose(y[2:5], x[2:5], rtol=1e-6)
    np.testing.assert_allclose(y[5], 30.0 * math.tanh(1.0), rtol=1e-6)
