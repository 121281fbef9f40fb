"""Table columns beyond the spec's metric, and the paper's numbers per column and per profile.

A spec may show several metrics of each trial side by side (paper 002's Table 3: mIoU of the old classes, of the new
ones, of all; Table 4: one column per evaluation domain):

    metric: {name: val/mIoU, mode: max}          # the metric Δ, p, the CIs and the bar chart are about
    columns:
      - {name: "0-4", metric: val/mIoU_old}
      - {name: "5-7", metric: val/mIoU_new}
      - {name: all, metric: val/mIoU}
      - {name: "Dark Zurich val", metric: val/dark_zurich/mIoU, profiles: [paper]}   # only in these profiles

`profiles` limits a column to the runs of the named profiles (`default`: the embedded run, no --profile); a
column whose metric a profile's trials never report would only ever show a dash.

A row's `paper:` is a number (the spec metric's), or a mapping keyed by column name ({"0-4": 76.2, all: 69.9}), or a
mapping keyed by profile name (`default` for the embedded run) whose values are numbers or column mappings (Table 2:
one row, a number per dataset profile: {default: 78.5, paper: 78.5, paper_ade20k: 44.1}). A row's `compare_to:`
names the row its Δ and p are taken against (default: the first row); a row some other row names is a baseline
itself, so one table can hold several groups (fine-tuning / PLOP / PLOP + RL for each continual task).
"""
from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PROFILE = "default"     # the profile key of a run without --profile (the embedded default)

# a row's paper value: a number, {column: number}, or {profile: number | {column: number}}
PaperValue = Union[float, dict[str, Union[float, dict[str, float]]], None]


class ColumnSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    metric: str = Field(pattern=r"^(val|train)/\S+$")     # a key the trials report
    profiles: list[str] | None = Field(None, min_length=1)   # None: every profile


def check_columns(columns: list[ColumnSpec] | None, profiles: list[str]) -> None:
    """ValueError (the spec validator's) for repeated column names, or a column's profile that does not exist."""
    if not columns:
        return
    names = [c.name for c in columns]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"columns: names must be distinct; repeated: {', '.join(repeated)}")
    known = {DEFAULT_PROFILE, *profiles}
    for i, c in enumerate(columns):
        unknown = [p for p in c.profiles or [] if p not in known]
        if unknown:
            raise ValueError(f"columns[{i}] ({c.name}).profiles: no profile {unknown[0]!r} (expected one of: "
                             f"{', '.join(sorted(known))})")


def check_paper(where: str, paper: PaperValue, columns: list[ColumnSpec] | None, profiles: list[str]) -> None:
    """ValueError for a paper mapping whose keys are neither all columns nor all profiles."""
    if not isinstance(paper, dict) or not paper:      # {}: no number, like null
        return
    column_names = {c.name for c in columns or []}
    profile_names = {DEFAULT_PROFILE, *profiles}
    keys = set(paper)
    if keys and keys <= column_names:
        if any(isinstance(v, dict) for v in paper.values()):
            raise ValueError(f"{where}.paper: a value per column is a number, not a mapping")
        return
    if keys and keys <= profile_names:
        for profile, value in paper.items():
            if isinstance(value, dict):
                extra = sorted(set(value) - column_names)
                if extra:
                    raise ValueError(f"{where}.paper.{profile}: no column {extra[0]!r} (columns: "
                                     f"{', '.join(sorted(column_names)) or 'none defined'})")
        return
    stray = sorted(keys - column_names - profile_names)
    raise ValueError(f"{where}.paper: key {stray[0] if stray else sorted(keys)[0]!r} is neither a column nor a "
                     f"profile; expected a number, {{column: number}} (columns: {', '.join(sorted(column_names)) or 'none'}) "
                     f"or {{profile: number}} (profiles: {', '.join(sorted(profile_names))}), not a mix")


def active_columns(columns: list[ColumnSpec] | None, profile: str | None) -> list[dict[str, str]]:
    """The columns a run of `profile` (None: the embedded default) shows, as {name, metric}."""
    key = profile or DEFAULT_PROFILE
    return [{"name": c.name, "metric": c.metric} for c in columns or [] if c.profiles is None or key in c.profiles]


def paper_numbers(paper: PaperValue, profile: str | None, columns: list[dict[str, str]],
                  metric: str) -> tuple[float | None, dict[str, float]]:
    """(the spec metric's paper number, {column name: paper number}) of one row in a run of `profile`."""
    value: Any = paper
    if isinstance(paper, dict) and not (set(paper) & {c["name"] for c in columns}):   # keyed by profile
        value = paper.get(profile or DEFAULT_PROFILE)
    if value is None:
        return None, {}
    if isinstance(value, dict):
        per_column = {name: float(v) for name, v in value.items() if any(c["name"] == name for c in columns)}
        primary = next((per_column[c["name"]] for c in columns if c["metric"] == metric and c["name"] in per_column),
                       None)
        return primary, per_column
    per_column = {c["name"]: float(value) for c in columns if c["metric"] == metric}
    return float(value), per_column


def reference_indices(rows: list[dict[str, Any]]) -> list[int]:
    """Per table row, the position of the row it is compared with (itself for a reference row): its compare_to;
    else itself if another row names it in compare_to (the baseline of a group: fine-tuning on task B is not compared
    with fine-tuning on task A); else the first row."""
    position = {r["name"]: i for i, r in enumerate(rows)}
    named = {r.get("compare_to") for r in rows} - {None}
    return [position.get(r["compare_to"], 0) if r.get("compare_to") else i if r["name"] in named else 0
            for i, r in enumerate(rows)]
