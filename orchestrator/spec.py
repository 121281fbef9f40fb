"""Ablation specs: load (yaml.safe_load), validate (pydantic), resolve base -> profile -> CLI -> row.

Every user error is a SpecError whose one-line message names the file (or the command line), the
key path and what was expected; nothing runs and nothing is written before all rows resolve.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainers.config import Config, flatten
from trainers.overrides import OverrideError, apply_overrides, load_yaml, parse_assignments
from trainers.registry import METHODS, load_all


class SpecError(Exception):
    """A bad spec, preset or override. str() is the one line shown to the user: characters that would break the
    line or hide in it (newlines, NUL, bidi overrides) are shown escaped, as in a Python string (\\n, \\x00, \\u202e)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# Seeds and counts reach torch, numpy and Parquet as 64-bit integers; the TPE sampler's seed is numpy's (32 bits).
INT64_MAX = 2**63 - 1
Seed = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricSpec(_Strict):
    name: str = Field("val/mIoU", pattern=r"^(val|train)/\S+$")   # a key the trainers report
    mode: Literal["max", "min"] = "max"


class RowSpec(_Strict):
    name: str = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)   # dotted-key overrides of the base config
    paper: FiniteFloat | None = None                    # the paper's number for this row, if any
    paper_std: FiniteFloat | None = Field(None, ge=0)   # and its std over seeds, where the paper gives one
    note: str | None = None
    # Why this row may not run yet (e.g. its backbone is not implemented). If its `set` does not resolve, the row
    # stays in the dry-run and the table (with the paper's number and the resolution error) and runs no trials;
    # once it resolves (the backbone landed) it is an ordinary row.
    pending: str | None = Field(None, min_length=1)


def _distinct_seeds(v: list[Seed]) -> list[Seed]:
    if len(set(v)) != len(v):
        raise ValueError("seeds must be distinct")
    return v


class _SpecBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    title: str = ""
    paper: str | None = None
    metric: MetricSpec = Field(default_factory=MetricSpec)
    base: str | dict[str, Any] = "supervised"
    # a profile is a mapping of config keys, or the name of a preset holding one (shared by several specs)
    profiles: dict[str, dict[str, Any] | str] = Field(default_factory=dict)


class Spec(_SpecBase):
    """An ablation: rows x seeds."""
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    rows: list[RowSpec] = Field(min_length=1)

    _unique_seeds = field_validator("seeds")(_distinct_seeds)

    @field_validator("rows")
    @classmethod
    def _unique_rows(cls, v: list[RowSpec]) -> list[RowSpec]:
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"row names must be distinct; repeated: {', '.join(dup)}")
        return v


class SamplerSpec(_Strict):
    """Optuna's TPE sampler, seeded: the same spec proposes the same configs (up to trial completion order)."""
    kind: Literal["tpe"] = "tpe"
    seed: int = Field(0, ge=0, le=2**32 - 1)    # optuna's TPESampler takes numpy's 32-bit seeds
    n_startup_trials: int = Field(4, ge=1, le=INT64_MAX)     # random proposals before TPE models the results


class SchedulerSpec(_Strict):
    """Early stopping of search trials: ASHA over epochs (Tune's ASHAScheduler), or none."""
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, le=INT64_MAX)   # epochs every trial runs before the first rung
    reduction_factor: FiniteFloat = Field(2.0, gt=1)  # 1/reduction_factor of the trials go on at each rung


class ConfirmSpec(_Strict):
    """The top_k search configs (and the base config) rerun over these seeds: an ablation table."""
    top_k: int = Field(2, ge=1, le=INT64_MAX)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)

    _unique_seeds = field_validator("seeds")(_distinct_seeds)


class SearchSpec(_SpecBase):
    """An Optuna search over a space (search_spaces/*.yaml), then a confirmation of the best configs over seeds."""
    search: str = Field(min_length=1)           # the search space file (relative to the spec, its parent, or CWD)
    num_samples: int = Field(16, ge=1, le=100_000)   # search trials (the bound: far beyond any budget, and the
                                                     # dry run and the searcher hold one config per trial)
    trial_seed: Seed = 0                        # the training seed of every search trial
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    confirm: ConfirmSpec = Field(default_factory=ConfirmSpec)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v   # `scheduler: asha` / `scheduler: none`


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


# command-line keys that change the spec itself (seeds=[0,1], metric.name=val/pixel_acc); the rest are config keys
SPEC_KEYS = ("title", "paper", "metric", "seeds", "base")
SEARCH_SPEC_KEYS = ("title", "paper", "metric", "base", "search", "num_samples", "trial_seed", "sampler", "scheduler",
                    "confirm")


