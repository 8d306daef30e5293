"""SOAP: Shampoo with Adam in the preconditioner's eigenbasis (Vyas et al., 2024)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from optax_ext.primitives.preconditioners import BasisHook, SoapLayout, scale_by_soap
from optax_ext.primitives.weight_decay import add_decoupled_weight_decay
from optax_ext.recipes import _common


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    precondition_frequency: int = 10,
    layout: SoapLayout = SoapLayout(),
    normalize_grads: bool = False,
    mask: Any = None,
    basis_hook: BasisHook | None = None,
) -> optax.GradientTransformation:
    """SOAP on every tensor, as the reference applies it.

    Algorithm (see :func:`optax_ext.scale_by_soap`; ``t`` counts real updates)::

        call 1: build the Gram factors and their eigenbases; no step, no decay
        later:  W <- W - lr sqrt(1 - b2^t)/(1 - b1^t) Q_L (m / (sqrt(v) + eps)) Q_R^T
                W <- W (1 - lr wd)                                    (after the step)
                every f real updates: refresh the bases (power step + QR), permute v

    Matrices are rotated on both sides (fan-in and fan-out of a flax ``(in, out)`` kernel);
    axes above ``layout.max_precond_dim`` (the vocabulary axis of embeddings and the head) are
    left unrotated (one-sided SOAP); 1-D tensors run Adam with SOAP's constants unless
    ``layout.precondition_1d``.

    Args:
      learning_rate: Default 3e-3.
      b1, b2: Defaults 0.95, 0.95.
      shampoo_beta: Gram EMA; None = ``b2``.
      eps: Default 1e-8.
      weight_decay: decoupled, after the step, from the second call on. Default 0.01.
      precondition_frequency: Default 10.
      layout: :class:`optax_ext.SoapLayout` (``max_precond_dim``, ``merge_dims``,
        ``precondition_1d``).
      normalize_grads: Default False.
      mask: weight-decay mask.
      basis_hook: see :func:`optax_ext.scale_by_soap` (tests).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", ICLR 2025,
      arXiv 2409.11321; code: github.com/nikhilvyas/SOAP (``soap.py`` at a1e5535).

    Notes:
      The first call changes nothing (the reference returns before the step); bias correction
      counts real updates. Memory: 2 param-sized buffers plus two ``d x d`` matrices (Gram and
      basis) per rotated axis.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> tx = optax_ext.soap()
      >>> p = {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}
      >>> tx.update(p, tx.init(p), p)[0]["w"].shape
      (4, 8)
    """

    def decay(count):
        wd = weight_decay(count) if callable(weight_decay) else weight_decay
        return jnp.where(count == 0, 0.0, wd)  # no decay on the preconditioner-only call

    return _common.float16_in_float32(optax.chain(
        scale_by_soap(
            b1,
            b2,
            shampoo_beta,
            eps,
            precondition_frequency=precondition_frequency,
            layout=layout,
            normalize_grads=normalize_grads,
            basis_hook=basis_hook,
        ),
        optax.scale_by_learning_rate(learning_rate),
        add_decoupled_weight_decay(decay, learning_rate, mask=mask),
    ))
