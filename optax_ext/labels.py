"""Parameter labels for ``optax.partition``: hidden matrices vs embeddings, head and vectors.

Matrix optimizers (Muon, Conda, GaLore, ...) are meant for the *hidden* weight matrices of a
network; their papers send embeddings, the output head and 0-D/1-D parameters (biases, norm
gains) to AdamW. One rule, keyed on the parameter path and shape, assigns every leaf a label:

- ``"vector"``: ``ndim < 2``, or a leaf named ``bias``/``scale`` (DenseGeneral biases
  ``(heads, head_dim)``, scanned norm gains ``(layers, d)``);
- ``"embed"``: a path component matches an embedding name (``wte``, ``wpe``, ``embed``,
  ``embedding``, ``embed_tokens``, ``tok_embeddings``, ``pos_embed``, ...);
- ``"head"``: a path component matches an output-head name (``lm_head``, ``head``, ``output``,
  ``unembed``, ``classifier``); if no leaf does, the one 2-D leaf whose fan-out is the
  embedding table's vocabulary size (an untied head under any name, e.g. ``logitdense``);
- ``"hidden"``: everything else with ``ndim >= 2``.

Path parts that flax metadata boxes add (the ``value`` attribute of ``nn.Partitioned`` and of
nnx variables) are ignored by the rule; overrides match the path with and without them.

The same module gives each hidden leaf its :class:`~optax_ext.MatrixSpec` (:func:`matrix_view`,
:func:`matrix_specs`), so the axis spec is never a second, hand-aligned tree, and
:func:`describe` prints what a recipe will do to every leaf. Recipes take ``param_labels`` and
``specs`` to override.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from optax_ext import _boxes
from optax_ext._types import KeyPath, MatrixSpec, is_masked, leaf_error, leaves_with_path, spec_for
from optax_ext.kernels.matricize import matrix_shape

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
VECTOR_NAMES = (r"bias", r"scale")
"""Leaf names that are vectors whatever their rank (biases, norm gains)."""

WRAPPER_ATTRS = ("value", "raw_value")
"""Trailing attribute path parts added by flax metadata boxes and nnx variables."""

STACK_NAMES = (r"layers?", r"stack(ed)?", r"blocks", r"(scan|vmap)\w*", r"experts?", r"stages?")
"""Path components (not followed by an integer index) under which leading axes are a stack."""
IN_PROJ_NAMES = (
    r"query", r"key", r"value", r"q", r"k", r"v", r"q_proj", r"k_proj", r"v_proj",
    r"wq", r"wk", r"wv", r"to_q", r"to_k", r"to_v",
)
"""Attention in-projections: a 3-D kernel is DenseGeneral ``(embed, heads, head_dim)``."""
OUT_PROJ_NAMES = (r"out", r"o", r"o_proj", r"out_proj", r"attn_out", r"attn_out_proj", r"wo",
                  r"to_out")
"""Attention out-projections: a 3-D kernel is DenseGeneral ``(heads, head_dim, embed)``."""
CONV_NAMES = (r"(?i:conv\w*)",)
"""Convolutions: ``(*window, in, out)``, fan-in ``prod(window) * in``."""

STACK_AXIS_NAMES = ("layers", "layer", "stack", "stage", "stages", "experts", "expert", "exp")
"""flax partitioning names of batch axes (``nn.scan``/``vmap`` stacks, experts)."""
HEAD_AXIS_NAMES = ("heads", "q_heads", "kv_heads", "num_heads")
"""flax partitioning names of attention-head axes."""
HEAD_DIM_AXIS_NAMES = ("kv", "head_dim", "kv_head_dim", "qkv_dim")
"""flax partitioning names of the per-head feature axis."""


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_names(path: KeyPath) -> tuple[str, ...]:
    """The path's components as strings (dict keys, attribute names, sequence indices)."""
    return tuple(_key_name(k) for k in path)


def unboxed_names(path: KeyPath) -> tuple[str, ...]:
    """:func:`path_names` without the trailing ``value`` attributes of flax/nnx metadata boxes."""
    path = tuple(path)
    while (
        len(path) > 1
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
        and path[-1].name in WRAPPER_ATTRS
    ):
        path = path[:-1]
    return path_names(path)


