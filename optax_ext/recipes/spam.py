"""SPAM (Huang et al., 2025) and Stable-SPAM: spike-aware Adam with momentum resets."""

from __future__ import annotations

from typing import Any

import optax

from optax_ext.primitives.moments import scale_by_adam
from optax_ext.primitives.resets import momentum_reset, scale_by_reset_warmup
from optax_ext.primitives.spikes import clip_spikes, scale_by_stable_spam
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay
from optax_ext.recipes import _common


def spam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    threshold: float = 5000.0,
    reset_every: int = 500,
    warmup_steps: int = 150,
    grace_steps: int = 20,
    mask: Any = None,
) -> optax.GradientTransformation:
    """SPAM: AdamW with spike clipping, periodic momentum resets and a re-warm-up.

    Algorithm (``t`` the 1-based step; every tensor)::

        if t mod dT == 0:  m, v <- 0                                   (momentum reset)
        if t mod dT >= A:  g <- sign(g) sqrt(theta v)  where g^2 > theta v   (spike clip)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        W <- W - lr s_t sqrt(1 - b2^t)/(1 - b1^t) m / (sqrt(v) + eps)  (s_t: cosine re-warm-up)
        W <- W (1 - lr wd)                                                (after the step)

    Args:
      learning_rate: Default 1e-3 (LLaMA-130M runs: 8e-4 with a separate LR schedule).
      b1, b2: Defaults 0.9, 0.999. eps: Default 1e-6 (class default).
      weight_decay: decoupled, after the step, not scaled by ``s_t``. Default 0.
      threshold: ``theta``; 0 disables clipping. Default 5000.
      reset_every: ``Delta T``. Default 500.
      warmup_steps: ``N`` of the re-warm-up. Default 150 (paper).
      grace_steps: ``A`` (``grad_accu_steps``): no clipping in the first ``A`` steps after init
        and after each reset. Default 20.
      mask: weight-decay mask (tree or function), as ``optax.add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Huang, Zhu, Jin, Liu, Wang, Liu, 2025, "SPAM: Spike-Aware Adam with Momentum Reset for
      Stable LLM Training", ICLR 2025, arXiv 2501.06842; code:
      github.com/TianjinYellow/SPAM-Optimizer (``galore_torch/SPAM.py`` at e8185fb).

    Notes:
      - Bias correction uses the never-reset step count, as in the code.
      - The released launcher passes its LR warm-up length (1000) as ``warmup_steps``; the
        paper's 150 is our default.
      - The sparse-momentum variant (``density``) is not offered: its memory saving comes from
        boolean-indexed 1-D moment buffers whose size changes at every mask resample, which a
        JAX state with static shapes cannot hold (masking full-size buffers saves nothing). Its
        reference also silently skips weight decay on that path.
      - Entries whose ``v`` is exactly 0 are never clipped (see :func:`optax_ext.clip_spikes`).
      - float16 parameters: float32 state and arithmetic, float16 updates; zero-size leaves
        pass through (zero-size updates).

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.spam(reset_every=5, warmup_steps=3, grace_steps=2)
      >>> p = {"w": jnp.ones((4, 4))}
      >>> tx.update(p, tx.init(p), p)[0]["w"].shape
      (4, 4)
    """
    tx = optax.chain(
        momentum_reset(
            clip_spikes(
                scale_by_adam(b1, b2, eps, bias_correction="hf"),
                threshold,
                every=reset_every,
                grace_steps=grace_steps,
            ),
            every=reset_every,
        ),
        scale_by_reset_warmup(reset_every, warmup_steps),
        optax.scale_by_learning_rate(learning_rate),
        add_decoupled_weight_decay(weight_decay, learning_rate, mask=mask),
    )
    return _common.float16_in_float32(tx)  # float16: float32 state and arithmetic


def stable_spam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    gamma3: float = 0.999,
    reset_every: int = 1000,
    total_steps: int | None = None,
    eta_min: float = 0.5,
    clean_reset: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """Stable-SPAM: adaptive spike clipping and gradient normalisation, Adam with resets.

    See :func:`optax_ext.scale_by_stable_spam` for the update; the weights then take
    ``W <- W (1 - lr wd) - lr u`` (decay before the step).

    Args:
      learning_rate: Default 1e-3 (FP4/INT4 LLaMA-350M scripts: 4e-4).
      b1, b2, eps: Defaults 0.9, 0.999, 1e-8.
      weight_decay: Default 0.
      gamma1, gamma2, gamma3: Defaults 0.7, 0.9, 0.999 (class; the launcher uses 0.85, 0.999,
        0.999).
      reset_every: momentum reset period. Default 1000 (class; scripts: 500).
      total_steps: cosine on the momentum coefficients (scripts: 20000); None disables.
      eta_min: Default 0.5.
      clean_reset: the paper's reset instead of the code's stale-moment step (see primitive).
      mask: weight-decay mask.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Huang et al., 2025, "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
      arXiv 2502.17055; code: github.com/TianjinYellow/StableSPAM
      (``galore_torch/stablespam.py`` at 6a54c87).

    Notes:
      Follows the code (stale moments and ``k = 1`` on reset steps); the statistics are
      debiased with the per-tensor count that restarts at each reset, which switches spike
      clipping off for a while after every reset, as in the code. float16 parameters get
      float32 state and arithmetic, and float16 updates; gradients up to the float32 range give
      finite updates (the norm is computed without overflow, statistics saturate).

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.stable_spam()
      >>> p = {"w": jnp.ones((4, 4))}
      >>> tx.update(p, tx.init(p), p)[0]["w"].shape
      (4, 4)
    """
    tx = optax.chain(
        scale_by_stable_spam(
            b1,
            b2,
            eps,
            gamma1=gamma1,
            gamma2=gamma2,
            gamma3=gamma3,
            reset_every=reset_every,
            total_steps=total_steps,
            eta_min=eta_min,
            clean_reset=clean_reset,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _common.float16_in_float32(tx)  # float16: float32 state and arithmetic
