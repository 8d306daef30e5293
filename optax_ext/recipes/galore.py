"""GaLore (Zhao et al., 2024) and Fira (Chen et al., 2024): Adam in a low-rank gradient subspace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.projections import SVDProjector
from optax_ext.primitives.moments import scale_by_adam, scale_by_bias_correction
from optax_ext.primitives.projection import Projector, ScaledResidual, project_low_rank
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay
from optax_ext.recipes import _common


def scale_by_galore(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    projector: Projector = SVDProjector(rank=128, update_every=50),
    scale: float = 1.0,
    residual: ScaledResidual | None = None,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """GaLore's direction (Fira's with a residual), before the learning rate.

    Algorithm (``t`` the 1-based step)::

        R <- proj_P(G);  M, V <- Adam moments of R (kept across refreshes of P)
        N <- M / (sqrt(V) + eps)
        U <- scale back_P(N)                                 (GaLore)
        U <- a back_P(N) + limit(phi(N, R) (G - a back_P(R)))  (Fira, residual=ScaledResidual(a))
        U <- U sqrt(1 - b2^t) / (1 - b1^t)

    Args:
      b1, b2, eps: Adam constants. Defaults 0.9, 0.999, 1e-6 (HF AdamW class of the reference).
      projector: default ``SVDProjector(rank=128, update_every=50, side="std")``: top-r singular
        vectors of the current gradient on the smaller side of the ``(fan_in, fan_out)`` view
        (fan-in on ties), refreshed at 0-based steps ``k % T == 0``.
      scale: GaLore's back-projection scale (``alpha``). Ignored with a residual (whose own
        ``scale`` plays that role).
      residual: None or :class:`optax_ext.ScaledResidual` (Fira).
      specs: which axes are fan-in/fan-out.

    Returns:
      An ``optax.GradientTransformation``.
    """
    return optax.chain(
        project_low_rank(
            scale_by_adam(b1, b2, eps, bias_correction="none"),
            projector,
            residual=residual,
            specs=specs,
        ),
        optax.scale(scale) if residual is None else optax.identity(),
        scale_by_bias_correction(b1, b2),
    )


def galore(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    projector: Projector = SVDProjector(rank=128, update_every=50),
    scale: float = 1.0,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """GaLore-AdamW: Adam in a low-rank subspace of each hidden matrix's gradient.

    Algorithm (hidden matrices; ``k`` the 0-based step, ``t = k + 1``)::

        if k mod T == 0:  P <- top-r singular vectors of G (smaller side)
        R <- P^T G;   M <- b1 M + (1 - b1) R;   V <- b2 V + (1 - b2) R^2
        W <- W - lr sqrt(1 - b2^t)/(1 - b1^t) * scale * P (M / (sqrt(V) + eps))
        W <- W (1 - lr wd)                                      # after the step

    Other parameters take the same class's HF AdamW path with the same hyperparameters.

    Args:
      learning_rate: Default 1e-3 (class default; README LLaMA-60M: 0.01 with scale 0.25).
      b1, b2, eps: Defaults 0.9, 0.999, 1e-6.
      weight_decay: decoupled decay applied after the step with the plain lr. Default 0.
      projector: rank and refresh period live here (static shapes): default
        ``SVDProjector(rank=128, update_every=50, side="std")`` (argparse defaults). The
        projected side is the smaller of fan-in/fan-out of a flax ``(in, out)`` kernel
        (fan-in on ties); ``side="reverse_std"``/``"fan_in"``/``"fan_out"`` choose otherwise.
      scale: back-projection scale (GaLore's ``alpha``). Default 1.0 (README uses 0.25).
      param_labels: ``"hidden"``/``"other"`` labels; default
        :func:`optax_ext.labels.hidden_matrices` (the reference puts only attention/MLP linear
        weights in the rank group).
      specs: which axes are fan-in/fan-out.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: in ``init`` if a leaf labelled hidden has ``ndim < 2``.

    References:
      Zhao, Zhang, Chen, Wang, Anandkumar, Tian, 2024, "GaLore: Memory-Efficient LLM Training by
      Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507; code:
      github.com/jiaweizzhao/GaLore (``galore_torch/adamw.py``, ``galore_projector.py`` at
      2cc66f8).

    Notes:
      - Follows the code: HF bias correction (eps on the uncorrected ``sqrt(V)``), decay after the
        step with ``lr``, refresh at 0-based steps (``pytorch_optimizer`` refreshes one call
        earlier), moments kept (not rotated) across refreshes.
      - SVD signs: our SVD's signs can differ from torch's at a refresh, which changes the
        trajectory (moments persist); tests replay the recorded bases through ``projector``.
      - ``proj_type="full"`` (two-sided) is not offered. N-D leaves are batches of matrices (the
        reference's Tucker projector for N-D tensors is broken, see the spec).
      - float16 parameters: float32 state and arithmetic, float16 updates; zero-size leaves
        pass through (zero-size updates).

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> from optax_ext.kernels import SVDProjector
      >>> params = {"mlp": {"kernel": jnp.ones((8, 16))}, "ln": {"scale": jnp.ones(16)}}
      >>> tx = optax_ext.galore(projector=SVDProjector(rank=2, update_every=10))
      >>> u, s = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> u["mlp"]["kernel"].shape
      (8, 16)
    """
    hidden = optax.chain(
        scale_by_galore(b1, b2, eps, projector=projector, scale=scale, specs=specs),
        optax.scale_by_learning_rate(learning_rate),
        add_decoupled_weight_decay(weight_decay, learning_rate),
    )
    other = _common.adamw(
        learning_rate, b1, b2, eps, weight_decay, bias_correction="hf", decay_after_update=True
    )
    return _common.float16_in_float32(_common.hidden_and_other(hidden, other, param_labels))


def fira(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    projector: Projector = SVDProjector(rank=128, update_every=50),
    residual: ScaledResidual = ScaledResidual(scale=1.0, gamma=1.01),
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
) -> optax.GradientTransformation:
    """Fira: GaLore plus the norm-scaled full-rank residual of the gradient.

    Algorithm (hidden matrices; as :func:`galore`, with ``a`` = ``residual.scale``)::

        N <- M / (sqrt(V) + eps)                         # low-rank Adam, uncorrected
        S <- phi(N, R) * (G - a back(R));  phi_c = ||N_c|| / (||R_c|| + 1e-8)
        S <- S / lam, lam = max(||S|| / ||S_prev||, 1.01) / 1.01     # norm-growth limiter
        W <- W - lr sqrt(1 - b2^t)/(1 - b1^t) (a back(N) + S);   W <- W (1 - lr wd)

    Args:
      learning_rate: Default 1e-3 (README LLaMA-60M: 0.01 with alpha 0.25).
      b1, b2, eps: Defaults 0.9, 0.999, 1e-6.
      weight_decay: decay after the step with the plain lr. Default 0.
      projector: as :func:`galore` (default rank 128, T = 50).
      residual: :class:`optax_ext.ScaledResidual` with the back-projection scale ``a`` (Fira's
        ``alpha``, default 1.0) and the limiter ``gamma`` (1.01). Channels are the entries of the
        non-projected side (one factor per fan-out unit when the fan-in side is projected).
      param_labels, specs: as :func:`galore`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: in ``init`` if a leaf labelled hidden has ``ndim < 2``.

    References:
      Chen, Feng, Li, Lai, Yue, Yuan, Wang, 2024, "Fira: Can We Achieve Full-rank Training of
      LLMs Under Low-rank Constraint?", arXiv 2410.01623; code: github.com/xichen-fy/Fira
      (``optimizer_torch/fira_adamw.py`` at 5c28b13).

    Notes:
      - Follows the code: the residual subtracts the ``a``-scaled projection (the paper's
        ``G - P R`` only for ``a = 1``), the limiter divides by ``max(ratio, gamma)/gamma``, and
        the bias correction multiplies both terms.
      - The limiter memory is one scalar per matrix, kept across refreshes.
      - float16 parameters: float32 state and arithmetic, float16 updates; zero-size leaves
        pass through (zero-size updates).

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> from optax_ext.kernels import SVDProjector
      >>> params = {"w": jnp.ones((8, 16))}
      >>> tx = optax_ext.fira(projector=SVDProjector(rank=2, update_every=10))
      >>> tx.update(params, tx.init(params), params)[0]["w"].shape
      (8, 16)
    """
    hidden = optax.chain(
        scale_by_galore(b1, b2, eps, projector=projector, residual=residual, specs=specs),
        optax.scale_by_learning_rate(learning_rate),
        add_decoupled_weight_decay(weight_decay, learning_rate),
    )
    other = _common.adamw(
        learning_rate, b1, b2, eps, weight_decay, bias_correction="hf", decay_after_update=True
    )
    return _common.float16_in_float32(_common.hidden_and_other(hidden, other, param_labels))
