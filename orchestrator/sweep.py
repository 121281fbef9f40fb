"""Run a Plan: rows x seeds -> Ray Tune trials (each a TorchTrainer) -> MLflow + Parquet + table.

The Tune callback `SweepRecorder` runs in this (driver) process: it is the one MLflow writer and
writes trials.parquet / epochs.parquet as trials end, so a killed sweep keeps what finished.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    trials: int             # how many trials the command ran (or meant to)
    interrupted: bool = False   # stopped (Ctrl-C) before every trial ended: `--resume` continues it
    tracking_offline: bool = False   # MLflow could not be reached (at some point): rlseg-sync fills it in later


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


def fitting_trials(configs: list[dict[str, Any]], cpus: int) -> int:
    """How many of these trials fit on `cpus` CPUs at once (at least 1, at most all of them)."""
    per_trial = max(max(c["resources"]["workers"], 1) * c["resources"]["cpus_per_worker"] for c in configs)
    return max(1, min(len(configs), int(cpus // per_trial)))


def default_max_concurrent(plan: Plan, cpus: int) -> int:
    return fitting_trials([t.config for t in plan.trials], cpus)


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
    if not m:
        return lines[-1][:500]
    message = m.group(2)
    if message.endswith(":"):   # e.g. "WorkerGroupError: Training failed due to worker errors:" + the cause below
        after = lines[lines.index(m.group(0)) + 1:] if m.group(0) in lines else []
        message = f"{message} {after[0]}" if after else message
    return f"{m.group(1)}: {message}"[:1000]


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
            "cell_key": results.cell_key(config), "code_version": results.code_version(), "reused": False,
            "source_run": None, "device": "cuda" if config["resources"]["gpus_per_worker"] > 0 else "cpu",
            "config_json": json.dumps(config, sort_keys=True)}


@dataclass
class Cell:
    """What one Tune trial trains: a (row, seed) of an ablation, or a sampled config of a search."""
    row: str
    row_index: int
    seed: int
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)    # more trials.parquet columns (a search's params)


def grid_cell(trial) -> Cell:
    t = trial.config["trial"]
    return Cell(t["row"], t["row_index"], t["seed"], t["config"])


class SweepRecorder:
    """A ray.tune.Callback: per-trial MLflow runs and Parquet rows, built from what Tune sees.

    cell_of(trial) says which cell a Tune trial is; `expected` cells that never started are recorded as failed
    by finish(). Parquet goes to `out_dir` (the run folder, or its search/ subfolder)."""

    def __init__(self, meta: dict[str, Any], out_dir: Path, tracker: tracking.Tracker, sweep_id: str,
                 git_sha: str | None, *, total: int, expected: list[Cell] = (), cell_of=grid_cell,
                 tags: dict[str, str] | None = None, progress: bool = True):
        self.meta, self.out_dir, self.tracker, self.progress = meta, out_dir, tracker, progress
        self.sweep_id, self.git_sha, self.total, self.expected = sweep_id, git_sha, total, list(expected)
        self.cell_of, self.tags = cell_of, tags or {}
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: list[dict[str, Any]] = []
        self.started: dict[str, float] = {}
        self.resumed: set[str] = set()      # trials that ended in an earlier process (preload)
        self.interrupted = 0                # set by the caller from finish()

    def preload(self, refill: bool = False) -> None:
        """A resumed run: the trials that ended before (from this folder's Parquet) stay as they are; trials that
        were interrupted or never started are dropped here and recorded anew when Tune runs them. `refill`
        (--fill): failed trials are dropped too, so their cells run again."""
        path = self.out_dir / "trials.parquet"
        if not path.is_file():
            return
        trials, epochs, _ = results.read_run(self.out_dir)
        for rec in results.records(trials):
            if rec["status"] == OK or (rec["status"] == FAILED and not _interrupted(rec["error"]) and not refill):
                self.trials[rec["trial_id"]] = rec
        kept = set(self.trials)
        self.epochs = [e for e in results.records(epochs) if e["trial_id"] in kept]
        self.resumed = set(kept)

    # --- Tune callback interface (ray.tune.Callback duck type; see as_tune_callback) ---
    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.resumed:   # Tune restarts a trial that had ended after its last experiment save
            return
        cell = self.cell_of(trial)
        run_id = self.tracker.start_trial(
            run_name=f"{cell.row} | seed {cell.seed}", config=cell.config,
            tags={"row": cell.row, "row_index": str(cell.row_index), "seed": str(cell.seed),
                  "sweep_id": self.sweep_id, "git_sha": self.git_sha or "unknown", "trial_id": trial.trial_id,
                  "trial_path": trial_path(cell.config), **self.tags})
        self.started[trial.trial_id] = time.time()
        self.trials[trial.trial_id] = {**_record(trial.trial_id, cell.row, cell.row_index, cell.seed, cell.config,
                                                 status="running", mlflow_run_id=run_id), **cell.extra}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id in self.resumed:
            return
        rec = self.trials[trial.trial_id]
        metrics = {k: float(v) for k, v in result.items()
                   if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        # a trial resumed from an epoch checkpoint reports the epochs after it; one row per (trial, epoch) whatever
        self.epochs = [e for e in self.epochs if (e["trial_id"], e["epoch"]) != (trial.trial_id, epoch)]
        self.epochs.append({"trial_id": trial.trial_id, "row": rec["row"], "row_index": rec["row_index"],
                            "seed": rec["seed"], "epoch": epoch, **metrics})
        rec["epochs"] = epoch
        rec.update(metrics)   # the trial's final metrics are its last report's
        self.tracker.log_metrics(rec["mlflow_run_id"], metrics, step=epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id in self.resumed:
            return
        rec = self.trials[trial.trial_id]
        if rec["epochs"] == 0:
            self._end(trial, FAILED, "the trial ended without reporting any epoch")
        else:
            self._end(trial, OK, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.trial_id in self.resumed:
            return
        self._end(trial, FAILED, error_line(_error_text(trial)))

    def _end(self, trial, status: str, error: str | None) -> None:
        rec = self.trials[trial.trial_id]
        rec.update(status=status, error=error, wall_s=time.time() - self.started[trial.trial_id])
        planned = json.loads(rec["config_json"])["schedule"]["epochs"]
        rec["stopped_early"] = status == OK and rec["epochs"] < planned     # by the scheduler (ASHA)
        if rec["stopped_early"]:
            self.tracker.client.set_tag(rec["mlflow_run_id"], "stopped_early", f"after epoch {rec['epochs']}")
        self.tracker.end_run(rec["mlflow_run_id"], ok=status == OK, error=error)
        self.flush()
        if self.progress:
            done = sum(r["status"] in (OK, FAILED) for r in self.trials.values())
            metric = self.meta["metric"]
            what = f"{metric}={rec[metric]:.2f}" if status == OK and metric in rec else (error or "")
            early = " (stopped early)" if rec["stopped_early"] else ""
            print(f"[{done}/{self.total}] {rec['row']} | seed {rec['seed']}: {status} {what}{early} "
                  f"({rec['wall_s']:.1f}s, {rec['epochs']} epochs)", flush=True)

    def finish(self) -> int:
        """After Tune returns: cells that never ran or never ended (an interrupted sweep) count as failed.
        Returns how many there are (0 unless the sweep was interrupted)."""
        seen = {(r["row"], r["seed"]) for r in self.trials.values()}
        for rec in self.trials.values():
            if rec["status"] not in (OK, FAILED):
                rec.update(status=FAILED, error="interrupted: the trial did not end")
                self.tracker.end_run(rec["mlflow_run_id"], ok=False, error=rec["error"])
        for c in self.expected:
            if (c.row, c.seed) not in seen:
                self.trials[f"not-run-{c.row_index}-{c.seed}"] = _record(
                    None, c.row, c.row_index, c.seed, c.config, status=FAILED,
                    error="not run: the sweep stopped before this trial started")
        self.flush()
        return sum(r["status"] == FAILED and _interrupted(r["error"]) for r in self.trials.values())

    def adopt(self, cell: Cell, source_run: Path, source: dict[str, Any], epochs: list[dict[str, Any]]) -> None:
        """A cell finished in an earlier run of this spec (same cell key): recorded as reused, not trained. Its
        MLflow run here only links to the source run (tags), the metrics stay there."""
        run_id = self.tracker.start_trial(
            run_name=f"{cell.row} | seed {cell.seed} (reused)", config=cell.config,
            tags={"row": cell.row, "row_index": str(cell.row_index), "seed": str(cell.seed), "sweep_id": self.sweep_id,
                  "trial_id": source["trial_id"], "reused": "true", "source_run": source_run.name,
                  "source_mlflow_run_id": source.get("mlflow_run_id") or "", **self.tags})
        self.tracker.end_run(run_id, ok=True)
        rec = {**source, **cell.extra, "row": cell.row, "row_index": cell.row_index, "seed": cell.seed,
               "reused": True, "source_run": source_run.name, "mlflow_run_id": run_id}
        self.trials[rec["trial_id"]] = rec
        self.resumed.add(rec["trial_id"])
        self.epochs += [{**e, "row": cell.row, "row_index": cell.row_index} for e in epochs]

    def ended(self) -> list[dict[str, Any]]:
        return [r for r in self.trials.values() if r["status"] in (OK, FAILED)]

    # --- outputs ---
    def flush(self) -> None:
        """Rewrite trials.parquet and epochs.parquet (atomically) with every trial that has ended."""
        from orchestrator.rerun import rerun_command

        ended = self.ended()
        for rec in ended:   # the manifest's one line that retrains this cell exactly
            rec["rerun_command"] = rerun_command(self.out_dir.resolve(), rec["row"], int(rec["seed"]))
        ended_ids = {r["trial_id"] for r in ended}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        results.write_parquet(self.out_dir / "trials.parquet", ended, results.TRIAL_COLUMNS, self.meta)
        results.write_parquet(self.out_dir / "epochs.parquet",
                              [e for e in self.epochs if e["trial_id"] in ended_ids], results.EPOCH_COLUMNS, self.meta)


def table_meta(plan: Plan, sweep_id: str) -> dict[str, Any]:
    """The spec facts a table needs, stored in the Parquet files' metadata (rlseg-table reads them back)."""
    s = plan.spec
    return {"spec": s.name, "title": s.title, "paper": s.paper, "metric": s.metric.name, "mode": s.metric.mode,
            "seeds": s.seeds, "rows": plan.table_rows(), "sweep_id": sweep_id}


INTERRUPTED = ("interrupted:", "not run:")


def _interrupted(error: str | None) -> bool:
    return bool(error) and error.startswith(INTERRUPTED)


def _trial_name(trial) -> str:
    """Tune's name for a trial (dashboard, ray/ folder): row and seed (or `search`), filesystem-safe."""
    t = trial.config["trial"]
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', t['row']).strip('_')}-seed{t['seed']}-{trial.trial_id}"


# Live recorders by Tune experiment name. Tune pickles its callbacks into the experiment (tuner.pkl) and a restored
# Tuner gets those copies back, so a callback carries only this key and finds the recorder of this process.
RECORDERS: dict[str, SweepRecorder] = {}


def as_tune_callback(recorder: SweepRecorder, key: str):
    import ray.tune

    from orchestrator import sweep   # by reference: the restored callback must see this process's RECORDERS

    RECORDERS[key] = recorder

    class _Callback(ray.tune.Callback):
        def __init__(self, key: str):
            self.key = key

        def _call(self, hook: str, *a, **k):
            getattr(sweep.RECORDERS[self.key], hook)(*a, **k)

        def on_trial_start(self, *a, **k):
            self._call("on_trial_start", *a, **k)

        def on_trial_result(self, *a, **k):
            self._call("on_trial_result", *a, **k)

        def on_trial_complete(self, *a, **k):
            self._call("on_trial_complete", *a, **k)

        def on_trial_error(self, *a, **k):
            self._call("on_trial_error", *a, **k)

    return _Callback(key)


def render_tables(run_dir: Path, trials, epochs, meta: dict[str, Any]) -> tuple[Any, str, list[Path], list[Path]]:
    """table.md/.csv/.tex and plots/*.png from Parquet data; returns (summary, markdown, files, plots)."""
    metric, rows = meta["metric"], meta["rows"]
    summary = tables.summarize(trials, metric, rows, mode=meta.get("mode", "max"))
    title = meta.get("title") or meta.get("spec")
    md = tables.render_markdown(summary, metric, title=title, notes=meta.get("notes"),
                                reused=meta.get("reused") or None)
    files = [run_dir / "table.md", run_dir / "table.csv", run_dir / "table.tex"]
    results.write_atomic(files[0], md + "\n")
    results.write_atomic(files[1], tables.render_csv(summary))
    results.write_atomic(files[2], tables.render_latex(summary, metric, caption=title) + "\n")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")
    plots = [run_dir / "plots" / f"curves_{slug}.png", run_dir / "plots" / f"bars_{slug}.png"]
    tables.plot_curves(epochs, metric, rows, plots[0])
    tables.plot_bars(summary, metric, plots[1])
    return summary, md, files, plots


@dataclass
class Session:
    """What the phases of one rlseg-sweep command share: Ray, the run folder, the MLflow parent run."""
    run_dir: Path
    tracker: tracking.Tracker
    parent_run_id: str
    sweep_id: str
    git_sha: str | None
    local_driver: bool      # trials hold a TRAIN_DRIVER unit instead of a CPU (a local Ray)
    cpus: int
    verbose: int
    results_root: Path

    @property
    def storage(self) -> str:
        return str((self.run_dir / "ray").resolve())

    def tune(self, trainable, param_space: dict[str, Any], recorder: SweepRecorder, *, name: str,
             max_concurrent: int, **tune_config) -> Any:
        """One Tuner.fit(); each trial holds trial_resources(); the recorder sees every trial. If this run folder
        already holds the Tune experiment `name` (a resumed run), Tune's own restore continues it: finished
        trials stay finished, interrupted ones continue from their last epoch checkpoint (train-<trial_id>)."""
        import ray.tune

        local_driver = self.local_driver      # not self: Tune pickles this function with the trainable
        resources = ray.tune.with_resources(
            trainable, lambda cfg: trial_resources(cfg["trial"]["config"], local_driver))
        callback = as_tune_callback(recorder, name)
        path = os.path.join(self.storage, name)
        if ray.tune.Tuner.can_restore(path):
            print(f"resuming the Tune experiment {path}", flush=True)
            return ray.tune.Tuner.restore(path, resources, resume_unfinished=True, resume_errored=False,
                                          restart_errored=False).fit()
        tuner = ray.tune.Tuner(
            resources,
            param_space={**param_space, "storage_path": self.storage},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=False,
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                            **tune_config),
            run_config=ray.tune.RunConfig(name=name, storage_path=self.storage, verbose=max(0, self.verbose - 1),
                                          callbacks=[callback]),
        )
        return tuner.fit()

    def run_grid(self, plan: Plan, max_concurrent: int | None, *, tags: dict[str, str] | None = None,
                 name: str = "tune", notes: list[str] | None = None, reuse: bool = True,
                 refill: bool = False) -> SweepRecorder:
        """Every (row, seed) of `plan` as one Tune trial; trials.parquet etc. in the run folder. `notes`: lines
        printed under the table. `reuse`: a cell that finished in an earlier run of this spec with the same cell
        key (config, seed, code version) is taken from there instead of trained again."""
        import ray.tune

        concurrent = max_concurrent or default_max_concurrent(plan, self.cpus)
        cells = [Cell(t.row, t.row_index, t.seed, t.config) for t in plan.trials]
        recorder = SweepRecorder({**table_meta(plan, self.sweep_id), "notes": notes or []}, self.run_dir,
                                 self.tracker, self.sweep_id, self.git_sha, total=len(cells), expected=cells,
                                 tags=tags, progress=self.verbose > 0)
        recorder.preload(refill)
        if refill:   # a new Tune experiment for the cells to refill (Tune's own would restore the old one)
            name = f"fill-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        have = {(r["row"], r["seed"]) for r in recorder.trials.values()}
        found = results.finished_cells(self.results_root / plan.spec.name, exclude=self.run_dir) if reuse else {}
        todo = []
        for cell in cells:
            source = found.get(results.cell_key(cell.config))
            if (cell.row, cell.seed) in have:
                continue
            if source is not None:
                recorder.adopt(cell, *source)
            else:
                todo.append(cell)
        reused = recorder.meta["reused"] = sum(bool(r.get("reused")) for r in recorder.trials.values())
        recorder.flush()
        print(f"{plan.spec.name}: {len(plan.trials)} trials ({len(plan.rows)} rows x {len(plan.spec.seeds)} seeds)"
              + (f", {reused} reused from earlier runs" if reused else "")
              + f", {concurrent} at a time -> {self.run_dir}", flush=True)
        if todo or ray.tune.Tuner.can_restore(os.path.join(self.storage, name)):
            payloads = [{"row": c.row, "row_index": c.row_index, "seed": c.seed, "config": c.config} for c in todo]
            self.tune(run_trial, {"trial": ray.tune.grid_search(payloads)}, recorder, name=name,
                      max_concurrent=min(concurrent, max(1, len(todo))))
        recorder.interrupted = recorder.finish()
        return recorder

    def finish_table(self, recorder: SweepRecorder) -> tuple[Any, str]:
        """Tables and plots from the run folder's Parquet, logged to the parent run; ends the parent run."""
        trials_df, epochs_df, meta = results.read_run(self.run_dir)
        summary, md, files, plots = render_tables(self.run_dir, trials_df, epochs_df, meta)
        self.tracker.log_sweep_results(summary, files, plots)
        return summary, md