@dataclass
class Row:
    index: int
    name: str
    paper: float | None
    config: dict[str, Any]          # resolved, validated, seed not yet set
    changes: dict[str, Any]         # flattened differences from the base config
    paper_std: float | None = None


@dataclass
class PendingRow:
    """A spec row that cannot run yet (RowSpec.pending): shown, tabulated with the paper's number, not run."""
    index: int
    name: str
    paper: float | None
    paper_std: float | None
    reason: str
    error: str                      # why its `set` does not resolve
    set: dict[str, Any]


@dataclass
class TrialSpec:
    row: str
    row_index: int
    seed: int
    config: dict[str, Any]          # Config.model_dump(mode="json") with `seed` set

    @property
    def name(self) -> str:
        return f"{self.row} | seed {self.seed}"


@dataclass
class Plan:
    spec: Spec
    path: Path
    profile: str | None
    overrides: list[str]
    base_config: dict[str, Any]
    rows: list[Row]                 # the runnable rows
    trials: list[TrialSpec] = field(default_factory=list)
    pending: list[PendingRow] = field(default_factory=list)

    def table_rows(self) -> list[dict[str, Any]]:
        """Every spec row in spec order, as the table wants them (name, paper, paper_std, pending reason)."""
        rows = [(r.index, {"name": r.name, "paper": r.paper, "paper_std": r.paper_std, "pending": None})
                for r in self.rows]
        rows += [(p.index, {"name": p.name, "paper": p.paper, "paper_std": p.paper_std, "pending": p.reason})
                 for p in self.pending]
        return [r for _, r in sorted(rows, key=lambda t: t[0])]

    def resolved(self) -> dict[str, Any]:
        """What spec.resolved.yaml holds: the spec as given plus every row's full config."""
        return {
            "spec": self.spec.model_dump(mode="json"), "spec_path": str(self.path),
            "profile": self.profile, "overrides": self.overrides,
            "rows": [{"name": r.name, "paper": r.paper, "paper_std": r.paper_std, "changes": r.changes,
                      "config": r.config} for r in self.rows],
            "pending": [{"name": p.name, "paper": p.paper, "paper_std": p.paper_std, "reason": p.reason, "error": p.error,
                         "set": p.set}
                        for p in self.pending],
        }


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


