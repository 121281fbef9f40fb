"""A search spec: Optuna (TPE) proposes configs from a search space, Ray Tune runs them (ASHA stops weak ones early),
then the top_k configs and the base config are rerun over the confirm seeds, which gives an ablation table.

One command, one run folder, one MLflow parent run (nested runs tagged phase=search / phase=confirm):
    results/<spec>/<run>/optuna.db                        the Optuna study (optuna.load_study, optuna-dashboard)
    results/<spec>/<run>/search/trials.parquet, epochs.parquet   every search trial; its values as param/<key>
    results/<spec>/<run>/trials.parquet, epochs.parquet, table.*, plots/   the confirm phase (as any ablation)
    results/<spec>/<run>/importances.json                  fANOVA parameter importances per objective
    results/<spec>/<run>/plots/optuna_history.png, optuna_importances.png, optuna_slice.png, optuna_contour.png
                                                             (+ optuna_pareto.png for a multi-objective search)
The space is define-by-run (orchestrator/study.py): a trial samples a parameter only when its `when:` holds.
With `objectives:` the study is multi-objective and the Pareto configs are confirmed. ASHA waits for each trial's RL
phase (orchestrator/rungs.py).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from orchestrator.spec import SearchPlan, SpecError, config_with
from orchestrator.study import SAMPLED, STUDY_DB, SpaceSampler, optuna_distributions, study_uri  # noqa: F401
from orchestrator import results
from orchestrator.preflight import plan_cells
from orchestrator.recorder import FAILED, OK, Cell, SweepRecorder
from orchestrator.sweep import Outcome, Session, end_parent, fitting_trials, run_state, session
from orchestrator.trial import run_trial

RESERVED = ("trial", "storage_path")     # Tune config keys that are not sampled values


def sampled_values(tune_config: dict[str, Any]) -> dict[str, Any]:
    """{config path: value} of a search trial: the parameters its conditions let it use."""
    if SAMPLED in tune_config:
        return dict(tune_config[SAMPLED])
    return {k: v for k, v in tune_config.items() if k not in RESERVED}   # a run folder from before define-by-run


def run_search_trial(tune_config: dict[str, Any]) -> None:
    """Tune trainable of a search trial: the sampled values on the search config, then an ordinary trial."""
    trial = tune_config["trial"]
    config = search_trial_config(tune_config)   # SpecError: the trial fails, with why
    run_trial({"trial": {**trial, "config": config}, "storage_path": tune_config["storage_path"]})


def search_trial_config(tune_config: dict[str, Any]) -> dict[str, Any]:
    """The full config of a search trial: its sampled values on the search config (SpecError if they do not fit)."""
    return config_with(tune_config["trial"]["config"], sampled_values(tune_config))


class SearchCells:
    """cell_of for the search phase: trials are numbered as they start ("search 01", ...)."""

    def __init__(self, plan: SearchPlan, known: dict[str, int] | None = None):
        self.plan, self.numbers = plan, dict(known or {})   # trial_id -> number (a resumed search keeps its own)

    def __call__(self, trial) -> Cell:
        n = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        values = sampled_values(trial.config)
        extra = {"params_json": json.dumps(values, sort_keys=True), **{f"param/{k}": v for k, v in values.items()}}
        try:
            config = config_with(self.plan.search_config, values)
        except SpecError as e:   # the trial itself fails with this error; its row has no config (it trained none)
            config, extra["error"] = None, f"SpecError: {str(e).strip().splitlines()[0]}"
        return Cell(f"search {n:02d}", n, self.plan.spec.trial_seed, config, extra)


def rank(records: list[dict[str, Any]], metric: str, mode: str, epochs: int) -> list[dict[str, Any]]:
    """Search trials best first: those that ran every epoch before those ASHA stopped (an early value is not
    comparable with a final one), then by the metric; failed trials and trials without the metric are left out."""
    ok = [r for r in records if r["status"] == OK and isinstance(r.get(metric), float) and math.isfinite(r[metric])]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(ok, key=lambda r: (r["epochs"] < epochs, sign * r[metric]))


def objectives(spec) -> list[tuple[str, str]]:
    """(metric, mode) of each objective of the study: the spec's objectives, or its metric."""
    return [(o.name, o.mode) for o in spec.objectives] if spec.objectives else [(spec.metric.name, spec.metric.mode)]


