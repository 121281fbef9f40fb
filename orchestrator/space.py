"""Search spaces (search_spaces/*.yaml): config path -> distribution, each bound and choice checked against the
config it will be applied to, before anything runs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.validation import SpecError, _apply_and_validate, read_yaml
from trainers.config import flatten


DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "momentum")


@dataclass
class SearchParam:
    """One dimension of a search space: a config path, its distribution, and the condition under which a trial
    samples it (define-by-run: a trial whose condition is false neither samples nor records the parameter)."""
    key: str                        # dotted config path, e.g. method.policy.ema_eta
    kind: str                       # uniform | loguniform | int | choice | momentum
    low: float | None = None
    high: float | None = None
    step: int | None = None         # int only
    choices: list[Any] | None = None
    when: dict[str, list[Any]] = field(default_factory=dict)   # config path -> the values it may take (all must hold)

    @property
    def optuna_name(self) -> str:
        """The parameter's name in the Optuna study: its config path, or `1 - path` for a momentum, whose study
        value is 1 - x (what TPE models on a log scale)."""
        return f"1 - {self.key}" if self.kind == "momentum" else self.key

    def to_config(self, value: Any) -> Any:
        """The config value of an Optuna value of this parameter."""
        return 1.0 - value if self.kind == "momentum" else value

    def active(self, values: dict[str, Any], base_flat: dict[str, Any]) -> bool:
        """Whether a trial with sampled `values` (on a config whose other keys are `base_flat`) uses this parameter."""
        return all(values.get(path, base_flat.get(path)) in allowed for path, allowed in self.when.items())

    def probe_values(self) -> list[Any]:
        """Values that must all be valid for the key: both bounds (and the midpoint) or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, (self.low + self.high) / 2, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            text = f"choice {self.choices}"
        elif self.kind == "momentum":
            text = f"momentum [{self.low:g}, {self.high:g}] (1 - x log-uniform)"
        else:
            step = f" step {self.step}" if self.step and self.step != 1 else ""
            text = f"{self.kind} [{self.low:g}, {self.high:g}]{step}"
        conds = [f"{k} = {v[0]!r}" if len(v) == 1 else f"{k} in {v!r}" for k, v in self.when.items()]
        return text + (f" when {', '.join(conds)}" if conds else "")


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
    """A search space file: {params: {config.path: {uniform|loguniform|int|choice|momentum: ..., when: {...}}}},
    checked against `base`: every key must be a config path of it, every bound or choice must validate there (with
    its condition applied), and every condition must be satisfiable (see _check_conditions)."""
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
    _check_conditions(path, params, base)
    for p in params:
        condition = [(k, allowed[0]) for k, allowed in p.when.items()]
        for value in p.probe_values():
            try:
                _apply_and_validate(base, [*condition, (p.key, value)], "")
            except SpecError as e:
                raise SpecError(f"{path}: params.{p.key}: {p.describe()}: {value!r} is not a valid value here "
                                f"({str(e).removeprefix(': ')})") from None
    return params


