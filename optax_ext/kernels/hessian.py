"""Diagonal Hessian estimators: Hutchinson (Hessian-vector products) and Gauss-Newton-Bartlett.

Pure functions of a loss or logits function and the parameters; the optimizers of
:mod:`optax_ext` take their results (or a function producing them) as extra ``update``
arguments, and call them only on the steps that refresh their Hessian statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def hessian_vector_product(loss_fn: Callable[[Any], jax.Array], params: Any, v: Any) -> Any:
    """``H v`` by forward-over-reverse differentiation (``jax.jvp`` of ``jax.grad``).

    Args:
      loss_fn: ``params -> scalar``.
      params: the point. v: a tree like ``params``.

    Returns:
      A tree like ``params``.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def random_probe(key: jax.Array, params: Any, kind: str = "rademacher") -> Any:
    """A probe tree like ``params``: ``+-1`` entries (Rademacher) or ``N(0, 1)`` (Gaussian)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, x in zip(keys, leaves):
        if kind == "rademacher":
            out.append(jax.random.rademacher(k, jnp.shape(x), jnp.float32).astype(x.dtype))
        elif kind == "gaussian":
            out.append(jax.random.normal(k, jnp.shape(x), jnp.float32).astype(x.dtype))
        else:
            raise ValueError(f"probe kind must be 'rademacher' or 'gaussian', got {kind!r}")
    return treedef.unflatten(out)


def hutchinson(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    probe: str = "rademacher",
    probe_tree: Any = None,
) -> Any:
    """Hutchinson's diagonal estimate ``u * (H u)``; its expectation is ``diag(H)``.

    Args:
      loss_fn: ``params -> scalar``.
      params: the point.
      key: PRNG key for the probe.
      probe: ``"rademacher"`` (AdaHessian) or ``"gaussian"`` (Sophia-H).
      probe_tree: a given probe (replaces the random one; e.g. a recorded probe).

    Returns:
      A tree like ``params``.

    References:
      Hutchinson, 1989; Yao et al., 2021, "ADAHESSIAN", arXiv 2006.00719; Liu et al., 2023,
      "Sophia", arXiv 2305.14342.
    """
    u = random_probe(key, params, probe) if probe_tree is None else probe_tree
    hu = hessian_vector_product(loss_fn, params, u)
    return jax.tree.map(lambda a, b: a * b, u, hu)


def gauss_newton_bartlett(
    logits_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    max_norm: float | None = 1.0,
    mask: jax.Array | None = None,
) -> Any:
    """Sophia-G's Gauss-Newton-Bartlett estimate ``g_hat * g_hat`` for a softmax output.

    Labels are sampled from the model's own distribution, ``y_hat ~ softmax(logits)``; ``g_hat``
    is the gradient of the mean cross-entropy against them (clipped to global norm
    ``max_norm``, as the reference's training script does). ``B g_hat^2`` estimates the
    Gauss-Newton diagonal; the batch-size factor ``B`` is applied by the optimizer (Sophia's
    ``batch_size`` argument), as in the reference.

    Args:
      logits_fn: ``params -> logits [..., vocab]`` on the batch to use (the reference uses the
        next batch, at the updated weights).
      params: the point.
      key: PRNG key for the labels.
      max_norm: global-norm clip of ``g_hat``; None disables.
      mask: optional ``[...]`` weights of the positions (e.g. padding 0).

    Returns:
      A tree like ``params``.

    References:
      Liu, Li, Hall, Liang, Ma, 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for
      Language Model Pre-training", arXiv 2305.14342; code: github.com/Liuhong99/Sophia
      (``train_sophiag.py`` at a7e1572).
    """

    def sampled_loss(p):
        logits = logits_fn(p).astype(jnp.float32)
        labels = jax.random.categorical(key, jax.lax.stop_gradient(logits))
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        if mask is None:
            return jnp.mean(nll)
        return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    g = jax.grad(sampled_loss)(params)
    if max_norm is not None:
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g)))
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        g = jax.tree.map(lambda x: x * scale.astype(x.dtype), g)
    return jax.tree.map(lambda x: x * x, g)


def spatial_average(d: jax.Array, mode: str | int = "none") -> jax.Array:
    """AdaHessian's averaging of a diagonal estimate over blocks of a tensor.

    Args:
      d: the estimate of one tensor.
      mode: ``"none"`` (the README's ``image_classification`` file for 0-D/1-D/2-D; 4-D conv
        kernels are still averaged over their spatial dims, as that file does), ``"row"`` (the
        ``instruction`` file: a 2-D flax ``(in, out)`` kernel, or each matrix of a stacked 3-D
        one, is averaged over the fan-in axis, one value per output unit = per row of a
        PyTorch weight; 4-D over the spatial dims), or a positive int ``b``: averages of
        consecutive groups of ``b`` entries of the flattened tensor (``b`` must divide its
        size).

    Returns:
      An array of ``d``'s shape.
    """
    if isinstance(mode, int) and not isinstance(mode, bool):
        if d.size % mode:
            raise ValueError(f"block size {mode} does not divide a tensor of {d.size} entries")
        blocks = d.reshape(-1, mode)
        return jnp.broadcast_to(blocks.mean(axis=1, keepdims=True), blocks.shape).reshape(d.shape)
    if mode not in ("none", "row"):
        raise ValueError(f"spatial_average must be 'none', 'row' or a block size, got {mode!r}")
    if d.ndim == 4:  # flax HWIO: spatial dims are the first two
        return jnp.broadcast_to(jnp.mean(d, axis=(0, 1), keepdims=True), d.shape)
    if mode == "row" and d.ndim in (2, 3):
        return jnp.broadcast_to(jnp.mean(d, axis=-2, keepdims=True), d.shape)
    return d
