"""A search spec: Optuna (TPE) proposes configs from a search space, Ray Tune runs them (ASHA stops weak ones early),
then the top_k configs and the base config are rerun over the confirm seeds, which gives an ablation table.

One command, one run folder, one MLflow parent run (nested runs tagged phase=search / phase=confirm):
    results/<spec>/<run>/optuna.db                        the Optuna study (optuna.load_study, optuna-dashboard)
    results/<spec>/<run>/search/trials.parquet, epochs.parquet   every search trial; its values as param/<key>
    results/<spec>/<run>/trials.parquet, epochs.parquet, table.*, plots/   the confirm phase (as any ablation)
    results/<spec>/<run>/plots/optuna_history.png, optuna_importances.png
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from orchestrator.spec import SearchParam, SearchPlan, SpecError, config_with
from orchestrator import results
from orchestrator.preflight import plan_cells
from orchestrator.recorder import FAILED, OK, Cell, SweepRecorder
from orchestrator.sweep import Outcome, Session, end_parent, fitting_trials, run_state, session
from orchestrator.trial import run_trial

STUDY_DB = "optuna.db"
RESERVED = ("trial", "storage_path")     # Tune config keys that are not sampled values


def study_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / STUDY_DB).resolve()}"


def optuna_distributions(params: list[SearchParam]) -> dict[str, Any]:
    """The space as Optuna distributions, named by their config paths (so the study reads like the space file)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for p in params:
        if p.kind == "choice":
            out[p.key] = CategoricalDistribution(p.choices)
        elif p.kind == "int":
            out[p.key] = IntDistribution(int(p.low), int(p.high), step=p.step or 1)
        else:
            out[p.key] = FloatDistribution(float(p.low), float(p.high), log=p.kind == "loguniform")
    return out


def sampled_values(tune_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tune_config.items() if k not in RESERVED}


def run_search_trial(tune_config: dict[str, Any]) -> None:
    """Tune trainable of a search trial: the sampled values on the search config, then an ordinary trial."""
    trial = tune_config["trial"]
    config = config_with(trial["config"], sampled_values(tune_config))   # SpecError: the trial fails, with why
    run_trial({"trial": {**trial, "config": config}, "storage_path": tune_config["storage_path"]})


class SearchCells:
    """cell_of for the search phase: trials are numbered as they start ("search 01", ...)."""

    def __init__(self, plan: SearchPlan, known: dict[str, int] | None = None):
        self.plan, self.numbers = plan, dict(known or {})   # trial_id -> number (a resumed search keeps its own)

    def __call__(self, trial) -> Cell:
        n = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        values = sampled_values(trial.config)
        try:
            config = config_with(self.plan.search_config, values)
        except Exception:   # recorded with the base config; the trial itself fails and says why
            config = self.plan.search_config
        extra = {"params_json": json.dumps(values, sort_keys=True), **{f"param/{k}": v for k, v in values.items()}}
        return Cell(f"search {n:02d}", n, self.plan.spec.trial_seed, config, extra)


def rank(records: list[dict[str, Any]], metric: str, mode: str, epochs: int) -> list[dict[str, Any]]:
    """Search trials best first: those that ran every epoch before those ASHA stopped (an early value is not
    comparable with a final one), then by the metric; failed trials and trials without the metric are left out."""
    ok = [r for r in records if r["status"] == OK and isinstance(r.get(metric), float) and math.isfinite(r[metric])]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(ok, key=lambda r: (r["epochs"] < epochs, sign * r[metric]))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _save_optuna_plots(run_dir: Path, study_name: str) -> tuple[list[Path], list[str]]:
    """Optuna's own matplotlib plots of the study: optimisation history and parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    from orchestrator.tables import save_figure

    study = optuna.load_study(study_name=study_name, storage=study_uri(run_dir))
    made, problems = [], []
    for name, plot in (("optuna_history", ovm.plot_optimization_history), ("optuna_importances",
                                                                           ovm.plot_param_importances)):
        path = run_dir / "plots" / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # ExperimentalWarning of the matplotlib backend
                ax = plot(study)
            save_figure(ax.figure, path)
            made.append(path)
        except Exception as e:   # e.g. importances need >= 2 complete trials with varying values
            problems.append(f"{name}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            plt.close("all")
    return made, problems


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
            ranked = rank(search.ended(), spec.metric.name, spec.metric.mode, plan.epochs)
            notes = _log_search(s, plan, search.ended(), ranked)
            picks = [[f"top-{i + 1}: {r['row']}", json.loads(r["params_json"])]
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
    """ASHA over epochs (max_t = the epochs of a search trial), or None for `scheduler: none`."""
    from ray.tune.schedulers import ASHAScheduler

    spec, sched = plan.spec, plan.spec.scheduler
    if sched.kind != "asha":
        return None
    try:
        return ASHAScheduler(time_attr="training_iteration", metric=spec.metric.name, mode=spec.metric.mode,
                             max_t=plan.epochs, grace_period=sched.grace_period,
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

    spec = plan.spec
    try:
        return OptunaSearch(space=optuna_distributions(plan.params), metric=spec.metric.name, mode=spec.metric.mode,
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


def _log_search(s: Session, plan: SearchPlan, records: list[dict[str, Any]], ranked: list[dict[str, Any]]) -> list[str]:
    """Best params, the search counts and Optuna's plots on the parent run; returns the table's notes."""
    spec, metric = plan.spec, plan.spec.metric.name
    early = sum(bool(r.get("stopped_early")) for r in records)
    failed = sum(r["status"] == FAILED for r in records)
    notes = [f"search: {len(records)} trials ({early} stopped early by {spec.scheduler.kind.upper()}, {failed} failed); "
             f"Optuna study {spec.name!r} in {STUDY_DB}"]
    for i, r in enumerate(ranked[:spec.confirm.top_k]):
        values = json.loads(r["params_json"])
        notes.append(f"top-{i + 1}: {r['row']} ({metric} {r[metric]:.2f} in the search): "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    client, parent = s.tracker.client, s.parent_run_id
    if ranked:
        best = ranked[0]
        s.tracker.log_params(parent, {f"best.{k}": v for k, v in json.loads(best["params_json"]).items()})
        client.set_tag(parent, "best_search_trial", best["row"])
        client.log_metric(parent, "search/best", float(best[metric]))
    client.log_metric(parent, "search/trials", float(len(records)))
    client.log_metric(parent, "search/stopped_early", float(early))
    plots, problems = _save_optuna_plots(s.run_dir, spec.name)
    for p in plots:
        client.log_artifact(parent, str(p), artifact_path="plots")
    if problems:
        print("optuna plots not made: " + "; ".join(problems), flush=True)
    return notes
