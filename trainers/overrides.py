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


# No config is nested this deep; a deeper YAML value (or dotted key) is a mistake, and one deep enough would exhaust
# Python's recursion in copy.deepcopy or pydantic before any message could name it.
MAX_DEPTH = 32
# Aliases share one object however often they are used; deepcopy and validation expand every use, so a few nested
# aliases make a tree of billions of values ("billion laughs"). No config has anywhere near this many.
MAX_VALUES = 100_000


class YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader for specs, presets, spaces and key=value values. It refuses

    - a key given twice in one mapping: YAML requires unique keys, and PyYAML would silently keep the last (a second
      `set:` of a row would drop the first). Keys merged in by `<<:` may be overridden, as YAML intends;
    - nesting deeper than MAX_DEPTH, while composing (PyYAML recurses once per level: deep enough, it would raise
      RecursionError, slowly)."""

    _depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:        # an unhashable key: SafeLoader reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:   # more digits than Python converts (sys.get_int_max_str_digits), e.g. a pasted hash
            raise yaml.constructor.ConstructorError(None, None, f"a number of {len(node.value)} digits; too long",
                                                    node.start_mark) from None


YamlLoader.add_constructor("tag:yaml.org,2002:int", YamlLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """yaml.safe_load with YamlLoader's checks; a YAML tree too large to be a config (tree_problem) is a
    yaml.YAMLError too."""
    tree = yaml.load(text, Loader=YamlLoader)
    problem = tree_problem(tree)
    if problem:
        raise yaml.YAMLError(problem)
    return tree


def tree_problem(tree: Any) -> str | None:
    """Why a loaded YAML tree cannot be a config or spec ('key.path: nested more than 32 levels deep'), or None.
    Iterative, so it is safe on any tree yaml.safe_load returns."""
    stack, count = [(tree, "", 0)], 0
    while stack:
        node, where, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return f"more than {MAX_VALUES} values (after expanding aliases); no config is this large"
        if depth > MAX_DEPTH:
            return f"{where}: nested more than {MAX_DEPTH} levels deep"
        if isinstance(node, dict):
            stack += [(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]
    return None


def parse_assignments(args: Iterable[str]) -> list[tuple[str, Any]]:
    """['a.b=3', 'c=[1, 2]'] -> [('a.b', 3), ('c', [1, 2])]; values are parsed as YAML scalars/flows."""
    pairs = []
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise OverrideError(f"{arg!r}: expected key=value with a dotted key, e.g. schedule.epochs=3")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            shown = raw if len(raw) <= 80 else raw[:80] + "..."
            raise OverrideError(f"{key}: value {shown!r} is not valid YAML ({_yaml_problem(e)})") from None
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
    if not all(parts):
        raise OverrideError(f"{dotted!r}: expected a dotted key (no empty part), e.g. schedule.epochs")
    if len(parts) > MAX_DEPTH:
        raise OverrideError(f"{dotted[:80]}...: expected a dotted key of at most {MAX_DEPTH} parts")
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


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    return problem if problem else _first_line(e)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
