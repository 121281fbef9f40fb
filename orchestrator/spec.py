"""Ablation specs: load (yaml.safe_load), validate (pydantic), resolve base -> profile -> CLI -> row.

Every user error is a SpecError whose one-line message names the file (or the command line), the
key path and what was expected; nothing runs and nothing is written before all rows resolve.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainers.config import Config, flatten
from trainers.overrides import OverrideError, apply_overrides, parse_assignments
from trainers.registry import METHODS, load_all


class SpecError(Exception):
    """A bad spec, preset or override. str() is the one line shown to the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricSpec(_Strict):
    name: str = Field("val/mIoU", pattern=r"^(val|train)/\S+$")   # a key the trainers report
    mode: Literal["max", "min"] = "max"


class RowSpec(_Strict):
    name: str = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)   # dotted-key overrides of the base config
    paper: float | None = None                          # the paper's number for this row, if any
    paper_std: float | None = Field(None, ge=0)         # and its std over seeds, where the paper gives one
    note: str | None = None
    # Why this row may not run yet (e.g. its backbone is not implemented). If its `set` does not resolve, the row
    # stays in the dry-run and the table (with the paper's number and the resolution error) and runs no trials;
    # once it resolves (the backbone landed) it is an ordinary row.
    pending: str | None = Field(None, min_length=1)


class Spec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    title: str = ""
    paper: str | None = None
    metric: MetricSpec = Field(default_factory=MetricSpec)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    base: str | dict[str, Any] = "supervised"
    # a profile is a mapping of config keys, or the name of a preset holding one (shared by several specs)
    profiles: dict[str, dict[str, Any] | str] = Field(default_factory=dict)
    rows: list[RowSpec] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

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
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}: not valid YAML: {where}{problem}") from None


def load_spec(path: str | Path, overrides: list[tuple[str, Any]] = ()) -> Spec:
    """Read and validate a spec file; `overrides` of spec-level keys (seeds=[0,1], metric.name=...) come
    from the command line and are validated after the file itself."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping with name, metric, seeds, base, rows; got {type(raw).__name__}")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: {describe(e, Spec)}") from None
    if not overrides:
        return spec
    try:
        return Spec.model_validate(apply_overrides(copy.deepcopy(raw), overrides))
    except (ValidationError, OverrideError) as e:
        raise SpecError(f"command line: {describe(e, Spec) if isinstance(e, ValidationError) else e}") from None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("trainers.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str, spec_path: Path, key: str = "base") -> dict[str, Any]:
    f = resources.files("trainers.presets") / f"{name}.yaml"
    if not f.is_file():
        raise SpecError(f"{spec_path}: {key}: no preset {name!r}; presets: {', '.join(preset_names())}")
    tree = read_yaml(Path(str(f))) or {}
    if not isinstance(tree, dict):
        raise SpecError(f"{f}: expected a mapping of config keys")
    return tree


def resolve(path: str | Path, profile: str | None = None, overrides: list[str] | None = None) -> Plan:
    """Spec file -> Plan with one validated config per row and one TrialSpec per (row, seed)."""
    path = Path(path)
    overrides = list(overrides or [])
    try:
        pairs = parse_assignments(overrides)
    except OverrideError as e:
        raise SpecError(f"command line: {e}") from None
    spec_pairs = [(k, v) for k, v in pairs if k.split(".")[0] in SPEC_KEYS]
    config_pairs = [(k, v) for k, v in pairs if k.split(".")[0] not in SPEC_KEYS]
    spec = load_spec(path, spec_pairs)
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
            base = _apply_and_validate(base, load_preset(chosen, path, f"profiles.{profile}"), f"{path}: profiles.{profile} (preset {chosen!r})")
        else:
            base = _apply_and_validate(base, chosen, f"{path}: profiles.{profile}")
    base = _apply_and_validate(base, config_pairs, "command line")

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
                                      reason=row.pending, error=str(e).removeprefix(where + ": "), set=row.set))
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


def _apply_and_validate(tree: dict, assignments, where: str) -> dict[str, Any]:
    """Apply overrides to a copy of `tree`, validate it as a Config, return the full dumped config."""
    tree = copy.deepcopy(tree)
    try:
        apply_overrides(tree, assignments)
    except OverrideError as e:
        raise SpecError(f"{where}: {e}") from None
    try:
        return Config.model_validate(tree).model_dump(mode="json")
    except ValidationError as e:
        raise SpecError(f"{where}: {describe(e, Config, tree)}") from None


def describe(err: ValidationError, model: type[BaseModel], tree: dict | None = None) -> str:
    """The first error as 'key.path: what was expected' (+ how many more)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = list(first["loc"])
    msg = first["msg"]
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
            name = sub.get("method", {}).get("name", "supervised") if isinstance(sub, dict) else "supervised"
            node = METHODS.get(name).config if name in METHODS else None
        else:
            field_info = node.model_fields.get(part)
            node = getattr(field_info, "annotation", None)
            if node is not None and not isinstance(node, type):   # Optional[...] etc.
                node = next((a for a in getattr(node, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        sub = sub.get(part) if isinstance(sub, dict) else None
    if isinstance(node, type) and issubclass(node, BaseModel):
        return sorted(node.model_fields)
    return []