def pareto(records: list[dict[str, Any]], goals: list[tuple[str, str]], epochs: int) -> list[dict[str, Any]]:
    """The Pareto front of the search trials on every objective (among those that ran every epoch, if any did: an
    early value is not comparable with a final one), ordered by the first objective, best first."""
    ok = [r for r in records if r["status"] == OK
          and all(isinstance(r.get(m), float) and math.isfinite(r[m]) for m, _ in goals)]
    pool = [r for r in ok if r["epochs"] >= epochs] or ok
    cost = {id(r): [(-1.0 if mode == "max" else 1.0) * r[m] for m, mode in goals] for r in pool}   # all minimised

    def dominated(r) -> bool:
        a = cost[id(r)]
        return any(all(x <= y for x, y in zip(cost[id(o)], a)) and cost[id(o)] != a for o in pool)

    return sorted((r for r in pool if not dominated(r)), key=lambda r: cost[id(r)])


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_search(plan: SearchPlan, *, results_root: Path, address: str | None = None,
               max_concurrent: int | None = None, verbose: int = 1, resume: Path | None = None,
               reuse: bool = True, pending_timeout: float | None | str = "default") -> Outcome:
    """Search, then confirm. `resume`: an unfinished run folder of this plan; a finished search phase is not
    rerun, an interrupted one continues through Tune's restore (with the searcher's state and the same study)."""
    spec = plan.spec
    slots = max_concurrent or fitting_trials([plan.search_config] * spec.num_samples, os.cpu_count() or 1)
    profile = plan.profile or "embedded"
    with session(spec.name, plan.resolved(), results_root=results_root, address=address, driver_slots=slots,
                 verbose=verbose, tags={"spec": str(plan.path), "profile": profile, "kind": "search"},
                 params={"spec": spec.name, "profile": profile, "space": str(plan.space_path),
                         "num_samples": spec.num_samples, "sampler": spec.sampler.model_dump(),
                         "scheduler": spec.scheduler.model_dump(), "confirm": spec.confirm.model_dump(),
                         "overrides": plan.overrides, "metric": spec.metric.name},
                 state={**run_state(plan, max_concurrent), "kind": "search"}, resume=resume,
                 cells=plan_cells(plan), pending_timeout=pending_timeout) as s:
        state = results.read_state(s.run_dir)
        search = _search_phase(s, plan, max_concurrent) if state.get("phase") != "confirm" else None
        if search is not None and search.interrupted:
            end_parent(s, [], interrupted=True)
            return Outcome(run_dir=s.run_dir, summary=None, markdown="the search was interrupted",
                           failed=[], tracking_uri=s.tracker.uri, parent_run_id=s.parent_run_id,
                           trials=spec.num_samples, interrupted=True, stalled=s.stalled)
        if search is not None:
            if spec.objectives:
                ranked, label = pareto(search.ended(), objectives(spec), plan.epochs), "pareto"
            else:
                ranked, label = rank(search.ended(), spec.metric.name, spec.metric.mode, plan.epochs), "top"
            notes = _log_search(s, plan, search.ended(), ranked, label)
            picks = [[f"{label}-{i + 1}: {r['row']}", json.loads(r["params_json"])]
                     for i, r in enumerate(ranked[:spec.confirm.top_k])]
            search_failed = [r for r in search.ended() if r["status"] != OK]
            state = results.update_state(s.run_dir, phase="confirm", picks=picks, notes=notes,
                                         search_failed=search_failed)
        if not state["picks"]:
            failed = state["search_failed"] or [{"row": "search", "seed": spec.trial_seed,
                                                  "error": f"no search trial reported {spec.metric.name}"}]
            end_parent(s, failed)
            return Outcome(run_dir=s.run_dir, summary=None, markdown="no search trial finished; nothing to confirm",
                           failed=failed, tracking_uri=s.tracker.uri, parent_run_id=s.parent_run_id,
                           trials=spec.num_samples, tracking_offline=s.tracker.offline)
        confirm = plan.confirm_plan([(name, values) for name, values in state["picks"]])
        grid = s.run_grid(confirm, max_concurrent, tags={"phase": "confirm"}, name="confirm", notes=state["notes"],
                          reuse=reuse)
        interrupted = grid.interrupted > 0
        summary, md = s.finish_table(grid)
        failed = state["search_failed"] + [r for r in grid.trials.values() if r["status"] != OK]
        end_parent(s, failed, interrupted=interrupted)
        return Outcome(run_dir=s.run_dir, summary=summary, markdown=md, failed=failed, tracking_uri=s.tracker.uri,
                       parent_run_id=s.parent_run_id, trials=spec.num_samples + len(confirm.trials),
                       interrupted=interrupted, tracking_offline=s.tracker.offline, stalled=s.stalled)