def load_spec(path: str | Path, overrides: list[tuple[str, Any]] = ()) -> Spec | SearchSpec:
    """Read and validate a spec file (an ablation, or a search if it has a `search:` key); `overrides` of spec-level
    keys (seeds=[0,1], metric.name=..., num_samples=8) come from the command line and are validated after the file."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping with name, metric, base and rows (or search); "
                        f"got {type(raw).__name__}")
    model = SearchSpec if "search" in raw else Spec
    try:
        spec = model.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: {describe(e, model)}") from None
    if not overrides:
        return spec
    try:
        return model.model_validate(apply_overrides(copy.deepcopy(raw), overrides))
    except (ValidationError, OverrideError) as e:
        raise SpecError(f"command line: {describe(e, model) if isinstance(e, ValidationError) else e}") from None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("trainers.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str, spec_path: Path, key: str = "base") -> dict[str, Any]:
    if name not in preset_names():     # a name, not a path: `../x` or a 5000-character name is no preset either
        raise SpecError(f"{spec_path}: {key}: no preset {name!r}; presets: {', '.join(preset_names())}")
    f = resources.files("trainers.presets") / f"{name}.yaml"
    tree = read_yaml(Path(str(f))) or {}
    if not isinstance(tree, dict):
        raise SpecError(f"{f}: expected a mapping of config keys")
    return tree


def resolve(path: str | Path, profile: str | None = None, overrides: list[str] | None = None) -> Plan | SearchPlan:
    """Spec file -> Plan (one validated config per row, one TrialSpec per (row, seed)), or SearchPlan for a search."""
    path = Path(path)
    overrides = list(overrides or [])
    try:
        pairs = parse_assignments(overrides)
    except OverrideError as e:
        raise SpecError(f"command line: {e}") from None
    raw = read_yaml(path)
    spec_keys = SEARCH_SPEC_KEYS if isinstance(raw, dict) and "search" in raw else SPEC_KEYS
    spec_pairs = [(k, v) for k, v in pairs if k.split(".")[0] in spec_keys]
    config_pairs = [(k, v) for k, v in pairs if k.split(".")[0] not in spec_keys]
    spec = load_spec(path, spec_pairs)
    base = _resolve_base(spec, path, profile, config_pairs)
    if isinstance(spec, SearchSpec):
        return _search_plan(spec, path, profile, overrides, base)
    return plan_rows(spec, path, profile, overrides, base)


def _resolve_base(spec: Spec | SearchSpec, path: Path, profile: str | None, config_pairs) -> dict[str, Any]:
    """base -> profile -> command-line overrides, validated at each step."""
    if isinstance(spec.base, str):
        tree, where = load_preset(spec.base, path), f"preset {spec.base!r} ({spec.base}.yaml)"
    else:
        tree, where = copy.deepcopy(spec.base), f"{path}: base"
    base = _apply_and_validate(tree, {}, where)
    if profile is not None:
        if profile not in spec.profiles:
            known = ", ".join(sorted(spec.profiles)) or "none defined"
            raise SpecError(f"{path}: profiles: no profile {profile!r} (profiles: {known})")
        chosen = spec.profiles[profile]
        if isinstance(chosen, str):
            base = _apply_and_validate(base, load_preset(chosen, path, f"profiles.{profile}"),
                                       f"{path}: profiles.{profile} (preset {chosen!r})")
        else:
            base = _apply_and_validate(base, chosen, f"{path}: profiles.{profile}")
    return _apply_and_validate(base, config_pairs, "command line")


def plan_rows(spec: Spec, path: Path, profile: str | None, overrides: list[str], base: dict[str, Any]) -> Plan:
    """The rows of `spec` on a resolved base config -> Plan."""
    base_flat = flatten(base)
    rows, pending = [], []
    for i, row in enumerate(spec.rows):
        where = f"{path}: rows[{i}] ({row.name}).set"
        try:
            cfg = _apply_and_validate(base, row.set, where)
        except SpecError as e:
            if not row.pending:
                raise
            pending.append(PendingRow(index=i, name=row.name, paper=row.paper, paper_std=row.paper_std,
                                      reason=row.pending, error=str(e).removeprefix(one_line(where) + ": "), set=row.set))
            continue
        flat = flatten(cfg)
        changes = {k: v for k, v in flat.items() if base_flat.get(k, object()) != v}
        rows.append(Row(index=i, name=row.name, paper=row.paper, config=cfg, changes=changes,
                        paper_std=row.paper_std))
    if not rows:
        raise SpecError(f"{path}: rows: every row is pending; nothing to run")
    trials = [TrialSpec(row=r.name, row_index=r.index, seed=s, config={**r.config, "seed": s})
              for r in rows for s in spec.seeds]
    return Plan(spec=spec, path=path, profile=profile, overrides=overrides, base_config=base, rows=rows,
                trials=trials, pending=pending)


# --------------------------------------------------------------------------- search specs and spaces


@dataclass
class SearchPlan:
    """A resolved search spec: the space, the base config, and how search trials are configured."""
    spec: SearchSpec
    path: Path
    space_path: Path
    params: list[SearchParam]
    profile: str | None
    overrides: list[str]
    base_config: dict[str, Any]          # the confirm phase's base (and its "base" row)
    search_config: dict[str, Any]        # what every search trial starts from (trial_seed; eval every epoch)

    @property
    def epochs(self) -> int:
        return self.search_config["schedule"]["epochs"]

    def confirm_plan(self, picks: list[tuple[str, dict[str, Any]]]) -> Plan:
        """The confirmation ablation: a `base` row, then one row per (name, sampled values), over confirm.seeds."""
        s = self.spec
        rows = [RowSpec(name="base")] + [RowSpec(name=name, set=values) for name, values in picks]
        ablation = Spec(name=s.name, title=s.title, paper=s.paper, metric=s.metric, base=s.base, profiles=s.profiles,
                        seeds=s.confirm.seeds, rows=rows)
        return plan_rows(ablation, self.path, self.profile, self.overrides, self.base_config)

    def resolved(self) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(mode="json"), "spec_path": str(self.path), "profile": self.profile,
                "overrides": self.overrides, "space_path": str(self.space_path),
                "params": [{"key": p.key, "distribution": p.describe()} for p in self.params],
                "base_config": self.base_config, "search_config": self.search_config}


def config_with(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`config` with sampled {dotted key: value}, validated; SpecError (one line) if they do not fit."""
    return _apply_and_validate(config, list(values.items()), "sampled values")


def _search_plan(spec: SearchSpec, path: Path, profile: str | None, overrides: list[str],
                 base: dict[str, Any]) -> SearchPlan:
    space_path = _find_space(spec.search, path)
    search_config = {**copy.deepcopy(base), "seed": spec.trial_seed}
    if spec.metric.name.startswith("val/"):   # the searcher and ASHA read the metric at every epoch
        search_config["schedule"]["eval_every"] = 1
    params = load_space(space_path, search_config)
    return SearchPlan(spec=spec, path=path, space_path=space_path, params=params, profile=profile,
                      overrides=overrides, base_config=base, search_config=search_config)


def _find_space(name: str, spec_path: Path) -> Path:
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
