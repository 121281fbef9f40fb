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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.config import flatten
from orchestrator.controls import control_targets
from orchestrator.columns import (DEFAULT_PROFILE, ColumnSpec, active_columns, check_columns,  # noqa: F401
                                  check_paper, paper_numbers)
from trainers.overrides import OverrideError, apply_overrides, parse_assignments
# re-exported: the rest of rlseg imports these from orchestrator.spec
from orchestrator.space import DISTRIBUTIONS, SPACE_KEYS, SearchParam, find_space, load_space  # noqa: F401
from orchestrator.validation import (SpecError, _apply_and_validate, describe, one_line,  # noqa: F401
                                     read_yaml)


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
    # the paper's number for this row, if any: a number (the spec metric's), {column: number} or {profile: number
    # or {column: number}} (orchestrator.columns)
    paper: FiniteFloat | dict[str, FiniteFloat | dict[str, FiniteFloat]] | None = None
    paper_std: FiniteFloat | None = Field(None, ge=0)   # and its std over seeds, where the paper gives one
    note: str | None = None
    compare_to: str | None = Field(None, min_length=1)  # the row Δ and p are against (default: the first row)
    @field_validator("paper", mode="before")
    @classmethod
    def _finite_paper(cls, v: Any) -> Any:
        # checked before the union, so the message names rows[i].paper, not the union's member
        values = [v] if not isinstance(v, dict) else [x for x in v.values() if not isinstance(x, dict)] + [
            y for x in v.values() if isinstance(x, dict) for y in x.values()]
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            raise ValueError("Input should be a finite number")
        return v

    # more overrides in one profile's runs, after `set` (`default`: the embedded run): the paper-scale model of a row
    # whose embedded run uses a small stand-in ({paper: {model.encoder: mit_b1}})
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
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
    # base and each profile: a mapping of config keys, or the name of a preset holding one (shared by several specs),
    # or {preset: name, <config keys>}: that preset with these keys over it
    profiles: dict[str, dict[str, Any] | str] = Field(default_factory=dict)


class Spec(_SpecBase):
    """An ablation: rows x seeds."""
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    columns: list[ColumnSpec] | None = Field(None, min_length=1)   # more metrics per row (orchestrator.columns)
    rows: list[RowSpec] = Field(min_length=1)
    # the spurious-reward control row (method.reward.control: random ...): every row of its method that trains on its
    # real reward also gets Δ and p against it (orchestrator.controls)
    control: str | None = Field(None, min_length=1)

    _unique_seeds = field_validator("seeds")(_distinct_seeds)

    @model_validator(mode="after")
    def _columns_and_references(self):
        check_columns(self.columns, list(self.profiles))
        names = [r.name for r in self.rows]
        for i, row in enumerate(self.rows):
            check_paper(f"rows[{i}] ({row.name})", row.paper, self.columns, list(self.profiles))
            unknown = sorted(set(row.profiles) - {DEFAULT_PROFILE, *self.profiles})
            if unknown:
                raise ValueError(f"rows[{i}] ({row.name}).profiles: no profile {unknown[0]!r} (expected one of: "
                                 f"{', '.join(sorted({DEFAULT_PROFILE, *self.profiles}))})")
            if row.compare_to is not None and (row.compare_to not in names or row.compare_to == row.name):
                raise ValueError(f"rows[{i}] ({row.name}).compare_to: expected the name of another row "
                                 f"({', '.join(n for n in names if n != row.name)}), got {row.compare_to!r}")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control: expected the name of a row ({', '.join(names)}), got {self.control!r}")
        return self

    @field_validator("rows")
    @classmethod
    def _unique_rows(cls, v: list[RowSpec]) -> list[RowSpec]:
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"row names must be distinct; repeated: {', '.join(dup)}")
        return v


# command-line keys that change the spec itself (seeds=[0,1], metric.name=val/pixel_acc); the rest are config keys
SPEC_KEYS = ("title", "paper", "metric", "seeds", "base")
SEARCH_SPEC_KEYS = ("title", "paper", "metric", "base", "search", "num_samples", "trial_seed", "sampler", "scheduler",
                    "confirm", "objectives")


