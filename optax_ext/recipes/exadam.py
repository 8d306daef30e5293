"""EXAdam (Adly, 2024) and SGD-SaI (Xu et al., 2024)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import optax

from optax_ext.primitives.elementwise import scale_by_exadam, scale_by_sgd_sai
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay
from optax_ext.recipes import _common


def exadam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    mask: Any = None,
) -> optax.GradientTransformation:
    """EXAdam: cross-moment debiased Adam plus a bias-corrected gradient term.

    Algorithm (see :func:`optax_ext.scale_by_exadam`)::

        W <- W (1 - lr wd) - a_k (d1 m_hat + d1 g_hat) / (sqrt(d2 v_hat) + eps)

    with the step size ``a_k = lr`` (HEAD), or ``a_k = lr ln(sqrt(2 (k + 1)))`` (v1) when
    ``learning_rate`` is :func:`exadam_v1_schedule` ``(lr)``; the decay always uses the plain
    ``lr``, as the reference (which schedules the update only).

    Args:
      learning_rate: Default 1e-3 (README: NLP 3e-4). Use :func:`exadam_v1_schedule` for the
        first version's growing step size; any other schedule is the group learning rate and
        scales both the update and the decay, as a PyTorch scheduler would.
      b1, b2, eps: Defaults 0.9, 0.999, 1e-8.
      weight_decay: decoupled, before the step (not in the paper's algorithm). Default 0.
      mask: weight-decay mask.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Adly, 2024, "EXAdam: The Power of Adaptive Cross-Moments", arXiv 2412.20302; code:
      github.com/AhmedMostafa16/EXAdam (``exadam.py`` at 989d7b6; v1 at 48d6ef5).

    Notes:
      The first steps are much larger than Adam's (``g / (1 - b1)`` at step 1); the asymptotic
      update is up to ~2x Adam's. HEAD of the reference cannot be constructed as-is (a stray
      ``np.sqrt`` without numpy imported); nothing numeric depends on it.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.exadam()
      >>> tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))[0].shape
      (2,)
    """
    group_lr = learning_rate.learning_rate if isinstance(learning_rate, _V1Schedule) else learning_rate
    return _common.tied(optax.chain(
        scale_by_exadam(b1, b2, eps),  # u = (d1 m_hat + d1 g_hat) / (sqrt(d2 v_hat) + eps)
        optax.scale_by_learning_rate(learning_rate),  # u <- -a_k u
        add_decoupled_weight_decay(weight_decay, group_lr, after_update=False, mask=mask),
    ))


@dataclasses.dataclass(frozen=True)
class _V1Schedule:
    """EXAdam v1's step size as a schedule that remembers its group learning rate."""

    learning_rate: float

    def __call__(self, count):
        k = jnp.asarray(count, jnp.float32) + 1
        return self.learning_rate * jnp.log(math.sqrt(2.0) * jnp.sqrt(k + 1))


def exadam_v1_schedule(learning_rate: float) -> optax.Schedule:
    """EXAdam v1's step size ``lr ln(sqrt(2) sqrt(k + 1))`` for the 1-based step ``k``.

    Unbounded growth (0.69 lr at k = 1, 3.8 lr at k = 1000); an optax schedule of the 0-based
    count, for ``exadam(exadam_v1_schedule(lr))``, which decays the weights with the plain ``lr``
    (the schedule carries it). Passed through ``optax.inject_hyperparams`` it becomes a plain
    schedule, which then scales the decay too.

    References:
      Adly, 2024, arXiv 2412.20302 v1; code: github.com/AhmedMostafa16/EXAdam at 48d6ef5.

    Example:
      >>> from optax_ext import exadam_v1_schedule
      >>> round(float(exadam_v1_schedule(1.0)(0)), 4)   # ln(2)
      0.6931
    """
    return _V1Schedule(learning_rate)


def sgd_sai(
    learning_rate: optax.ScalarOrSchedule = 1e-2,
    beta: float = 0.9,
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    *,
    normalize_by_max: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """SGD-SaI: momentum SGD with per-tensor learning rates fixed at the first step (g-SNR).

    Algorithm (per tensor; see :func:`optax_ext.scale_by_sgd_sai`)::

        step 1:  gsnr = ||g_1|| / (std(g_1) + eps);   m <- g_1
        later:   m <- beta m + (1 - beta) g
        W <- W (1 - lr wd) - lr gsnr m

    Args:
      learning_rate: Default 1e-2. beta: Default 0.9. weight_decay: Default 1e-2.
      eps: Default 1e-8.
      normalize_by_max: the paper's normalisation by the largest gsnr (the code: off).
      mask: weight-decay mask.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Xu, Xiang, Cai, Wen, 2024, "No More Adam: Learning Rate Scaling at Initialization is All
      You Need", arXiv 2412.11768; code: github.com/AnonymousAlethiometer/SGD_SaI (e213080).

    Notes:
      The "block" is the parameter tensor: fusing q/k/v into one tensor changes gsnr; pass the
      partition you want (e.g. through ``optax.partition``) to reproduce another model's blocks.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.sgd_sai()
      >>> tx.update(jnp.array([1.0, 2.0]), tx.init(jnp.zeros(2)), jnp.zeros(2))[0].shape
      (2,)
    """
    return _common.tied(optax.chain(
        scale_by_sgd_sai(beta, eps, normalize_by_max=normalize_by_max),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    ))
