"""Search specs: an Optuna search over a space (search_spaces/*.yaml), then a confirmation ablation of the best
configs over seeds. Split from orchestrator.spec (which re-exports these names), whose ablation Spec, rows and
plan_rows a confirmation reuses."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.space import SearchParam, find_space, load_space
from orchestrator.spec import (INT64_MAX, FiniteFloat, MetricSpec, Plan, RowSpec, Seed, Spec, _distinct_seeds,
                               _SpecBase, _Strict, plan_rows)
from orchestrator.validation import _apply_and_validate


class ObjectiveSpec(_Strict):
    """One objective of a multi-objective search: a metric every epoch reports, and its direction."""
    name: str = Field(pattern=r"^(val|train|time)/\S+$")
    mode: Literal["max", "min"]


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
    # two or more: a multi-objective study (Optuna's TPE on several objectives); the Pareto configs are confirmed.
    # `metric` (default: the first objective) is the confirm table's.
    objectives: list[ObjectiveSpec] | None = Field(None, min_length=2)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v   # `scheduler: asha` / `scheduler: none`

    @field_validator("objectives", mode="before")
    @classmethod
    def _objective_shorthand(cls, v: Any) -> Any:       # `objectives: [val/mIoU max, time/epoch_s min]`
        if not isinstance(v, list):
            return v
        return [dict(zip(("name", "mode"), o.split(maxsplit=1))) if isinstance(o, str) else o for o in v]

    @model_validator(mode="after")
    def _objectives_fit(self):
        if self.objectives is None:
            return self
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError("objectives: names must be distinct")
        if "metric" not in self.model_fields_set:
            self.metric = MetricSpec(name=names[0], mode=self.objectives[0].mode)
        elif self.metric.name not in names:
            raise ValueError(f"metric: {self.metric.name} is not one of the objectives ({', '.join(names)})")
        if "scheduler" not in self.model_fields_set:
            self.scheduler = SchedulerSpec(kind="none")
        elif self.scheduler.kind != "none":
            raise ValueError("scheduler: ASHA stops trials on one metric, which would prune the cheap end of a "
                             "multi-objective front; expected scheduler: none with objectives")
        return self


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
    space_path = find_space(spec.search, path)
    search_config = {**copy.deepcopy(base), "seed": spec.trial_seed}
    if spec.metric.name.startswith("val/"):   # the searcher and ASHA read the metric at every epoch
        search_config["schedule"]["eval_every"] = 1
    params = load_space(space_path, search_config)
    return SearchPlan(spec=spec, path=path, space_path=space_path, params=params, profile=profile,
                      overrides=overrides, base_config=base, search_config=search_config)