def _matches(patterns: tuple[str, ...], name: str) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _override(overrides: tuple[tuple[str, Any], ...], path: KeyPath) -> Any:
    """The value of the first override whose regex matches the path, with or without boxes."""
    joined = ("/".join(path_names(path)), "/".join(unboxed_names(path)))
    for pattern, value in overrides:
        if any(re.fullmatch(pattern, j) for j in joined):
            return value
    return None


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """The path-and-shape rule that labels parameters; every pattern is a full-match regex.

    Attributes:
      embed: names that mark an embedding (matched against every path component).
      head: names that mark the output head.
      overrides: ``{regex: label}`` matched against the whole path string
        (``"blocks/0/attn/q_proj/kernel"``, with and without flax's trailing ``/value``); the
        first match wins over the rule.
      vector: leaf names that are vectors whatever their rank. Default ``bias``, ``scale``.
      vocab_head: if no leaf is named a head, label as ``"head"`` the one 2-D hidden leaf whose
        fan-out equals the largest embedding table's first axis (an untied output head).
      spec: the MatrixSpec of hidden leaves, a function ``(path, leaf) -> MatrixSpec``, or None
        (default): :func:`matrix_view` with ``per_head`` and ``views``.
      per_head: orthogonalize attention kernels per head (heads are a batch axis of the view).
      views: ``{regex: MatrixSpec}`` matched like ``overrides``; wins over the view rule.
    """

    embed: tuple[str, ...] = EMBED_NAMES
    head: tuple[str, ...] = HEAD_NAMES
    overrides: tuple[tuple[str, str], ...] = ()
    vector: tuple[str, ...] = VECTOR_NAMES
    vocab_head: bool = True
    spec: MatrixSpec | Callable[[KeyPath, Any], MatrixSpec] | None = None
    per_head: bool = False
    views: tuple[tuple[str, MatrixSpec], ...] = ()

    def label(self, path: KeyPath, leaf: Any) -> str:
        """The label of one leaf by its own path and shape (see :func:`param_labels` for the
        tree-level rule that also finds untied heads)."""
        label = _override(self.overrides, path)
        if label is not None:
            if label not in LABELS:
                raise ValueError(f"override for {path_names(path)} gives unknown label {label!r}")
            return label
        names = unboxed_names(path)
        if jnp.ndim(leaf) < 2 or (names and _matches(self.vector, names[-1])):
            return VECTOR
        if any(_matches(self.embed, n) for n in names):
            return EMBED
        if any(_matches(self.head, n) for n in names):
            return HEAD
        return HIDDEN

    def matrix_spec(self, path: KeyPath, leaf: Any, names: Any = None) -> MatrixSpec:
        """The MatrixSpec of a leaf (meaningful for hidden leaves); ``names`` are its flax
        partitioning names, if known."""
        view = _override(self.views, path)
        if view is not None:
            return view
        if self.spec is None:
            return matrix_view(path, leaf, names, per_head=self.per_head)
        return self.spec(path, leaf) if callable(self.spec) else self.spec


DEFAULT_RULE = LabelRule()