def _check_conditions(path: Path, params: list[SearchParam], base: dict[str, Any]) -> None:
    """A condition names a `choice` parameter listed before it (a trial samples in file order) and values among its
    choices, or a fixed config key, with values valid there, one of which is the base config's (else the parameter
    would never be sampled: a dead dimension)."""
    base_flat = flatten(base)
    order = {p.key: i for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, allowed in p.when.items():
            where = f"{path}: params.{p.key}.when.{key}"
            if key in order:
                q = params[order[key]]
                if order[key] >= i:
                    raise SpecError(f"{where}: {key} is sampled {'by this parameter' if q is p else 'after it'}; "
                                    f"a condition names a parameter listed before it")
                if q.kind != "choice":
                    raise SpecError(f"{where}: expected a choice parameter or a fixed config key; {key} is "
                                    f"{q.describe()}")
                bad = [v for v in allowed if v not in q.choices]
                if bad:
                    raise SpecError(f"{where}: {bad[0]!r} is not one of its choices {q.choices}")
                continue
            if key not in base_flat or isinstance(base_flat[key], dict):
                raise SpecError(f"{where}: expected a config key (a leaf of the config, e.g. method.curriculum.shape) "
                                f"or a parameter of this space")
            for v in allowed:
                try:
                    _apply_and_validate(base, [(key, v)], "")
                except SpecError as e:
                    raise SpecError(f"{where}: {v!r} is not a valid value here ({str(e).removeprefix(': ')})") from None
            if base_flat[key] not in allowed:
                raise SpecError(f"{where}: never true: {key} is {base_flat[key]!r} in the base config and this space "
                                f"does not search it (expected one of {allowed!r})")


def _parse_when(where: str, when: Any) -> dict[str, list[Any]]:
    """`when: {path: value}` or `{path: [value, ...]}` (any of them) -> {path: [values]}."""
    if not isinstance(when, dict) or not when:
        raise SpecError(f"{where}: when: expected a mapping {{config.path: value}} (or a list of values); got {when!r}")
    out = {}
    for key, value in when.items():
        values = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not all(key.split(".")):
            raise SpecError(f"{where}: when: {key!r}: expected a config path (a dotted key)")
        if not values or not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise SpecError(f"{where}: when.{key}: expected a value or a non-empty list of values (numbers, strings, "
                            f"booleans, null); got {value!r}")
        out[key] = values
    return out


def _number(v: Any) -> bool:
    """A finite float, or an int that fits in 64 bits (a larger one overflows the float maths of the bounds)."""
    if isinstance(v, bool):
        return False
    return (isinstance(v, float) and math.isfinite(v)) or (isinstance(v, int) and -2**63 <= v < 2**63)


def _parse_distribution(path: Path, key: str, dist: Any) -> SearchParam:
    where = f"{path}: params.{key}"
    if not isinstance(dist, dict) or not (set(dist) & set(DISTRIBUTIONS)) or len(set(dist) & set(DISTRIBUTIONS)) > 1:
        raise SpecError(f"{where}: expected one of {{uniform: [a, b]}}, {{loguniform: [a, b]}}, {{int: [a, b]}}, "
                        f"{{choice: [...]}}, {{momentum: [a, b]}} (and an optional `when:`); got {dist!r}")
    kind = next(k for k in DISTRIBUTIONS if k in dist)
    extra = sorted(set(dist) - {kind, "when"} - ({"step"} if kind == "int" else set()), key=str)
    if extra:
        raise SpecError(f"{where}: {extra[0]}: unknown key (a {kind} distribution takes "
                        f"{'[a, b] and an optional step' if kind == 'int' else 'only its values'}, and `when:`)")
    when = _parse_when(where, dist["when"]) if "when" in dist else {}
    if key in when:
        raise SpecError(f"{where}: when.{key}: a parameter cannot be conditioned on itself")
    arg = dist[kind]
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SpecError(f"{where}: choice: expected a non-empty list of values; got {arg!r}")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in arg):
            raise SpecError(f"{where}: choice: expected scalar values (numbers, strings, booleans, null); got {arg!r}")
        if len({repr(v) for v in arg}) != len(arg):
            raise SpecError(f"{where}: choice: values must be distinct; got {arg!r}")
        return SearchParam(key=key, kind=kind, choices=list(arg), when=when)
    if not isinstance(arg, list) or len(arg) != 2 or not all(_number(v) for v in arg):
        raise SpecError(f"{where}: {kind}: expected [low, high], two finite numbers (whole ones within 64 bits); got {arg!r}")
    low, high = arg
    if not low < high:
        raise SpecError(f"{where}: {kind}: expected low < high; got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SpecError(f"{where}: loguniform: expected 0 < low < high; got [{low}, {high}]")
    if kind == "momentum" and not 0 <= low < high < 1:   # 1 - x is sampled log-uniformly: it must stay above 0
        raise SpecError(f"{where}: momentum: expected 0 <= low < high < 1 (1 - x is log-uniform on "
                        f"[1 - high, 1 - low]); got [{low}, {high}]")
    step = None
    if kind == "int":
        if not all(isinstance(v, int) for v in arg):
            raise SpecError(f"{where}: int: expected two whole numbers; got {arg!r}")
        step = dist.get("step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1 or (high - low) % step:
            raise SpecError(f"{where}: step: expected a whole number >= 1 that divides high - low; got {step!r}")
    return SearchParam(key=key, kind=kind, low=low, high=high, step=step, when=when)

