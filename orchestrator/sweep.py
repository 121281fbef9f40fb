"""Run a Plan: rows x seeds -> Ray Tune trials (each a TorchTrainer) -> MLflow + Parquet + table.

The Tune callback `SweepRecorder` runs in this (driver) process: it is the one MLflow writer and
writes trials.parquet / epochs.parquet as trials end, so a killed sweep keeps what finished.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator import results, tables, tracking
from orchestrator.spec import Plan
from orchestrator.trial import run_trial, trial_path

OK, FAILED = "ok", "failed"
METRIC_PREFIXES = ("train/", "val/", "time/")
DRIVER_RESOURCE = "TRAIN_DRIVER"


@dataclass
class Outcome:
    run_dir: Path
    summary: Any            # pandas DataFrame (tables.summarize)
    markdown: str
    failed: list[dict[str, Any]]
    tracking_uri: str
    parent_run_id: str


def trial_resources(config: dict[str, Any], local_driver_resource: bool) -> dict[str, float]:
    """What the Tune trial itself holds. A TorchTrainer trial's driver only waits for its workers,
    which ask for their own CPUs; on a local Ray it holds a custom TRAIN_DRIVER unit instead of a
    CPU so two trials fit on 2 cores (DESIGN.md). An in-process trial trains, so it holds the CPUs."""
    res = config["resources"]
    if trial_path(config) == "in_process":
        out = {"cpu": res["cpus_per_worker"]}
        if res["gpus_per_worker"]:
            out["gpu"] = res["gpus_per_worker"]
        return out
    return {"cpu": 0, DRIVER_RESOURCE: 1} if local_driver_resource else {"cpu": 0.5}


def default_max_concurrent(plan: Plan, cpus: int) -> int:
    per_trial = max(max(t.config["resources"]["workers"], 1) * t.config["resources"]["cpus_per_worker"]
                    for t in plan.trials)
    return max(1, min(len(plan.trials), int(cpus // per_trial)))


def error_line(text: str | None) -> str:
    """The root cause of a Tune error trace, in one line ('TrainingDiverged: training loss became nan ...')."""
    if not text:
        return "unknown error (no trace recorded)"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    pattern = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Diverged|Interrupt|Exit))(?:\(.*?\))?: (.+)$")
    found = [m for m in map(pattern.match, lines) if m]
    # Ray wraps the worker's exception several times; the innermost (last) one is the cause
    inner = [m for m in found if m.group(1) not in ("TrainingFailedError", "RayTaskError", "TuneError")]
    m = (inner or found or [None])[-1]
    return f"{m.group(1)}: {m.group(2)}" if m else lines[-1][:500]


def _error_text(trial) -> str | None:
    """Tune writes the trace to the trial's local (staging) folder first; storage gets it on the next sync."""
    path = trial.error_file
    if path and os.path.isfile(path):
        with open(path, errors="replace") as f:
            return f.read()
    return trial.get_error()


