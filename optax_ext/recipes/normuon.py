"""NorMuon: Muon with neuron-wise normalization (Li et al., 2025)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optax_ext._types import SpecLike
from optax_ext.kernels.newton_schulz import NewtonSchulz, PolarSVD
from optax_ext.primitives.moments import momentum
from optax_ext.primitives.normalize import scale_by_neuron_norm
from optax_ext.primitives.orthogonalize import orthogonalize, scale_by_shape
from optax_ext.recipes import _common
from optax_ext.recipes.muon import MUON_ADAM_LR_RATIO


def normuon(
    learning_rate: optax.ScalarOrSchedule = 0.02,
    beta: float = 0.95,
    b2: float = 0.95,
    weight_decay: float = 0.0,
    *,
    nesterov: bool = True,
    ns: NewtonSchulz | PolarSVD = NewtonSchulz.muon(),
    axis: str = "fan_out",
    eps: float = 1e-10,
    eps_inside: bool = False,
    rescale: str = "preserve_norm",
    shape_rule: str | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float | None = None,
    param_labels: Any | Callable[[Any], Any] | None = None,
    specs: SpecLike = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """NorMuon on hidden matrices, Adam on embeddings, head and vectors.

    Algorithm (hidden matrices, code of ``normuon_update``)::

        M <- b M + (1 - b) G;   U <- (1 - b) G + b M        # Nesterov
        O <- NS5(U);   nu <- ||O||_F
        S <- b2 S + (1 - b2) mean_fan_in(O^2)               # one value per output neuron
        O <- O / (sqrt(S) + eps);   O <- O nu / (||O||_F + eps)
        W <- W (1 - lr wd) - lr sqrt(max(1, fan_out / fan_in)) O

    Args:
      learning_rate: lr of the hidden matrices. Default 0.02.
      beta: momentum. Default 0.95.
      b2: decay of the neuron statistic ``S``. Default 0.95.
      weight_decay: decoupled decay (multiplicative, before the step). Default 0.
      nesterov: Default True.
      ns: orthogonalization; default Muon's bf16 quintic. Steps after it run in fp32.
      axis: ``"fan_out"`` (default, the code: per output neuron of a flax ``(in, out)`` kernel,
        i.e. the mean runs over the fan-in axis), ``"fan_in"`` or ``"longer"`` (modded-nanogpt:
        per entry of the longer side). See :func:`optax_ext.scale_by_neuron_norm`.
      eps: Default 1e-10.
      eps_inside: ``rsqrt(max(S, eps))`` (modded-nanogpt). Default False.
      rescale: ``"preserve_norm"`` (code, default) or ``"match_rms"`` (paper: update RMS
        ``0.2 lr``, no shape factor).
      shape_rule: default ``"sqrt_fan_out_over_fan_in"`` for ``preserve_norm`` and ``"none"`` for
        ``match_rms``.
      adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay: the auxiliary Adam
        (defaults ``0.015 * learning_rate`` (3e-4 at lr 0.02, following the main schedule; an
        explicit value wins), 0.9, 0.95, 1e-10, ``weight_decay``).
      param_labels, specs, mu_dtype: as :func:`optax_ext.muon`.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Raises:
      ValueError: in ``init`` if a leaf labelled hidden has ``ndim < 2``.

    References:
      Li, Liu, Liang, Chen, Zhao, 2025, "NorMuon: Making Muon more efficient and scalable",
      arXiv 2510.05491; code: github.com/zichongli5/NorMuon (``normuon.py`` at d45c9a4).

    Notes:
      - Follows the code: Nesterov momentum and norm preservation with the KJ factor; the paper's
        Algorithm 1 (plain momentum, RMS-matched lr) is ``nesterov=False, rescale="match_rms"``.
      - The statistic is computed in fp32 whatever the NS dtype (HEAD of the reference fails for
        fp32 parameters because it mixes a bf16 statistic into an fp32 buffer; its parent
        commit casts to fp32, as we do).
      - The reference skips weight decay for parameters without a gradient; optax has none.
      - N-D leaves: the statistic is per fan-out unit of each matrix of the view (the reference's
        4-D statistic is per kernel row, an artefact).

    Example:
      >>> import jax, jax.numpy as jnp, optax_ext
      >>> params = {"mlp": {"kernel": jnp.ones((4, 8))}, "ln": {"scale": jnp.ones(8)}}
      >>> tx = optax_ext.normuon()
      >>> u, s = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
      >>> u["mlp"]["kernel"].shape
      (4, 8)
    """
    if shape_rule is None:
        shape_rule = "none" if rescale == "match_rms" else "sqrt_fan_out_over_fan_in"
    hidden = optax.chain(
        momentum(beta, nesterov=nesterov, mu_dtype=mu_dtype),
        orthogonalize(ns, specs=specs),
        scale_by_neuron_norm(
            b2, eps, axis=axis, eps_inside=eps_inside, rescale=rescale, specs=specs
        ),
        scale_by_shape(shape_rule, specs=specs),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    other = _common.adamw(
        _common.auxiliary_learning_rate(adam_learning_rate, learning_rate, MUON_ADAM_LR_RATIO),
        adam_b1,
        adam_b2,
        adam_eps,
        weight_decay if adam_weight_decay is None else adam_weight_decay,
    )
    return _common.hidden_and_other(hidden, other, param_labels)