def _rejected(where: str, e: Exception) -> SpecError:
    """A setting Ray or Optuna rejected in a constructor, as the one-line error with its key path."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return SpecError(f"{where}: {type(e).__name__}{': ' + text if text else ''}")


def make_scheduler(plan: SearchPlan):
    """ASHA over epochs (max_t = the epochs of a search trial) that judges a trial only once its RL term has been on
    for the grace period (orchestrator/rungs.py), or None for `scheduler: none`."""
    from orchestrator.rungs import MethodAwareASHA

    spec, sched = plan.spec, plan.spec.scheduler
    if sched.kind != "asha":
        return None
    try:
        return MethodAwareASHA(config_of=search_trial_config, time_attr="training_iteration", metric=spec.metric.name,
                               mode=spec.metric.mode, max_t=plan.epochs, grace_period=sched.grace_period,
                               reduction_factor=sched.reduction_factor)
    except (AssertionError, ValueError, TypeError) as e:      # Ray asserts its settings (grace_period <= max_t)
        raise _rejected(f"{plan.path}: scheduler (grace_period {sched.grace_period}, reduction_factor "
                        f"{sched.reduction_factor:g}, max_t = schedule.epochs {plan.epochs})", e) from None


def make_sampler(plan: SearchPlan):
    from optuna.samplers import TPESampler

    sampler = plan.spec.sampler
    try:
        return TPESampler(seed=sampler.seed, n_startup_trials=sampler.n_startup_trials)
    except (ValueError, TypeError) as e:
        raise _rejected(f"{plan.path}: sampler", e) from None


def make_searcher(plan: SearchPlan, storage=None):
    """Tune's OptunaSearch over the space (a study in `storage`, or in memory for the plan check)."""
    from ray.tune.search.optuna import OptunaSearch

    from trainers.config import flatten

    spec, goals = plan.spec, objectives(plan.spec)
    metric, mode = ([m for m, _ in goals], [d for _, d in goals]) if spec.objectives else goals[0]
    try:
        return OptunaSearch(space=SpaceSampler(plan.params, flatten(plan.search_config)), metric=metric, mode=mode,
                            study_name=spec.name, sampler=make_sampler(plan), storage=storage)
    except (AssertionError, ValueError, TypeError) as e:
        raise _rejected(f"{plan.path}: search ({plan.space_path})", e) from None


