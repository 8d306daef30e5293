"""Addressing fields of (nested) optimizer states by name, for wrappers that edit inner states."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def map_fields(state: Any, names: Iterable[str], fn: Callable[[str, Any], Any]) -> tuple[Any, int]:
    """Replaces every NamedTuple field called one of ``names`` anywhere in ``state``.

    Args:
      state: an optimizer state (NamedTuples nested in tuples, lists and dicts).
      names: field names to replace.
      fn: ``(name, old_value) -> new_value``.

    Returns:
      ``(new_state, number_of_fields_replaced)``.
    """
    names = frozenset(names)
    hits = 0

    def walk(node):
        nonlocal hits
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            values = {}
            for field in node._fields:
                value = getattr(node, field)
                if field in names:
                    hits += 1
                    values[field] = fn(field, value)
                else:
                    values[field] = walk(value)
            return type(node)(**values)
        if isinstance(node, (tuple, list)):
            return type(node)(walk(v) for v in node)
        if isinstance(node, dict):
            return type(node)((k, walk(v)) for k, v in node.items())
        return node

    return walk(state), hits


def get_field(state: Any, name: str, who: str) -> Any:
    """The single field called ``name`` in ``state``; a clear error if there is none or several."""
    found = []
    map_fields(state, [name], lambda _, v: found.append(v) or v)
    if len(found) != 1:
        raise ValueError(
            f"{who} reads the field {name!r} of its inner state, found {len(found)} such fields; "
            "wrap a transformation that has exactly one (e.g. optax_ext.scale_by_adam)"
        )
    return found[0]
