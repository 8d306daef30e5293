"""Language-model losses in float32: softmax or StableMax cross-entropy, plus the PaLM z-loss.

No optax here: the cross-entropy is written with ``jax.nn.log_softmax``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OUTPUTS = ("softmax", "stablemax")


def log_stablemax(logits: jax.Array, axis: int = -1) -> jax.Array:
    """Log-probabilities of StableMax, in float32.

    StableMax replaces ``exp`` by ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` for
    ``x < 0``, so ``p_i = s(x_i) / sum_j s(x_j)``. Written in the log domain,
    ``log s(x) = log1p(x)`` or ``-log1p(-x)``, and ``log p_i = log s(x_i) -
    logsumexp_j(log s(x_j))``: no overflow for any finite logits and no NaN gradient from the
    branch that is not taken.

    Args:
      logits: ``[..., V]`` logits (any float dtype).
      axis: the class axis.

    Returns:
      ``[..., V]`` float32 log-probabilities.

    References:
      Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical Stability", ICLR
      2025, https://arxiv.org/abs/2501.04697. Reference code:
      https://github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability

    Notes:
      The reference computes ``log(s(x) / sum s(x))`` in float64; the log-domain form here
      keeps float32 accurate instead.

    Example:
      >>> p = jnp.exp(log_stablemax(jnp.array([0.0, 1.0, -1.0])))  # s = (1, 2, 0.5)
      >>> [round(float(x), 4) for x in p]
      [0.2857, 0.5714, 0.1429]
    """
    x = logits.astype(jnp.float32)
    pos = jnp.log1p(jnp.where(x >= 0, x, 0.0))
    neg = -jnp.log1p(-jnp.where(x < 0, x, 0.0))
    log_s = jnp.where(x >= 0, pos, neg)
    return log_s - jax.nn.logsumexp(log_s, axis=axis, keepdims=True)


def lm_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    z_loss: float | jax.Array = 0.0,
    output: str = "softmax",
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy plus the z-loss, in float32.

    **Algorithm**::

        ce_t = -log p(targets_t | logits_t)      # softmax or StableMax probabilities
        z_t  = logsumexp(logits_t)^2              # PaLM z-loss, on the softmax normaliser
        loss = mean_w(ce) + z_loss * mean_w(z)    # w = mask weights (all ones by default)

    Args:
      logits: ``[..., V]`` logits (any float dtype; cast to float32).
      targets: ``[...]`` integer targets in ``[0, V)`` (any value where ``mask`` is 0).
      z_loss: z-loss coefficient (PaLM uses 1e-4); 0 adds nothing.
      output: ``"softmax"`` or ``"stablemax"`` (:func:`log_stablemax`).
      mask: optional ``[...]`` weights; the means are weighted by them (an all-zero mask gives 0).

    Returns:
      ``(loss, metrics)``: the scalar loss and float32 scalars ``"loss"``, ``"ce"`` (the
      cross-entropy term), ``"z_loss"`` (the added z term) and ``"accuracy"`` (argmax hits).

    Raises:
      ValueError: for an unknown ``output``.

    References:
      Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022,
      https://arxiv.org/abs/2204.02311 (section 5, z-loss).

    Example:
      >>> loss, m = lm_loss(jnp.zeros((2, 4)), jnp.array([0, 3]))
      >>> round(float(loss), 4)  # log(4)
      1.3863
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    x = logits.astype(jnp.float32)  # [..., V]
    lse = jax.nn.logsumexp(x, axis=-1)  # [...]
    if output == "softmax":
        logp = x - lse[..., None]  # [..., V]
    else:
        logp = log_stablemax(x)  # [..., V]
    w = jnp.ones(lse.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    targets = jnp.where(w > 0, targets, 0).astype(jnp.int32)  # masked-out targets may be any int
    ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [...]
    hits = (jnp.argmax(x, axis=-1) == targets).astype(jnp.float32)  # [...]
    total = jnp.sum(w)
    denom = jnp.where(total > 0, total, 1.0)

    def mean(a: jax.Array) -> jax.Array:
        return jnp.sum(a * w) / denom

    ce_mean = mean(ce)
    if isinstance(z_loss, (int, float)) and z_loss == 0:
        z_term = jnp.zeros((), jnp.float32)  # no lse^2: it overflows for logits beyond ~1e19
    else:
        z_term = jnp.asarray(z_loss, jnp.float32) * mean(jnp.square(lse))
    loss = ce_mean + z_term
    return loss, {"loss": loss, "ce": ce_mean, "z_loss": z_term, "accuracy": mean(hits)}