@dataclass
class Row:
    index: int
    name: str
    paper: float | None
    config: dict[str, Any]          # resolved, validated, seed not yet set
    changes: dict[str, Any]         # flattened differences from the base config
    paper_std: float | None = None
    papers: dict[str, float] = field(default_factory=dict)   # the paper's number per table column
    compare_to: str | None = None


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
    papers: dict[str, float] = field(default_factory=dict)
    compare_to: str | None = None


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
    columns: list[dict[str, str]] = field(default_factory=list)   # this profile's table columns {name, metric}

    def table_rows(self) -> list[dict[str, Any]]:
        """Every spec row in spec order, as the table wants them (name, paper, paper_std, papers per column,
        compare_to, pending reason)."""
        rows = [(r, None) for r in self.rows] + [(p, p.reason) for p in self.pending]
        against = control_targets(self.rows, getattr(self.spec, "control", None))
        return [{"name": r.name, "paper": r.paper, "paper_std": r.paper_std, "papers": r.papers,
                 "compare_to": r.compare_to, "pending": reason, "control": against.get(r.name)}
                for r, reason in sorted(rows, key=lambda t: t[0].index)]

    def resolved(self) -> dict[str, Any]:
        """What spec.resolved.yaml holds: the spec as given plus every row's full config."""
        return {
            "spec": self.spec.model_dump(mode="json"), "spec_path": str(self.path),
            "profile": self.profile, "overrides": self.overrides,
            "columns": self.columns,
            "rows": [{"name": r.name, "paper": r.paper, "paper_std": r.paper_std, "papers": r.papers,
                      "compare_to": r.compare_to, "changes": r.changes, "config": r.config} for r in self.rows],
            "pending": [{"name": p.name, "paper": p.paper, "paper_std": p.paper_std, "papers": p.papers,
                         "reason": p.reason, "error": p.error, "set": p.set}
                        for p in self.pending],
        }



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
    base = _apply_layer({}, spec.base, path, "base")
    if profile is not None:
        if profile not in spec.profiles:
            known = ", ".join(sorted(spec.profiles)) or "none defined"
            raise SpecError(f"{path}: profiles: no profile {profile!r} (profiles: {known})")
        base = _apply_layer(base, spec.profiles[profile], path, f"profiles.{profile}")
    return _apply_and_validate(base, config_pairs, "command line")


def _apply_layer(tree: dict[str, Any], layer: str | dict[str, Any], path: Path, key: str) -> dict[str, Any]:
    """`tree` with a base or profile over it, validated: a preset name, a mapping of config keys, or
    {preset: name, <config keys over that preset>}."""
    if isinstance(layer, dict) and "preset" in layer:
        layer = copy.deepcopy(layer)
        name = layer.pop("preset")
        if not isinstance(name, str):
            raise SpecError(f"{path}: {key}.preset: expected a preset name, got {name!r}")
        tree = _apply_and_validate(tree, load_preset(name, path, f"{key}.preset"), f"{path}: {key} (preset {name!r})")
    if isinstance(layer, str):
        where = f"preset {layer!r} ({layer}.yaml)" if key == "base" else f"{path}: {key} (preset {layer!r})"
        return _apply_and_validate(tree, load_preset(layer, path, key), where)
    return _apply_and_validate(tree, layer, f"{path}: {key}")


def plan_rows(spec: Spec, path: Path, profile: str | None, overrides: list[str], base: dict[str, Any]) -> Plan:
    """The rows of `spec` on a resolved base config -> Plan."""
    base_flat = flatten(base)
    columns = active_columns(spec.columns, profile)
    rows, pending = [], []
    for i, row in enumerate(spec.rows):
        where = f"{path}: rows[{i}] ({row.name}).set"
        paper, papers = paper_numbers(row.paper, profile, columns, spec.metric.name)
        try:
            cfg = _apply_and_validate(base, row.set, where)
            extra = row.profiles.get(profile or DEFAULT_PROFILE)
            if extra:
                cfg = _apply_and_validate(cfg, extra, f"{path}: rows[{i}] ({row.name}).profiles.{profile or DEFAULT_PROFILE}")
        except SpecError as e:
            if not row.pending:
                raise
            pending.append(PendingRow(index=i, name=row.name, paper=paper, paper_std=row.paper_std,
                                      reason=row.pending, error=str(e).removeprefix(one_line(where) + ": "), set=row.set,
                                      papers=papers, compare_to=row.compare_to))
            continue
        flat = flatten(cfg)
        changes = {k: v for k, v in flat.items() if base_flat.get(k, object()) != v}
        rows.append(Row(index=i, name=row.name, paper=paper, config=cfg, changes=changes,
                        paper_std=row.paper_std, papers=papers, compare_to=row.compare_to))
    if not rows:
        raise SpecError(f"{path}: rows: every row is pending; nothing to run")
    trials = [TrialSpec(row=r.name, row_index=r.index, seed=s, config={**r.config, "seed": s})
              for r in rows for s in spec.seeds]
    return Plan(spec=spec, path=path, profile=profile, overrides=overrides, base_config=base, rows=rows,
                trials=trials, pending=pending, columns=columns)


# search specs (orchestrator.search_spec) use Spec and plan_rows above; re-exported here
from orchestrator.search_spec import (ConfirmSpec, ObjectiveSpec, SamplerSpec, SchedulerSpec, SearchPlan,  # noqa: E402,F401
                                      SearchSpec, _search_plan, config_with)