@contextmanager
def session(name: str, resolved: dict[str, Any], *, results_root: Path, address: str | None,
            driver_slots: int, verbose: int, tags: dict[str, str], params: dict[str, Any],
            state: dict[str, Any], resume: Path | None = None):
    """Start (or join) Ray, create the run folder and the MLflow parent run; shut down what was started.
    `driver_slots`: how many trials may run at once on a local Ray (TRAIN_DRIVER units). `state`: what run.json
    records for --resume (spec path, profile, overrides). `resume`: continue that run folder and its parent run."""
    import ray

    # each ray.train.report waits up to this long for the controller's poll (default 2 s); must be
    # in the environment before ray.init so Ray's processes inherit it
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.pop("MLFLOW_RUN_ID", None)
    if resume is None:
        run_dir = results.new_run_dir(results_root, name)
        results.write_atomic(run_dir / "spec.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
        results.update_state(run_dir, **state, phase=None)
    else:
        run_dir = resume
    sweep_id = run_dir.name

    # as ray.init would: RAY_ADDRESS (set by `ray job submit` in a job's driver) names the cluster to join
    address = address or os.environ.get("RAY_ADDRESS") or None
    started_ray = not ray.is_initialized()
    own_api_env, previous_api_env = started_ray and not address, os.environ.get(API_SERVER_ENV)
    if started_ray:
        if address:
            ray.init(address=address, log_to_driver=verbose > 2)
        else:
            start_local_ray(driver_slots, verbose)
    try:
        cluster = ray.cluster_resources()
        git = results.git_info()
        env_file = "env.json" if resume is None else "env.resumed.json"   # the first start's stays as it was
        results.write_atomic(run_dir / env_file, json.dumps(results.env_info(
            {"ray_cluster_resources": cluster, "ray_address": address or "local"}), indent=2, default=str))
        uri = tracking.default_tracking_uri(results_root)
        tracker = tracking.Tracker(uri, name, results_root / "mlartifacts")
        parent = results.read_state(run_dir).get("parent_run_id")
        if parent:
            tracker.resume_sweep(parent)
        else:
            parent = tracker.start_sweep(
                run_name=sweep_id,
                tags={"sweep_id": sweep_id, "git_sha": git["git_sha"] or "unknown",
                      "results_dir": str(run_dir.resolve()), **tags},
                params=params)
            results.update_state(run_dir, parent_run_id=parent)
        s = Session(run_dir=run_dir, tracker=tracker, parent_run_id=parent, sweep_id=sweep_id,
                    git_sha=git["git_sha"], local_driver=cluster.get(DRIVER_RESOURCE, 0) >= 1,
                    cpus=int(cluster.get("CPU", 1)), verbose=verbose, results_root=results_root)
        try:
            yield s
        except BaseException:
            tracker.end_run(parent, ok=False, error="the sweep itself stopped with an exception")
            raise
    finally:
        if started_ray:
            ray.shutdown()
        if own_api_env:
            _restore_env(API_SERVER_ENV, previous_api_env)


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def start_local_ray(driver_slots: int, verbose: int) -> None:
    """ray.init of a local Ray whose own processes know where its State API is. It leaves RAY_API_SERVER_ADDRESS
    set: the caller restores it after ray.shutdown.

    Ray Train 2.60 gives each trial a detached placement-group cleaner that asks the State API, with no address,
    whether the trial's controller is alive. Without an address the State API looks for running GCS processes
    and fails ("Found multiple active Ray instances") whenever the machine runs another Ray (a second sweep, a
    test cluster): the placement groups of trials Tune stops early (ASHA) or interrupts were then never freed and
    later trials waited for ever. So the dashboard (the State API's server) starts on a loopback port chosen here,
    and its URL goes into RAY_API_SERVER_ADDRESS before ray.init, which Ray's processes inherit and which the
    State API takes before anything else."""
    import ray

    port = _free_loopback_port()
    previous = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        # "local": a new instance even where `ray start` left its address in /tmp/ray (ray.init's default joins it)
        context = ray.init(address="local", resources={DRIVER_RESOURCE: driver_slots}, log_to_driver=verbose > 2,
                           dashboard_host="127.0.0.1", dashboard_port=port)
    except BaseException:
        _restore_env(API_SERVER_ENV, previous)
        raise
    if getattr(context, "dashboard_url", None) != f"127.0.0.1:{port}":   # the port was taken meanwhile, or no
        _warn_other_ray_instances()                                        # dashboard: the old hazard is back


def _free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _restore_env(key: str, previous: str | None) -> None:
    if previous is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = previous


def _warn_other_ray_instances() -> None:
    """Without RAY_API_SERVER_ADDRESS pointing at this Ray's own dashboard (start_local_ray), Ray Train's
    placement-group cleaner cannot tell several local Ray instances apart; say so when there are others."""
    try:
        from ray._private.services import find_gcs_addresses

        others = find_gcs_addresses()
    except Exception:   # a private helper: if it moved, skip the check
        return
    if len(others) > 1:   # this sweep's own Ray is one of them
        print(f"warning: {len(others) - 1} other Ray instance(s) run on this machine and this Ray's dashboard did "
              "not start on its own port: Ray Train may not release the resources of trials stopped early (ASHA) "
              "or interrupted, and later trials may wait for ever. Run one sweep at a time, or run sweeps on one "
              "`ray start` cluster with --address.", file=sys.stderr, flush=True)


def end_parent(s: Session, failed: list[dict[str, Any]], interrupted: bool = False) -> None:
    """End the parent run: FINISHED, FAILED (some trial failed) or KILLED (interrupted; --resume reopens it)."""
    if interrupted:
        s.tracker.end_run(s.parent_run_id, ok=False, killed=True)
        return
    s.tracker.client.set_tag(s.parent_run_id, "failed_trials", str(len(failed)))
    s.tracker.end_run(s.parent_run_id, ok=not failed, error=f"{len(failed)} trial(s) failed" if failed else None)
    results.update_state(s.run_dir, phase="done")


def run_state(plan, max_concurrent: int | None) -> dict[str, Any]:
    """What run.json records so that `--resume` can rebuild the same plan and run it as many trials at a time."""
    return {"spec_path": str(Path(plan.path).resolve()), "profile": plan.profile, "overrides": plan.overrides,
            "max_concurrent": max_concurrent}


def run_sweep(plan: Plan, *, results_root: Path, address: str | None = None, max_concurrent: int | None = None,
              verbose: int = 1, resume: Path | None = None, reuse: bool = True, fill: bool = False) -> Outcome:
    """An ablation: rows x seeds, then the table. `resume`: an unfinished run folder of this plan to continue.
    `reuse`: take cells that finished in earlier runs of this spec (same cell key) instead of training them.
    `fill` (with `resume` = a run folder, finished or not): rerun its failed and missing cells, re-render the table."""
    slots = max_concurrent or default_max_concurrent(plan, os.cpu_count() or 1)
    profile = plan.profile or "embedded"
    with session(plan.spec.name, plan.resolved(), results_root=results_root, address=address, driver_slots=slots,
                 verbose=verbose, tags={"spec": str(plan.path), "profile": profile},
                 params={"spec": plan.spec.name, "profile": profile, "seeds": plan.spec.seeds,
                         "rows": [r.name for r in plan.rows], "overrides": plan.overrides,
                         "metric": plan.spec.metric.name, "trials": len(plan.trials)},
                 state={**run_state(plan, max_concurrent), "kind": "ablation"}, resume=resume) as s:
        recorder = s.run_grid(plan, max_concurrent, reuse=reuse, refill=fill)
        summary, md = s.finish_table(recorder)
        failed = [r for r in recorder.trials.values() if r["status"] != OK]
        end_parent(s, failed, interrupted=recorder.interrupted > 0)
        return Outcome(run_dir=s.run_dir, summary=summary, markdown=md, failed=failed, tracking_uri=s.tracker.uri,
                       parent_run_id=s.parent_run_id, trials=len(plan.trials), interrupted=recorder.interrupted > 0,
                       tracking_offline=s.tracker.offline)