def map_with_path(fn: Callable[[KeyPath, Any], Any], params: Any) -> Any:
    """Maps ``fn(path, leaf)`` over ``params``; None and MaskedNode leaves pass through."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if is_masked(x) else fn(p, x), params, is_leaf=is_masked
    )


def _tree_labels(params: Any, rule: LabelRule) -> Any:
    """The four-way labels of every leaf, with the tree-level untied-head rule."""
    pairs, treedef = leaves_with_path(params)
    labs = [x if is_masked(x) else rule.label(p, x) for p, x in pairs]
    if rule.vocab_head and HEAD not in labs:
        tables = [
            jnp.shape(x)[0] for (_, x), lab in zip(pairs, labs)
            if lab == EMBED and jnp.ndim(x) == 2
        ]
        if tables:
            vocab = max(tables)
            found = [
                i for i, ((p, x), lab) in enumerate(zip(pairs, labs))
                if lab == HIDDEN and jnp.ndim(x) == 2 and jnp.shape(x) == (jnp.shape(x)[0], vocab)
                and jnp.shape(x)[0] != vocab and _override(rule.overrides, p) is None
            ]
            if len(found) == 1:
                labs[found[0]] = HEAD
    return treedef.unflatten(labs)


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
      overrides: extra ``{regex on "a/b/c" path: label}`` that win over the rule (matched with
        and without flax's trailing ``/value``).

    Returns:
      A tree of label strings with the structure of ``params``. Every recipe with a
      ``param_labels`` argument accepts it (embed, head and vector go to its fallback).

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
    return _tree_labels(params, rule)


def hidden_matrices(params: Any, *, rule: LabelRule = DEFAULT_RULE) -> Any:
    """Two-way labels for recipes: ``"hidden"`` for hidden matrices, ``"other"`` for the rest."""
    return jax.tree.map(lambda lab: HIDDEN if lab == HIDDEN else "other", _tree_labels(params, rule))


def as_hidden_and_other(tree: Any) -> Any:
    """Maps a labels tree to the two groups of a matrix recipe: ``"hidden"`` and ``"other"``.

    Args:
      tree: labels with values ``"hidden"``/``"other"`` or the four labels of
        :func:`param_labels` (``"embed"``, ``"head"``, ``"vector"`` become ``"other"``).

    Returns:
      The two-way labels tree.

    Raises:
      ValueError: listing the labels found and the labels expected, if any other label occurs.
    """
    found = set(jax.tree.leaves(tree))
    unknown = found - {HIDDEN, "other", EMBED, HEAD, VECTOR}
    if unknown:
        raise ValueError(
            f"param_labels: found labels {sorted(map(str, found))}; this recipe expects "
            "'hidden' and 'other', or the labels of optax_ext.labels.param_labels "
            "('hidden', 'embed', 'head', 'vector'; all but 'hidden' go to the fallback). "
            f"Unknown: {sorted(map(str, unknown))}"
        )
    return jax.tree.map(lambda lab: HIDDEN if lab == HIDDEN else "other", tree)


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
    return lambda params: jax.tree.map(
        lambda lab: mapping.get(lab, lab), _tree_labels(params, rule)
    )


# --- matrix views -------------------------------------------------------------------------


def _stacked(names: tuple[str, ...]) -> bool:
    """True if a path component names a stack (and is not followed by a list index)."""
    for i, n in enumerate(names):
        nxt = names[i + 1] if i + 1 < len(names) else ""
        if _matches(STACK_NAMES, n.lower()) and not nxt.isdigit():
            return True
    return False


def _nearest(names: tuple[str, ...]) -> str | None:
    """``"in"``/``"out"``/``"conv"`` for the closest path component naming a projection."""
    for n in reversed(names[:-1] if len(names) > 1 else names):
        if _matches(CONV_NAMES, n):
            return "conv"
        if _matches(IN_PROJ_NAMES, n.lower()):
            return "in"
        if _matches(OUT_PROJ_NAMES, n.lower()):
            return "out"
    return None


def _spec(batch: int, fan_in: tuple[int, ...], fan_out: tuple[int, ...]) -> MatrixSpec:
    """A spec over the axes after ``batch`` leading batch axes (offsets relative to those)."""
    return MatrixSpec(
        fan_in_axes=tuple(batch + a for a in fan_in), fan_out_axes=tuple(batch + a for a in fan_out)
    )


def _attention_spec(kind: str, lead: int, per_head: bool) -> MatrixSpec:
    """The view of a ``(*lead, embed, heads, head_dim)`` / ``(*lead, heads, head_dim, embed)``
    attention kernel; per head, the heads axis joins the batch."""
    if kind == "in":
        return _spec(lead, (0,), (2,) if per_head else (1, 2))
    return _spec(lead, (1,) if per_head else (0, 1), (2,))


def _view_from_names(names: tuple[Any, ...], per_head: bool) -> MatrixSpec | None:
    """The view that flax partitioning names settle, or None if they do not."""
    heads = HEAD_AXIS_NAMES
    batch = [i for i, n in enumerate(names) if n in STACK_AXIS_NAMES or (per_head and n in heads)]
    rest = [i for i in range(len(names)) if i not in batch]
    if len(rest) == 2:
        return MatrixSpec(fan_in_axes=(rest[0],), fan_out_axes=(rest[1],))
    if len(rest) < 2:
        return None
    head = [i for i in rest if names[i] in heads + HEAD_DIM_AXIS_NAMES]
    other = [i for i in rest if i not in head]
    if not head or not other or head != list(range(head[0], head[0] + len(head))):
        return None
    if head == rest[: len(head)]:
        return MatrixSpec(fan_in_axes=tuple(head), fan_out_axes=tuple(other))
    if head == rest[-len(head) :]:
        return MatrixSpec(fan_in_axes=tuple(other), fan_out_axes=tuple(head))
    return None


_AXIS_NAMES: contextvars.ContextVar[Mapping[tuple[str, ...], tuple[Any, ...]]] = (
    contextvars.ContextVar("optax_ext_axis_names", default={})
)


@contextlib.contextmanager
def axis_names_of(params: Any) -> Iterator[None]:
    """Within the block, :func:`axis_names` knows the flax partitioning names of ``params``.

    Recipes run on unboxed values (``optax_ext._boxes.with_boxes``), where a leaf's box and its
    axis names are gone; this keeps the names of every boxed leaf (linen ``nn.Partitioned`` /
    ``nn.LogicallyPartitioned``, nnx variables with sharding metadata), keyed by its path without
    box attributes, for the default matrix view (:func:`matrix_view`) to read while a recipe's
    ``init``/``update`` is traced. Nested blocks add to the outer names.

    Args:
      params: a parameter tree, boxed or not (without boxes the block changes nothing).
    """
    table = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=_boxes.is_box)[0]:
        names = _boxes.box_names(x) if _boxes.is_box(x) else None
        if names is not None:
            table[unboxed_names(path)] = names
    if not table:
        yield
        return
    token = _AXIS_NAMES.set({**_AXIS_NAMES.get(), **table})
    try:
        yield
    finally:
        _AXIS_NAMES.reset(token)


def axis_names(path: KeyPath, ndim: int) -> tuple[Any, ...] | None:
    """The flax partitioning names of the leaf at ``path`` inside :func:`axis_names_of`, if its
    box had one name per axis of a rank-``ndim`` value; else None."""
    names = _AXIS_NAMES.get().get(unboxed_names(path))
    return names if names is not None and len(names) == ndim else None


def matrix_view(
    path: KeyPath, leaf: Any, names: Any = None, *, per_head: bool = False
) -> MatrixSpec:
    """The ``(batch, fan_in, fan_out)`` view of a parameter, read from its names and shape.

    The default ``specs`` of every matrix primitive and recipe. 2-D leaves are ``(in, out)``
    (flax ``Dense``). For N-D leaves, in this order:

    1. flax partitioning names (``names``, e.g. ``("layers", "embed", "heads", "kv")``, when
       given): ``layers``/``stage``/``experts`` axes are batch; of the rest, the block of
       ``heads``/``kv``/``head_dim`` axes is the fan-out side if it is last (in-projection),
       the fan-in side if it is first (out-projection);
    2. the path: under ``query``/``key``/``value``/``q_proj``/... a DenseGeneral kernel
       ``(embed, heads, head_dim)`` is ``embed x heads*head_dim``; under ``out``/``o_proj``/...
       ``(heads, head_dim, embed)`` is ``heads*head_dim x embed`` (checked against the shape:
       ``embed`` is a multiple of ``heads*head_dim``); under ``Conv*``/``conv*`` a
       ``(*window, in, out)`` kernel is ``prod(window)*in x out``;
    3. leading axes beyond that are batch only under a stack name on the path (``layers``,
       ``stack``, ``blocks``, ``experts``, flax's ``Scan*``/``Vmap*`` modules; not followed by a
       list index); otherwise the leaf is ambiguous and raises.

    Args:
      path: the leaf's key path.
      leaf: the leaf (an array or anything with a shape).
      names: its flax partitioning names (one per axis, None entries allowed), or None: those
        of its box when a recipe runs on boxed params (:func:`axis_names_of`).
      per_head: attention kernels as one matrix per head (heads are batch axes):
        ``embed x head_dim`` and ``head_dim x embed``.

    Returns:
      The :class:`~optax_ext.MatrixSpec`.

    Raises:
      ValueError: for an N-D leaf the rule cannot read, naming the leaf and the one-line fix.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_ext import labels
      >>> q = jnp.zeros((64, 4, 16))  # DenseGeneral query kernel (embed, heads, head_dim)
      >>> labels.matrix_view(("attn", "query", "kernel"), q)
      MatrixSpec(fan_in_axes=(0,), fan_out_axes=(1, 2), fan_out_splits=1)
    """
    shape = tuple(jnp.shape(leaf))
    ndim = len(shape)
    if ndim <= 2:
        return MatrixSpec()
    if names is None:
        names = axis_names(path, ndim)
    if names is not None and any(n is not None for n in names):
        if len(names) != ndim:
            raise leaf_error(path, shape, f"partitioning names {tuple(names)} do not match its rank")
        view = _view_from_names(tuple(names), per_head)
        if view is not None:
            return view
    parts = unboxed_names(path)
    kind, stacked = _nearest(parts), _stacked(parts)
    if kind == "conv":
        return MatrixSpec(fan_in_axes=tuple(range(ndim - 1)), fan_out_axes=(ndim - 1,))
    if kind in ("in", "out") and ndim >= 3:
        a, b, c = shape[-3:]
        heads_shaped = a % (b * c) == 0 if kind == "in" else c % (a * b) == 0
        if heads_shaped and (ndim == 3 or stacked):
            return _attention_spec(kind, ndim - 3, per_head)
    if stacked:
        return MatrixSpec(fan_in_axes=(ndim - 2,), fan_out_axes=(ndim - 1,))
    where = "/".join(parts)
    raise leaf_error(
        path,
        shape,
        f"its {ndim}-D matrix view is ambiguous (no partitioning names, no stack, attention or "
        "conv name on its path that fits its shape). Declare it with the recipe's specs, e.g. "
        f"specs=optax_ext.labels.matrix_specs(views={{{where!r}: optax_ext.MatrixSpec("
        f"fan_in_axes=({ndim - 2},), fan_out_axes=({ndim - 1},))}}) for a stack of (in, out) "
        "matrices, or send it to the fallback with param_labels=optax_ext.labels.param_labels("
        f"params, overrides={{{where!r}: 'vector'}})",
    )


def matrix_specs(
    rule: LabelRule = DEFAULT_RULE,
    *,
    views: Mapping[str, MatrixSpec] | None = None,
    per_head: bool | None = None,
) -> Callable[[KeyPath, Any], MatrixSpec]:
    """The ``specs`` argument of matrix primitives following ``rule``: ``(path, leaf) -> spec``.

    Args:
      rule: the :class:`LabelRule`.
      views: extra ``{regex on "a/b/c" path: MatrixSpec}`` that win over the rule, e.g.
        ``{r".*/qkv/kernel": MatrixSpec(fan_out_splits=3)}`` for fused q, k, v matrices.
      per_head: attention kernels per head (see :func:`matrix_view`); default the rule's.

    Returns:
      A function ``(path, leaf) -> MatrixSpec`` for a recipe's or primitive's ``specs``.
    """
    changes: dict[str, Any] = {}
    if views:
        changes["views"] = tuple(views.items()) + rule.views
    if per_head is not None:
        changes["per_head"] = per_head
    rule = dataclasses.replace(rule, **changes) if changes else rule
    return rule.matrix_spec


# --- describe ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeafRow:
    """One row of :func:`describe`.

    Attributes:
      path: ``"a/b/c"`` (without flax box attributes).
      shape: the leaf's shape.
      label: its label of :func:`param_labels`.
      group: ``"hidden"`` (the recipe's matrix method) or ``"other"`` (its fallback).
      view: ``(batch, fan_in, fan_out)`` of a hidden leaf, else None.
      shape_factor: the factor of the recipe's shape rule on that view, else None.
      note: why the view is missing (the error a recipe would raise), else ``""``.
    """

    path: str
    shape: tuple[int, ...]
    label: str
    group: str
    view: tuple[int, int, int] | None
    shape_factor: float | None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Description:
    """The table of :func:`describe`: ``rows`` and ``str()`` for printing."""

    rows: tuple[LeafRow, ...]
    shape_rule: str | None

    def __str__(self) -> str:
        head = ("path", "shape", "label", "group", "view b x in x out", "factor")
        body = [
            (
                r.path,
                "x".join(map(str, r.shape)) or "()",
                r.label,
                r.group,
                " x ".join(map(str, r.view)) if r.view else ("!" if r.note else "-"),
                f"{r.shape_factor:.3g}" if r.shape_factor is not None else "-",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, body)]
        lines += [f"! {r.path}: {r.note}" for r in self.rows if r.note]
        if self.shape_rule:
            lines.append(f"factor: shape rule {self.shape_rule!r} on the (fan_in, fan_out) view")
        return "\n".join(lines)


def _default(fn: Callable[..., Any], name: str) -> Any:
    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def describe(
    params: Any,
    recipe_or_rule: Callable[..., Any] | LabelRule | None = None,
    *,
    shape_rule: str | None = None,
    specs: Any = None,
    param_labels: Any = None,
) -> Description:
    """What a recipe does to every leaf: path, shape, label, matrix view and shape factor.

    Args:
      params: the parameter tree.
      recipe_or_rule: a recipe factory (e.g. ``optax_ext.muon``; its default ``shape_rule``
        gives the factor column), a :class:`LabelRule`, or None (the default rule).
      shape_rule: a key of :data:`optax_ext.primitives.orthogonalize.SHAPE_RULES`; default the
        recipe's own, if it has one.
      specs: the ``specs`` you pass the recipe (default: the rule's :func:`matrix_view`).
      param_labels: the ``param_labels`` you pass the recipe (a tree or a function).

    Returns:
      A :class:`Description`: ``print`` it for a table; ``.rows`` holds one :class:`LeafRow` per
      leaf. A leaf whose view a recipe would reject shows ``!`` and the reason.

    Example:
      >>> import jax.numpy as jnp, optax_ext
      >>> p = {"attn": {"query": {"kernel": jnp.zeros((8, 2, 4)), "bias": jnp.zeros((2, 4))}}}
      >>> row = optax_ext.labels.describe(p, optax_ext.muon).rows[1]
      >>> row.path, row.label, row.view, row.shape_factor
      ('attn/query/kernel', 'hidden', (1, 8, 8), 1.0)
    """
    rule = recipe_or_rule if isinstance(recipe_or_rule, LabelRule) else DEFAULT_RULE
    if callable(recipe_or_rule) and not isinstance(recipe_or_rule, LabelRule):
        shape_rule = shape_rule or _default(recipe_or_rule, "shape_rule")
    specs = rule.matrix_spec if specs is None else specs
    four = _tree_labels(params, rule)
    if param_labels is not None:
        given = param_labels(params) if callable(param_labels) else param_labels
        groups = as_hidden_and_other(given)
    else:
        groups = jax.tree.map(lambda lab: HIDDEN if lab == HIDDEN else "other", four)
    pairs, treedef = leaves_with_path(params)
    with axis_names_of(params):  # boxed params: their axis names settle N-D views
        rows = _describe_rows(pairs, treedef, four, groups, specs, shape_rule)
    return Description(tuple(rows), shape_rule)


def _describe_rows(pairs, treedef, four, groups, specs, shape_rule) -> list[LeafRow]:
    from optax_ext.primitives.orthogonalize import shape_factor  # primitives build on labels

    rows = []
    for (path, leaf), lab, group in zip(
        pairs, treedef.flatten_up_to(four), treedef.flatten_up_to(groups)
    ):
        if is_masked(leaf):
            continue
        view = factor = None
        note = ""
        if group == HIDDEN:
            try:
                view = matrix_shape(jnp.shape(leaf), spec_for(specs, path, leaf))
            except ValueError as e:
                note = str(e)
            if view is not None and shape_rule is not None:
                factor = float(shape_factor(shape_rule, view[1], view[2]))
        rows.append(
            LeafRow("/".join(unboxed_names(path)), tuple(jnp.shape(leaf)), lab, group, view,
                    factor, note)
        )
    return rows