def _record(trial_id: str | None, row: str, row_index: int, seed: int, config: dict[str, Any], *, status: str,
            error: str | None = None, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """A trials.parquet row before any epoch arrived (metrics are added as they are reported)."""
    return {"trial_id": trial_id, "row": row, "row_index": row_index, "seed": seed, "status": status, "error": error,
            "trial_path": trial_path(config), "mlflow_run_id": mlflow_run_id, "epochs": 0, "wall_s": None,
            "config_json": json.dumps(config, sort_keys=True)}


class SweepRecorder:
    """A ray.tune.Callback: per-trial MLflow runs and Parquet rows, built from what Tune sees."""

    def __init__(self, plan: Plan, run_dir: Path, tracker: tracking.Tracker, sweep_id: str, git_sha: str | None,
                 progress: bool = True):
        self.plan, self.run_dir, self.tracker, self.progress = plan, run_dir, tracker, progress
        self.sweep_id, self.git_sha = sweep_id, git_sha
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: list[dict[str, Any]] = []
        self.started: dict[str, float] = {}
        self.meta = {
            "spec": plan.spec.name, "title": plan.spec.title, "paper": plan.spec.paper,
            "metric": plan.spec.metric.name, "mode": plan.spec.metric.mode, "seeds": plan.spec.seeds,
            "rows": plan.table_rows(), "sweep_id": sweep_id,
        }

    # --- Tune callback interface (ray.tune.Callback duck type; see as_tune_callback) ---
    def on_trial_start(self, iteration, trials, trial, **info):
        payload = trial.config["trial"]
        cfg = payload["config"]
        run_id = self.tracker.start_trial(
            run_name=f"{payload['row']} | seed {payload['seed']}", config=cfg,
            tags={"row": payload["row"], "row_index": str(payload["row_index"]), "seed": str(payload["seed"]),
                  "sweep_id": self.sweep_id, "git_sha": self.git_sha or "unknown", "trial_id": trial.trial_id,
                  "trial_path": trial_path(cfg)})
        self.started[trial.trial_id] = time.time()
        self.trials[trial.trial_id] = _record(trial.trial_id, payload["row"], payload["row_index"], payload["seed"],
                                              cfg, status="running", mlflow_run_id=run_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rec = self.trials[trial.trial_id]
        metrics = {k: float(v) for k, v in result.items()
                   if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self.epochs.append({"trial_id": trial.trial_id, "row": rec["row"], "row_index": rec["row_index"],
                            "seed": rec["seed"], "epoch": epoch, **metrics})
        rec["epochs"] = epoch
        rec.update(metrics)   # the trial's final metrics are its last report's
        self.tracker.log_metrics(rec["mlflow_run_id"], metrics, step=epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        rec = self.trials[trial.trial_id]
        if rec["epochs"] == 0:
            self._end(trial, FAILED, "the trial ended without reporting any epoch")
        else:
            self._end(trial, OK, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, FAILED, error_line(_error_text(trial)))

    def _end(self, trial, status: str, error: str | None) -> None:
        rec = self.trials[trial.trial_id]
        rec.update(status=status, error=error, wall_s=time.time() - self.started[trial.trial_id])
        self.tracker.end_run(rec["mlflow_run_id"], ok=status == OK, error=error)
        self.flush()
        if self.progress:
            done = sum(r["status"] in (OK, FAILED) for r in self.trials.values())
            metric = self.plan.spec.metric.name
            what = f"{metric}={rec[metric]:.2f}" if status == OK and metric in rec else (error or "")
            print(f"[{done}/{len(self.plan.trials)}] {rec['row']} | seed {rec['seed']}: {status} "
                  f"{what} ({rec['wall_s']:.1f}s, {rec['epochs']} epochs)", flush=True)

    def finish(self) -> None:
        """After Tune returns: cells that never ran or never ended (an interrupted sweep) count as failed."""
        seen = {(r["row"], r["seed"]) for r in self.trials.values()}
        for rec in self.trials.values():
            if rec["status"] not in (OK, FAILED):
                rec.update(status=FAILED, error="interrupted: the trial did not end")
                self.tracker.end_run(rec["mlflow_run_id"], ok=False, error=rec["error"])
        for t in self.plan.trials:
            if (t.row, t.seed) not in seen:
                self.trials[f"not-run-{t.row_index}-{t.seed}"] = _record(
                    None, t.row, t.row_index, t.seed, t.config, status=FAILED,
                    error="not run: the sweep stopped before this trial started")
        self.flush()

    # --- outputs ---
    def flush(self) -> None:
        """Rewrite trials.parquet and epochs.parquet (atomically) with every trial that has ended."""
        ended = [r for r in self.trials.values() if r["status"] in (OK, FAILED)]
        ended_ids = {r["trial_id"] for r in ended}
        results.write_parquet(self.run_dir / "trials.parquet", ended, results.TRIAL_COLUMNS, self.meta)
        results.write_parquet(self.run_dir / "epochs.parquet",
                              [e for e in self.epochs if e["trial_id"] in ended_ids], results.EPOCH_COLUMNS, self.meta)


def _trial_name(trial) -> str:
    """Tune's name for a trial (dashboard, ray/ folder): row and seed, filesystem-safe."""
    t = trial.config["trial"]
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', t['row']).strip('_')}-seed{t['seed']}-{trial.trial_id}"


def as_tune_callback(recorder: SweepRecorder):
    import ray.tune

    class _Callback(ray.tune.Callback):
        def on_trial_start(self, *a, **k):
            recorder.on_trial_start(*a, **k)

        def on_trial_result(self, *a, **k):
            recorder.on_trial_result(*a, **k)

        def on_trial_complete(self, *a, **k):
            recorder.on_trial_complete(*a, **k)

        def on_trial_error(self, *a, **k):
            recorder.on_trial_error(*a, **k)

    return _Callback()


def render_tables(run_dir: Path, trials, epochs, meta: dict[str, Any]) -> tuple[Any, str, list[Path], list[Path]]:
    """table.md/.csv/.tex and plots/*.png from Parquet data; returns (summary, markdown, files, plots)."""
    metric, rows = meta["metric"], meta["rows"]
    summary = tables.summarize(trials, metric, rows, mode=meta.get("mode", "max"))
    title = meta.get("title") or meta.get("spec")
    md = tables.render_markdown(summary, metric, title=title)
    files = [run_dir / "table.md", run_dir / "table.csv", run_dir / "table.tex"]
    results.write_atomic(files[0], md + "\n")
    results.write_atomic(files[1], tables.render_csv(summary))
    results.write_atomic(files[2], tables.render_latex(summary, metric, caption=title) + "\n")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")
    plots = [run_dir / "plots" / f"curves_{slug}.png", run_dir / "plots" / f"bars_{slug}.png"]
    tables.plot_curves(epochs, metric, rows, plots[0])
    tables.plot_bars(summary, metric, plots[1])
    return summary, md, files, plots


def run_sweep(plan: Plan, *, results_root: Path, address: str | None = None, max_concurrent: int | None = None,
              verbose: int = 1) -> Outcome:
    import ray
    import ray.tune

    # each ray.train.report waits up to this long for the controller's poll (default 2 s); must be
    # in the environment before ray.init so Ray's processes inherit it
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.pop("MLFLOW_RUN_ID", None)
    run_dir = results.new_run_dir(results_root, plan.spec.name)
    sweep_id = run_dir.name
    results.write_atomic(run_dir / "spec.resolved.yaml", yaml.safe_dump(plan.resolved(), sort_keys=False))

    started_ray = not ray.is_initialized()
    if started_ray:
        if address:
            ray.init(address=address, log_to_driver=verbose > 2)
        else:
            cpus = os.cpu_count() or 1
            ray.init(resources={DRIVER_RESOURCE: max_concurrent or default_max_concurrent(plan, cpus)},
                     log_to_driver=verbose > 2)
    try:
        cluster = ray.cluster_resources()
        local_driver = cluster.get(DRIVER_RESOURCE, 0) >= 1
        concurrent = max_concurrent or default_max_concurrent(plan, int(cluster.get("CPU", 1)))
        git = results.git_info()
        results.write_atomic(run_dir / "env.json", json.dumps(results.env_info(
            {"ray_cluster_resources": cluster, "ray_address": address or "local", "max_concurrent": concurrent}),
            indent=2, default=str))

        uri = tracking.default_tracking_uri(results_root)
        tracker = tracking.Tracker(uri, plan.spec.name, results_root / "mlartifacts")
        parent = tracker.start_sweep(
            run_name=sweep_id,
            tags={"sweep_id": sweep_id, "spec": str(plan.path), "git_sha": git["git_sha"] or "unknown",
                  "profile": plan.profile or "embedded", "results_dir": str(run_dir.resolve())},
            params={"spec": plan.spec.name, "profile": plan.profile or "embedded", "seeds": plan.spec.seeds,
                    "rows": [r.name for r in plan.rows], "overrides": plan.overrides, "metric": plan.spec.metric.name,
                    "trials": len(plan.trials), "max_concurrent": concurrent})
        recorder = SweepRecorder(plan, run_dir, tracker, sweep_id, git["git_sha"], progress=verbose > 0)
        print(f"{plan.spec.name}: {len(plan.trials)} trials ({len(plan.rows)} rows x {len(plan.spec.seeds)} seeds), "
              f"{concurrent} at a time -> {run_dir}", flush=True)
        storage = str((run_dir / "ray").resolve())
        payloads = [{"row": t.row, "row_index": t.row_index, "seed": t.seed, "config": t.config} for t in plan.trials]
        tuner = ray.tune.Tuner(
            ray.tune.with_resources(run_trial, lambda cfg: trial_resources(cfg["trial"]["config"], local_driver)),
            param_space={"trial": ray.tune.grid_search(payloads), "storage_path": storage},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=False,
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=ray.tune.RunConfig(name="tune", storage_path=storage, verbose=max(0, verbose - 1),
                                          callbacks=[as_tune_callback(recorder)]),
        )
        try:
            tuner.fit()
        except BaseException:
            tracker.end_run(parent, ok=False, error="the sweep itself stopped with an exception")
            raise
        recorder.finish()
        trials_df, epochs_df, meta = results.read_run(run_dir)
        summary, md, files, plots = render_tables(run_dir, trials_df, epochs_df, meta)
        failed = [r for r in recorder.trials.values() if r["status"] != OK]
        tracker.log_sweep_results(summary, files, plots)
        tracker.client.set_tag(parent, "failed_trials", str(len(failed)))
        tracker.end_run(parent, ok=not failed, error=f"{len(failed)} trial(s) failed" if failed else None)
        return Outcome(run_dir=run_dir, summary=summary, markdown=md, failed=failed, tracking_uri=uri,
                       parent_run_id=parent)
    finally:
        if started_ray:
            ray.shutdown()
