"""Functional view of a model for training code: parameters as a plain pytree.

``split_model`` separates a :class:`~models.gpt.Transformer` into a static graph definition,
its trainable parameters (``nnx.Param``) and everything else (σReparam power-iteration vectors,
dropout random state). Both trees are plain nested dicts (``nnx.to_pure_dict``): leaves are
arrays, keys are the attribute names (``blocks`` / ``0`` / ``attn`` / ``q_proj`` / ``kernel``),
so an optimizer sees only ``params`` and label rules can match paths. ``apply`` and ``loss_fn``
are pure functions of ``(graphdef, params, other, ...)`` that return the updated ``other``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from models import make_model
  >>> graphdef, params, other = split_model(make_model("gpt2-tiny"))
  >>> tokens = jnp.zeros((2, 8), jnp.int32)
  >>> grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
  >>> (loss, (other, metrics)), grads = jax.jit(grad_fn, static_argnums=0)(
  ...     graphdef, params, other, tokens, tokens)
  >>> grads["lm_head"]["kernel"].shape
  (128, 256)
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from models.gpt import Metrics, Transformer

PyTree = Any


def split_model(model: Transformer) -> tuple[nnx.GraphDef, PyTree, PyTree]:
    """Splits a model into ``(graphdef, params, other)``.

    Args:
      model: the model.

    Returns:
      The static graph definition (hashable; pass it as a static argument to ``jax.jit``), the
      ``nnx.Param`` leaves as a nested dict, and all other state as a nested dict.
    """
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(other)


def merge_model(graphdef: nnx.GraphDef, params: PyTree, other: PyTree) -> Transformer:
    """The inverse of :func:`split_model`: a stateful model holding these arrays."""
    return nnx.merge(graphdef, params, other)


def _other_state(model: Transformer) -> PyTree:
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])


def apply(
    graphdef: nnx.GraphDef,
    params: PyTree,
    other: PyTree,
    tokens: jax.Array,
    *,
    train: bool = True,
    return_metrics: bool = False,
) -> tuple[jax.Array, PyTree, Metrics]:
    """Pure forward pass.

    Args:
      graphdef: from :func:`split_model`.
      params: parameters (same structure as from :func:`split_model`).
      other: non-trainable state.
      tokens: ``[B, T]`` integer tokens.
      train: training mode (dropout on, σReparam vectors updated in the returned ``other``).
      return_metrics: compute ``metrics["attn_entropy"]`` (``[n_layer, n_head]``).

    Returns:
      ``(logits, new_other, metrics)``: ``[B, T, V]`` float32 logits, the updated state and a
      dict of metrics (empty unless ``return_metrics``).
    """
    model = merge_model(graphdef, params, other)
    out = model(tokens, deterministic=not train, return_metrics=return_metrics)
    logits, metrics = out if return_metrics else (out, {})
    return logits, _other_state(model), metrics


def loss_fn(
    graphdef: nnx.GraphDef,
    params: PyTree,
    other: PyTree,
    tokens: jax.Array,
    targets: jax.Array,
    *,
    mask: jax.Array | None = None,
    train: bool = True,
) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    """Pure language-model loss with the configuration's options, for ``jax.value_and_grad``.

    Args:
      graphdef: from :func:`split_model`.
      params: parameters (differentiate with ``argnums=1``).
      other: non-trainable state.
      tokens: ``[B, T]`` inputs.
      targets: ``[B, T]`` next tokens.
      mask: optional ``[B, T]`` loss weights.
      train: training mode.

    Returns:
      ``(loss, (new_other, metrics))``, the metrics of :func:`models.losses.lm_loss`.
    """
    model = merge_model(graphdef, params, other)
    loss, metrics = model.loss(tokens, targets, mask=mask, deterministic=not train)
    return loss, (_other_state(model), metrics)