def _search_phase(s: Session, plan: SearchPlan, max_concurrent: int | None) -> SweepRecorder:
    """The search trials through Tune with OptunaSearch (+ ASHA); search/trials.parquet etc.; the recorder."""
    from optuna.storages import RDBStorage

    spec, sched = plan.spec, plan.spec.scheduler
    metric, mode = spec.metric.name, spec.metric.mode
    concurrent = max_concurrent or fitting_trials([plan.search_config] * spec.num_samples, s.cpus)
    results.update_state(s.run_dir, phase="search")
    searcher = make_searcher(plan, storage=RDBStorage(study_uri(s.run_dir)))
    scheduler = make_scheduler(plan)
    meta = {"spec": spec.name, "title": spec.title, "paper": spec.paper, "metric": metric, "mode": mode,
            "seeds": [spec.trial_seed], "rows": [], "sweep_id": s.sweep_id, "phase": "search"}
    recorder = SweepRecorder(meta, s.run_dir / "search", s.tracker, s.sweep_id, s.git_sha, total=spec.num_samples,
                             tags={"phase": "search"}, progress=s.verbose > 0)
    recorder.preload()
    recorder.cell_of = SearchCells(plan, {tid: r["row_index"] for tid, r in recorder.trials.items()})
    print(f"{spec.name}: search, {spec.num_samples} trials over {len(plan.params)} parameters "
          f"({spec.sampler.kind.upper()} seed {spec.sampler.seed}, scheduler {sched.kind}), {concurrent} at a time "
          f"-> {s.run_dir}", flush=True)
    s.tune(run_search_trial, {"trial": {"row": "search", "row_index": 0, "seed": spec.trial_seed,
                                        "config": plan.search_config}},
           recorder, name="search", max_concurrent=concurrent, search_alg=searcher, scheduler=scheduler,
           num_samples=spec.num_samples)
    recorder.interrupted = recorder.finish() + max(0, spec.num_samples - len(recorder.trials))
    return recorder


def _log_search(s: Session, plan: SearchPlan, records: list[dict[str, Any]], ranked: list[dict[str, Any]],
                label: str) -> list[str]:
    """Best params, the search counts, each search run's used parameters, Optuna's parameter importances and plots
    on the parent run and in the run folder; returns the table's notes."""
    from orchestrator import study as studies

    spec, metric = plan.spec, plan.spec.metric.name
    goals = [m for m, _ in objectives(spec)]
    early = sum(bool(r.get("stopped_early")) for r in records)
    failed = sum(r["status"] == FAILED for r in records)
    notes = [f"search: {len(records)} trials ({early} stopped early by {spec.scheduler.kind.upper()}, {failed} failed); "
             f"Optuna study {spec.name!r} in {STUDY_DB}"]
    if spec.objectives:
        notes.append(f"Pareto front on {', '.join(f'{m} {d}' for m, d in objectives(spec))}: {len(ranked)} configs"
                     + (f", the first {spec.confirm.top_k} by {goals[0]} confirmed" if len(ranked) > spec.confirm.top_k
                        else ", all confirmed"))
    for i, r in enumerate(ranked[:spec.confirm.top_k]):
        values = json.loads(r["params_json"])
        scores = ", ".join(f"{m} {r[m]:.4g}" for m in goals)
        notes.append(f"{label}-{i + 1}: {r['row']} ({scores} in the search): "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    client, parent = s.tracker.client, s.parent_run_id
    for r in records:      # each search run: the parameters it used, and only those
        if r.get("mlflow_run_id") and r.get("params_json"):
            s.tracker.log_params(r["mlflow_run_id"], {f"search.{k}": v for k, v in json.loads(r["params_json"]).items()})
    if ranked:
        best = ranked[0]
        s.tracker.log_params(parent, {f"best.{k}": v for k, v in json.loads(best["params_json"]).items()})
        client.set_tag(parent, "best_search_trial", best["row"])
        client.log_metric(parent, "search/best", float(best[metric]))
    client.log_metric(parent, "search/trials", float(len(records)))
    client.log_metric(parent, "search/stopped_early", float(early))

    study = studies.load(s.run_dir, spec.name)
    scores = studies.importances(study, goals)
    path = studies.save_importances(s.run_dir, scores)
    client.log_artifact(parent, str(path))
    for goal, by_param in scores.items():
        for name, value in by_param.items():
            client.log_metric(parent, f"importance/{goal}/{name}", value)
        if by_param:
            notes.append(f"importance (fANOVA) for {goal}: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in by_param.items()))
    plots, problems = studies.save_plots(s.run_dir, study, goals, scores)
    for p in plots:
        client.log_artifact(parent, str(p), artifact_path="plots")
    if problems:
        print("optuna plots not made: " + "; ".join(problems), flush=True)
    notes.append(f"browse the study: optuna-dashboard {studies.study_uri(s.run_dir)}")
    return notes
