"""Reading YAML and validating config trees: the one-line SpecError every user mistake becomes.

Shared by spec files (orchestrator.spec) and search spaces (orchestrator.space): a message names the file (or the
command line), the key path and what was expected.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainers.config import Config
from trainers.overrides import OverrideError, apply_overrides, load_yaml
from trainers.registry import METHODS, load_all


class SpecError(Exception):
    """A bad spec, preset or override. str() is the one line shown to the user: characters that would break the
    line or hide in it (newlines, NUL, bidi overrides) are shown escaped, as in a Python string (\\n, \\x00, \\u202e)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot be read ({e.__class__.__name__}: {e})") from None
    try:
        return load_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(f"{path}: not valid YAML: {where}{e.problem or type(e).__name__}") from None
    except yaml.reader.ReaderError as e:     # a character YAML does not allow (NUL, most control characters)
        raise SpecError(f"{path}: not valid YAML: character {e.position + 1}: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:              # load_yaml's checks of the whole tree: 'key.path: nested more than ...'
        raise SpecError(f"{path}: {e}") from None


def _apply_and_validate(tree: dict, assignments, where: str) -> dict[str, Any]:
    """Apply overrides to a copy of `tree`, validate it as a Config, return the full dumped config."""
    tree = copy.deepcopy(tree)
    try:
        apply_overrides(tree, assignments)
    except OverrideError as e:
        raise SpecError(f"{where}: {e}") from None
    try:
        config = Config.model_validate(tree).model_dump(mode="json")
    except ValidationError as e:
        raise SpecError(f"{where}: {describe(e, Config, tree)}") from None
    problem = _number_problem(config)
    if problem:
        raise SpecError(f"{where}: {problem}")
    return config


def _number_problem(tree: Any, where: str = "") -> str | None:
    """'key.path: expected ...' for the first number a trial cannot use: NaN or infinite (a loss, a learning rate
    or a weight of inf trains to NaN), or an integer beyond 64 bits (torch, numpy and Parquet overflow)."""
    if isinstance(tree, dict):
        items = [(f"{where}.{k}" if where else str(k), v) for k, v in tree.items()]
    elif isinstance(tree, list):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(tree)]
    elif isinstance(tree, float) and not math.isfinite(tree):
        return f"{where}: expected a finite number, got {tree}"
    elif isinstance(tree, int) and not isinstance(tree, bool) and not -2**63 <= tree < 2**63:
        return f"{where}: expected a whole number within 64 bits (-2**63 <= n < 2**63), got {tree}"
    else:
        return None
    return next((p for p in (_number_problem(v, k) for k, v in items) if p), None)


def describe(err: ValidationError, model: type[BaseModel], tree: dict | None = None) -> str:
    """The first error as 'key.path: what was expected' (+ how many more)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = list(first["loc"])
    msg = first["msg"]
    if loc[-2:-1] and loc[-1] == "[key]":     # pydantic's location of a bad mapping key: (..., key, "[key]")
        msg = f"key {loc[-2]!r}: {msg}"
        loc = loc[:-2]
    if first["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1], tree)
        msg = "unknown key" + (f" (expected one of: {', '.join(known)})" if known else "")
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif "input" in first and first["type"] not in ("value_error",) and not isinstance(first["input"], (dict, list)):
        msg = f"{msg}, got {first['input']!r}"
    msg = msg.removeprefix("Value error, ")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{_dotted(loc)}: {msg}{more}" if loc else f"{msg}{more}"


def _dotted(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(model: type[BaseModel], loc: list, tree: dict | None) -> list[str]:
    node: Any = model
    sub = tree
    for part in loc:
        if isinstance(part, int) or not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        if node is Config and part == "method":
            load_all()
            method = sub.get("method") if isinstance(sub, dict) else None
            name = method.get("name", "supervised") if isinstance(method, dict) else method or "supervised"
            node = METHODS.get(name).config if isinstance(name, str) and name in METHODS else None
        else:
            field_info = node.model_fields.get(part)
            node = getattr(field_info, "annotation", None)
            if node is not None and not isinstance(node, type):   # Optional[...] etc.
                node = next((a for a in getattr(node, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        sub = sub.get(part) if isinstance(sub, dict) else None
    if isinstance(node, type) and issubclass(node, BaseModel):
        return sorted(node.model_fields)
    return []
