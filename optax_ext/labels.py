"""Parameter labels for ``optax.partition``: hidden matrices vs embeddings, head and vectors.

Matrix optimizers (Muon, Conda, GaLore, ...) are meant for the *hidden* weight matrices of a
network; their papers send embeddings, the output head and 0-D/1-D parameters (biases, norm
gains) to AdamW. One rule, keyed on the parameter path and shape, assigns every leaf a label:

- ``"vector"``: ``ndim < 2``;
- ``"embed"``: a path component matches an embedding name (``wte``, ``wpe``, ``embed``,
  ``embedding``, ``embed_tokens``, ``tok_embeddings``, ``pos_embed``, ...);
- ``"head"``: a path component matches an output-head name (``lm_head``, ``head``, ``output``,
  ``unembed``, ``classifier``);
- ``"hidden"``: everything else with ``ndim >= 2``.

The same rule gives each hidden leaf its :class:`~optax_ext.MatrixSpec` (``matrix_specs``), so
the axis spec is never a second, hand-aligned tree. Recipes take ``param_labels`` to override.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from optax_ext._types import KeyPath, MatrixSpec, is_masked

HIDDEN, EMBED, HEAD, VECTOR = "hidden", "embed", "head", "vector"
LABELS = (HIDDEN, EMBED, HEAD, VECTOR)

EMBED_NAMES = (
    r"wte",
    r"wpe",
    r"embed",
    r"embeds",
    r"embedding",
    r"embeddings",
    r"embed_tokens",
    r"tok_embeddings",
    r"token_embedding",
    r"pos_embed",
    r"pos_embedding",
    r"position_embedding",
)
HEAD_NAMES = (r"lm_head", r"head", r"output", r"unembed", r"classifier")


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_names(path: KeyPath) -> tuple[str, ...]:
    """The path's components as strings (dict keys, attribute names, sequence indices)."""
    return tuple(_key_name(k) for k in path)


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """The path-and-shape rule that labels parameters; every pattern is a full-match regex.

    Attributes:
      embed: names that mark an embedding (matched against every path component).
      head: names that mark the output head.
      overrides: ``{regex: label}`` matched against the whole path string
        (``"blocks/0/attn/q_proj/kernel"``); the first match wins over the rule.
      spec: the MatrixSpec of hidden leaves, or a function ``(path, leaf) -> MatrixSpec``.
    """

    embed: tuple[str, ...] = EMBED_NAMES
    head: tuple[str, ...] = HEAD_NAMES
    overrides: tuple[tuple[str, str], ...] = ()
    spec: MatrixSpec | Callable[[KeyPath, Any], MatrixSpec] = MatrixSpec()

    def label(self, path: KeyPath, leaf: Any) -> str:
        """The label of one leaf."""
        names = path_names(path)
        joined = "/".join(names)
        for pattern, label in self.overrides:
            if re.fullmatch(pattern, joined):
                if label not in LABELS:
                    raise ValueError(f"override {pattern!r} gives unknown label {label!r}")
                return label
        if jnp.ndim(leaf) < 2:
            return VECTOR
        if any(re.fullmatch(p, n) for p in self.embed for n in names):
            return EMBED
        if any(re.fullmatch(p, n) for p in self.head for n in names):
            return HEAD
        return HIDDEN

    def matrix_spec(self, path: KeyPath, leaf: Any) -> MatrixSpec:
        """The MatrixSpec of a leaf (meaningful for hidden leaves)."""
        return self.spec(path, leaf) if callable(self.spec) else self.spec


DEFAULT_RULE = LabelRule()


def map_with_path(fn: Callable[[KeyPath, Any], Any], params: Any) -> Any:
    """Maps ``fn(path, leaf)`` over ``params``; None and MaskedNode leaves pass through."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if is_masked(x) else fn(p, x), params, is_leaf=is_masked
    )


def param_labels(
    params: Any,
    *,
    rule: LabelRule = DEFAULT_RULE,
    overrides: Mapping[str, str] | None = None,
) -> Any:
    """Labels every leaf ``"hidden"``, ``"embed"``, ``"head"`` or ``"vector"``.

    Args:
      params: a parameter tree (dicts, flax ``nnx.State``, lists...).
      rule: the :class:`LabelRule`.
      overrides: extra ``{regex on "a/b/c" path: label}`` that win over the rule.

    Returns:
      A tree of label strings with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_ext import labels
      >>> p = {"wte": {"embedding": jnp.zeros((10, 4))}, "mlp": {"kernel": jnp.zeros((4, 8)),
      ...      "bias": jnp.zeros(8)}, "lm_head": {"kernel": jnp.zeros((4, 10))}}
      >>> lab = labels.param_labels(p)
      >>> lab["wte"]["embedding"], lab["lm_head"]["kernel"]
      ('embed', 'head')
      >>> lab["mlp"]["kernel"], lab["mlp"]["bias"]
      ('hidden', 'vector')
    """
    if overrides:
        rule = dataclasses.replace(rule, overrides=tuple(overrides.items()) + rule.overrides)
    return map_with_path(rule.label, params)


def hidden_matrices(params: Any, *, rule: LabelRule = DEFAULT_RULE) -> Any:
    """Two-way labels for recipes: ``"hidden"`` for hidden matrices, ``"other"`` for the rest."""
    return map_with_path(lambda p, x: HIDDEN if rule.label(p, x) == HIDDEN else "other", params)


def label_fn(
    mapping: Mapping[str, str] | None = None,
    *,
    rule: LabelRule = DEFAULT_RULE,
) -> Callable[[Any], Any]:
    """A ``params -> labels`` function for ``optax.partition`` that renames the four labels.

    Args:
      mapping: ``{label: group}``; labels not named keep their own name. E.g.
        ``{"embed": "adam", "head": "adam", "vector": "adam"}``.
      rule: the :class:`LabelRule`.

    Returns:
      A function ``params -> tree of group names``.
    """
    mapping = dict(mapping or {})
    return lambda params: map_with_path(
        lambda p, x: mapping.get(rule.label(p, x), rule.label(p, x)), params
    )


def matrix_specs(rule: LabelRule = DEFAULT_RULE) -> Callable[[KeyPath, Any], MatrixSpec]:
    """The ``specs`` argument of matrix primitives following ``rule``: ``(path, leaf) -> spec``."""
    return rule.matrix_spec
