"""ROOT: robust orthogonalized optimizer (He et al., 2025)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.newton_schulz import NewtonSchulz, PolarSVD
from optax_ext.primitives.moments import momentum
from optax_ext.primitives.orthogonalize import orthogonalize, scale_by_shape
from optax_ext.primitives.spikes import clip_by_quantile
from optax_ext.recipes import _common


def root(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.1,
    beta: float = 0.95,
    *,
    nesterov: bool = True,
    ns: NewtonSchulz | PolarSVD = NewtonSchulz.root(),
    quantile: float = 0.9,
    quantile_offset: float = 1e-9,
    shape_rule: str = "moonlight",
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """ROOT on hidden matrices, its AdamW backup (same lr and wd) on everything else.

    Algorithm (hidden matrices; code of ``ROOT.step``)::

        M <- mu M + G;   U <- G + mu M                       # heavy-ball, Nesterov
        eps <- Q_0.9(|U|) + 1e-9;   B <- clip(U, -eps, eps)   # outliers clamped, per matrix
        X <- AdaNS5(B)            # fp32 NS with per-shape (a, b, c) keyed (min, max) dims
        W <- W (1 - lr wd) - lr 0.2 sqrt(max(fan_in, fan_out)) X

    Backup (embeddings, head, vectors): ``W <- W (1 - lr wd) - lr sqrt(1 - b2^t)/(1 - b1^t)
    m / (sqrt(v) + eps)`` (eps on the uncorrected ``sqrt(v)``, HF style).

    Args:
      learning_rate: lr for both groups (AdamW scale). Default 1e-3.
      weight_decay: decoupled decay for both groups, before the step. Default 0.1.
      beta: momentum ``mu``. Default 0.95.
      nesterov: Default True.
      ns: default ``NewtonSchulz.root()`` (fp32, the released shape table, Muon's triple for
        other shapes).
      quantile: outlier level. Default 0.9 (hard-coded in the reference).
      quantile_offset: Default 1e-9.
      shape_rule: Default ``"moonlight"`` (``0.2 sqrt(max(fan_in, fan_out))``).
      adam_b1, adam_b2, adam_eps: backup AdamW. Defaults 0.9, 0.95, 1e-8.
      param_labels, specs, mu_dtype: as :func:`optax_ext.muon`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: in ``init`` if a leaf labelled hidden has ``ndim < 2``.

    References:
      He, Han, Zhou, Chen, Liu, Chen, Wang, 2025, "ROOT: Robust Orthogonalized Optimizer for
      Neural Network Training", arXiv 2511.20626; code: github.com/huawei-noah/noah-research
      (``ROOT/examples/example_train.py`` at aa0f80c).

    Notes:
      - Follows the code: Nesterov input, a data-dependent threshold (the README describes a
        fixed one), the Moonlight factor on the step, decoupled decay.
      - "Soft-thresholding" in the README keeps the base, i.e. clamps the outliers (a hard clip).
      - Only four fitted shapes are released (``ROOT_COEFFS``); other shapes use Muon's triple
        (the reference logs a warning each time). N-D leaves key the table by their matrix view.

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> params = {"mlp": {"kernel": jnp.ones((4, 8))}, "ln": {"scale": jnp.ones(8)}}
      >>> tx = optax_ext.root()
      >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> u["ln"]["scale"].shape
      (8,)
    """
    hidden = optax.chain(
        momentum(beta, nesterov=nesterov, ema=False, mu_dtype=mu_dtype),
        clip_by_quantile(quantile, offset=quantile_offset, specs=specs),
        orthogonalize(ns, specs=specs),
        scale_by_shape(shape_rule, specs=specs),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    other = _common.adamw(
        learning_rate, adam_b1, adam_b2, adam_eps, weight_decay, bias_correction="hf"
    )
    return _common.hidden_and_other(hidden, other, param_labels)
