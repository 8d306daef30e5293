"""lm_loss: softmax / StableMax cross-entropy, z-loss, masks; soft-cap."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import lm_loss, log_stablemax, softcap


def test_softmax_cross_entropy_and_z_loss_by_hand():
    logits = jnp.log(jnp.array([[1.0, 3.0], [2.0, 2.0]]))  # lse = log 4 in both rows
    targets = jnp.array([1, 1])
    loss, metrics = lm_loss(logits, targets, z_loss=0.1)
    ce = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    z = 0.1 * math.log(4.0) ** 2
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(metrics["z_loss"], z, rtol=1e-6)
    np.testing.assert_allclose(loss, ce + z, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)  # row 2 is a tie: argmax picks 0, a miss


def test_z_loss_off_adds_nothing_and_is_differentiable():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 7))
    targets = jnp.zeros((3, 5), jnp.int32)
    base, metrics = lm_loss(logits, targets)
    assert float(metrics["z_loss"]) == 0.0 and float(base) == float(metrics["ce"])
    coef = 1e-2
    grad = jax.grad(lambda x: lm_loss(x, targets, z_loss=coef)[0])(logits)
    grad0 = jax.grad(lambda x: lm_loss(x, targets)[0])(logits)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    expected = grad0 + coef * 2 * lse * jax.nn.softmax(logits) / 15  # d/dx mean(lse^2)
    chex.assert_trees_all_close(grad, expected, atol=1e-6)


def test_stablemax_by_hand():
    logits = jnp.array([[0.0, 1.0, -1.0]])  # s = (1, 2, 1/2), sum 3.5
    for target, p in ((0, 1 / 3.5), (1, 2 / 3.5), (2, 0.5 / 3.5)):
        loss, _ = lm_loss(logits, jnp.array([target]), output="stablemax")
        np.testing.assert_allclose(loss, -math.log(p), rtol=1e-6)


def test_stablemax_matches_float64_reference_and_is_safe_for_huge_logits():
    x = np.asarray(jax.random.normal(jax.random.key(1), (4, 9))) * 30.0
    x64 = x.astype(np.float64)
    s = np.where(x64 >= 0, x64 + 1.0, 1.0 / (1.0 - x64))
    reference = np.log(s / s.sum(-1, keepdims=True))
    np.testing.assert_allclose(log_stablemax(jnp.asarray(x)), reference, rtol=1e-5, atol=1e-6)

    huge = jnp.array([[3e38, -3e38, 0.0, 1e-30]])
    logp = log_stablemax(huge)
    assert bool(jnp.all(jnp.isfinite(logp)))
    grad = jax.grad(lambda z: lm_loss(z, jnp.array([2]), output="stablemax")[0])(huge)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_stablemax_probabilities_sum_to_one_in_bf16_input():
    x = jax.random.normal(jax.random.key(2), (6, 11), jnp.bfloat16) * 4
    logp = log_stablemax(x)
    assert logp.dtype == jnp.float32
    np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, rtol=1e-6)


def test_mask_weights_the_mean_and_ignores_masked_targets():
    logits = jax.random.normal(jax.random.key(3), (2, 4, 6))
    targets = jnp.array([[1, 2, 3, -100], [0, 5, -100, -100]])  # -100: padding
    mask = targets >= 0
    loss, _ = lm_loss(logits, targets, mask=mask, z_loss=1e-3)
    keep = np.asarray(mask)
    sub_loss, _ = lm_loss(logits[keep], targets[keep], z_loss=1e-3)
    np.testing.assert_allclose(loss, sub_loss, rtol=1e-6)
    empty, _ = lm_loss(logits, targets, mask=jnp.zeros_like(mask))
    assert float(empty) == 0.0


def test_unknown_output_raises():
    with pytest.raises(ValueError, match="output"):
        lm_loss(jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), output="sparsemax")


def test_softcap_bounds_and_identity_near_zero():
    x = jnp.array([-1e4, -30.0, -1e-3, 0.0, 1e-3, 30.0, 1e4])
    y = softcap(x, 30.0)
    assert bool(jnp.all(jnp.abs(y) <= 30.0))
    np.testing.assert_allclose(y[2:5], x[2:5], rtol=1e-6)
    np.testing.assert_allclose(y[5], 30.0 * math.tanh(1.0), rtol=1e-6)
