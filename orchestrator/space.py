"""Search spaces (search_spaces/*.yaml): config path -> distribution, each bound and choice checked against the
config it will be applied to, before anything runs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.validation import SpecError, _apply_and_validate, read_yaml


DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclass
class SearchParam:
    """One dimension of a search space: a config path and its distribution."""
    key: str                        # dotted config path, e.g. method.policy.ema_eta
    kind: str                       # uniform | loguniform | int | choice
    low: float | None = None
    high: float | None = None
    step: int | None = None         # int only
    choices: list[Any] | None = None

    def probe_values(self) -> list[Any]:
        """Values that must all be valid for the key: both bounds (and the midpoint) or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, (self.low + self.high) / 2, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice {self.choices}"
        step = f" step {self.step}" if self.step and self.step != 1 else ""
        return f"{self.kind} [{self.low:g}, {self.high:g}]{step}"



def find_space(name: str, spec_path: Path) -> Path:
    """A space path as written, relative to the spec's folder, to its parent (the repo) or to the CWD."""
    p = Path(name)
    candidates = [p] if p.is_absolute() else [spec_path.parent / p, spec_path.parent.parent / p, Path.cwd() / p]
    for c in candidates:
        try:
            if c.is_file():
                return c
        except OSError:          # e.g. a name too long for the file system: no such file either
            continue
    raise SpecError(f"{spec_path}: search: no search space file {name!r} (looked in "
                    f"{', '.join(str(c.parent) for c in candidates)})")


SPACE_KEYS = ("name", "description", "method", "params")


def load_space(path: Path, base: dict[str, Any]) -> list[SearchParam]:
    """A search space file: {params: {config.path: {uniform|loguniform|int|choice: ...}}}, checked against `base`:
    every key must be a config path of it and every bound or choice must validate there."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise SpecError(f"{path}: expected a mapping with a non-empty `params:` (config path -> distribution)")
    extra = sorted(set(raw) - set(SPACE_KEYS), key=str)
    if extra:
        raise SpecError(f"{path}: {extra[0]}: unknown key (expected one of: {', '.join(SPACE_KEYS)})")
    for key in raw["params"]:
        if not isinstance(key, str) or not all(key.split(".")):
            raise SpecError(f"{path}: params: {key!r}: expected a config path (a dotted key, e.g. "
                            f"method.policy.ema_eta)")
    method = base["method"]["name"]
    if raw.get("method") is not None and raw["method"] != method:
        raise SpecError(f"{path}: method: this space is for {raw['method']!r}, but the spec's base config trains "
                        f"{method!r}")
    params = [_parse_distribution(path, key, dist) for key, dist in raw["params"].items()]
    keys = [p.key for p in params]
    for a in keys:
        for b in keys:
            if b.startswith(a + "."):
                raise SpecError(f"{path}: params.{b}: overlaps params.{a} (give one or the other)")
    for p in params:
        for value in p.probe_values():
            try:
                _apply_and_validate(base, [(p.key, value)], "")
            except SpecError as e:
                raise SpecError(f"{path}: params.{p.key}: {p.describe()}: {value!r} is not a valid value here "
                                f"({str(e).removeprefix(': ')})") from None
    return params


def _number(v: Any) -> bool:
    """A finite float, or an int that fits in 64 bits (a larger one overflows the float maths of the bounds)."""
    if isinstance(v, bool):
        return False
    return (isinstance(v, float) and math.isfinite(v)) or (isinstance(v, int) and -2**63 <= v < 2**63)


def _parse_distribution(path: Path, key: str, dist: Any) -> SearchParam:
    where = f"{path}: params.{key}"
    if not isinstance(dist, dict) or not (set(dist) & set(DISTRIBUTIONS)) or len(set(dist) & set(DISTRIBUTIONS)) > 1:
        raise SpecError(f"{where}: expected one of {{uniform: [a, b]}}, {{loguniform: [a, b]}}, {{int: [a, b]}}, "
                        f"{{choice: [...]}}; got {dist!r}")
    kind = next(k for k in DISTRIBUTIONS if k in dist)
    extra = sorted(set(dist) - {kind} - ({"step"} if kind == "int" else set()), key=str)
    if extra:
        raise SpecError(f"{where}: {extra[0]}: unknown key (a {kind} distribution takes "
                        f"{'[a, b] and an optional step' if kind == 'int' else 'only its values'})")
    arg = dist[kind]
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SpecError(f"{where}: choice: expected a non-empty list of values; got {arg!r}")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in arg):
            raise SpecError(f"{where}: choice: expected scalar values (numbers, strings, booleans, null); got {arg!r}")
        if len({repr(v) for v in arg}) != len(arg):
            raise SpecError(f"{where}: choice: values must be distinct; got {arg!r}")
        return SearchParam(key=key, kind=kind, choices=list(arg))
    if not isinstance(arg, list) or len(arg) != 2 or not all(_number(v) for v in arg):
        raise SpecError(f"{where}: {kind}: expected [low, high], two finite numbers (whole ones within 64 bits); got {arg!r}")
    low, high = arg
    if not low < high:
        raise SpecError(f"{where}: {kind}: expected low < high; got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SpecError(f"{where}: loguniform: expected 0 < low < high; got [{low}, {high}]")
    step = None
    if kind == "int":
        if not all(isinstance(v, int) for v in arg):
            raise SpecError(f"{where}: int: expected two whole numbers; got {arg!r}")
        step = dist.get("step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1 or (high - low) % step:
            raise SpecError(f"{where}: step: expected a whole number >= 1 that divides high - low; got {step!r}")
    return SearchParam(key=key, kind=kind, low=low, high=high, step=step)

