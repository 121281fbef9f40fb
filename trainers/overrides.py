"""Dotted-key overrides on a plain config tree: `schedule.epochs=3`, `{method.reward.weights: {iou: 1}}`.

A mapping value merges into the mapping already there; any other value replaces. Giving `method` a
different name (`method: latent_rl`, `method.name=supervised`) starts that method's keys afresh,
since one method's keys mean nothing to another.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import yaml


class OverrideError(ValueError):
    """An override that cannot be applied; the message names the key."""


def parse_assignments(args: Iterable[str]) -> list[tuple[str, Any]]:
    """['a.b=3', 'c=[1, 2]'] -> [('a.b', 3), ('c', [1, 2])]; values are parsed as YAML scalars/flows."""
    pairs = []
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise OverrideError(f"{arg!r}: expected key=value with a dotted key, e.g. schedule.epochs=3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise OverrideError(f"{key}: value {raw!r} is not valid YAML ({_first_line(e)})") from None
        pairs.append((key, value))
    return pairs


def expand(mapping: dict) -> dict:
    """{'a.b': 1, 'c': {'d.e': 2}} -> {'a': {'b': 1}, 'c': {'d': {'e': 2}}}."""
    out: dict = {}
    for key, value in mapping.items():
        set_path(out, str(key), value)
    return out


def set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if parts == ["method"] and isinstance(value, str):
        value = {"name": value}
    if parts[0] == "method":
        _switch_method(tree, parts, value)
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif isinstance(nxt, str) and i == 0 and part in ("method", "data"):
            nxt = node[part] = {"name": nxt}           # `method: supervised` shorthand
        elif not isinstance(nxt, dict):
            raise OverrideError(f"{'.'.join(parts[:i + 1])}: is {nxt!r}, not a mapping, so "
                                f"{dotted} cannot be set")
        node = nxt
    last = parts[-1]
    value = expand(value) if isinstance(value, dict) else copy.deepcopy(value)
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _merge(node[last], value)
    else:
        node[last] = value


def apply_overrides(tree: dict, assignments: dict | Iterable[tuple[str, Any]]) -> dict:
    items = assignments.items() if isinstance(assignments, dict) else assignments
    for key, value in items:
        set_path(tree, str(key), value)
    return tree


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _method_name(node: Any) -> Any:
    if isinstance(node, str):
        return node
    return node.get("name") if isinstance(node, dict) else None


def _switch_method(tree: dict, parts: list[str], value: Any) -> None:
    if len(parts) == 1:
        new = _method_name(value)
    elif parts[1:] == ["name"]:
        new = value
    else:
        return
    old = _method_name(tree.get("method"))
    if new is not None and old is not None and new != old:
        tree["method"] = {"name": new}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
