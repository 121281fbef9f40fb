"""Run a Plan: rows x seeds -> Ray Tune trials (each a TorchTrainer) -> MLflow + Parquet + table.

The session (Ray, the run folder, the MLflow parent run) lives here; what each trial leaves in MLflow and Parquet
is the recorder's (orchestrator.recorder), starting a local Ray is orchestrator.localray's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator import console, pending, preflight, report, results, table_plots, tables, tracking
from orchestrator.localray import API_SERVER_ENV, DRIVER_RESOURCE, _restore_env, start_local_ray  # noqa: F401
# RECORDERS: Tune experiments pickled before the recorder moved out of this module name it here
from orchestrator.recorder import FAILED, OK, RECORDERS, Cell, SweepRecorder, as_tune_callback  # noqa: F401
from orchestrator.spec import Plan
from orchestrator.trial import ATTEMPTS, run_trial, trial_path


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
    stalled: str | None = None       # the line of a trial that waited past --pending-timeout (then interrupted too)


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


def table_meta(plan: Plan, sweep_id: str) -> dict[str, Any]:
    """The spec facts a table needs, stored in the Parquet files' metadata (rlseg-table reads them back)."""
    s = plan.spec
    return {"spec": s.name, "title": s.title, "paper": s.paper, "metric": s.metric.name, "mode": s.metric.mode,
            "seeds": s.seeds, "rows": plan.table_rows(), "columns": plan.columns, "sweep_id": sweep_id}


def _trial_name(trial) -> str:
    """Tune's name for a trial (dashboard, ray/ folder): row and seed (or `search`), filesystem-safe."""
    t = trial.config["trial"]
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', t['row']).strip('_')}-seed{t['seed']}-{trial.trial_id}"


def render_tables(run_dir: Path, trials, epochs, meta: dict[str, Any]) -> tuple[Any, str, list[Path], list[Path]]:
    """table.md/.csv/.tex/.json, plots/*.png and report.html from Parquet data; returns (summary, markdown, files,
    plots), files ending with report.html."""
    metric, rows, columns = meta["metric"], meta["rows"], meta.get("columns") or []
    summary = tables.summarize(trials, metric, rows, mode=meta.get("mode", "max"), epochs=epochs, columns=columns)
    for line in tables.inert_warnings(summary):
        print(f"warning: {line}", flush=True)
    title = meta.get("title") or meta.get("spec")
    md = tables.render_markdown(summary, metric, title=title, notes=meta.get("notes"),
                                reused=meta.get("reused") or None, columns=columns)
    files = [run_dir / "table.md", run_dir / "table.csv", run_dir / "table.tex"]
    results.write_atomic(files[0], md + "\n")
    results.write_atomic(files[1], tables.render_csv(summary))
    results.write_atomic(files[2], tables.render_latex(summary, metric, caption=title, columns=columns) + "\n")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")
    plots = [run_dir / "plots" / f"curves_{slug}.png", run_dir / "plots" / f"bars_{slug}.png"]
    table_plots.plot_curves(epochs, metric, rows, plots[0])
    table_plots.plot_bars(summary, metric, plots[1])
    for column in columns:      # one bar chart per further table column (its metric's mean ± std per row)
        if column["metric"] == metric:
            continue
        path = run_dir / "plots" / f"bars_{re.sub(r'[^A-Za-z0-9]+', '_', column['name']).strip('_') or 'column'}.png"
        table_plots.plot_bars(tables.column_view(summary, column["name"]), f"{column['name']} ({column['metric']})",
                              path)
        plots.append(path)
    results.write_atomic(run_dir / "table.json", report.table_json(summary))
    page, own = report.write_report(run_dir, summary, trials, epochs, meta, plots)
    return summary, md, files + [run_dir / "table.json", page], plots + own


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
    watch: pending.PendingWatch
    log: console.Log | None = None      # where Ray's, Tune's and MLflow's own output goes (None: the terminal, -v)

    @property
    def stalled(self) -> str | None:
        return self.watch.stalled

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
        trial = param_space["trial"]
        configs = [p["config"] for p in trial["grid_search"]] if "grid_search" in trial else [trial["config"]]
        # in-process trials are retried by Tune (orchestrator.trial); a TorchTrainer's by Ray Train inside it
        in_process = [c for c in configs if trial_path(c) == "in_process"]
        retries = max((c["resources"]["max_failures"] for c in in_process), default=0)
        callbacks = [as_tune_callback(recorder, name), pending.watch_callback(self.watch, name)]
        # attempts count per session: a trial resumed after an interruption has all its retries again
        shutil.rmtree(os.path.join(self.storage, ATTEMPTS), ignore_errors=True)
        path = os.path.join(self.storage, name)
        if ray.tune.Tuner.can_restore(path):
            print(f"resuming the Tune experiment {path}", flush=True)
            with console.diverted(self.log):
                return ray.tune.Tuner.restore(path, resources, resume_unfinished=True, resume_errored=False,
                                              restart_errored=False).fit()
        tuner = ray.tune.Tuner(
            resources,
            param_space={**param_space, "storage_path": self.storage},
            # in-process trials reuse the trial process of one that ended (torch and the data already imported)
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                            reuse_actors=len(in_process) == len(configs),
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                            **tune_config),
            run_config=ray.tune.RunConfig(name=name, storage_path=self.storage, verbose=max(0, self.verbose - 1),
                                          callbacks=callbacks, failure_config=ray.tune.FailureConfig(retries)),
        )
        with console.diverted(self.log):
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
            state: dict[str, Any], resume: Path | None = None, cells: list[tuple[str, dict[str, Any]]] = (),
            pending_timeout: float | None | str = "default"):
    """Start (or join) Ray, create the run folder and the MLflow parent run; shut down what was started.
    `driver_slots`: how many trials may run at once on a local Ray (TRAIN_DRIVER units). `state`: what run.json
    records for --resume (spec path, profile, overrides). `resume`: continue that run folder and its parent run.
    `cells`: (where, config) of what the command trains, checked against a cluster joined at an address before the
    run folder is written (a local Ray's were checked against the machine before it started: preflight).
    `pending_timeout`: seconds a trial may wait for resources it cannot get before the sweep stops (resumable);
    "default": 120 s on a local Ray, none on a cluster (its autoscaler may add the nodes)."""
    import ray

    # each ray.train.report waits up to this long for the controller's poll (default 2 s); must be
    # in the environment before ray.init so Ray's processes inherit it
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.pop("MLFLOW_RUN_ID", None)

    # as ray.init would: RAY_ADDRESS (set by `ray job submit` in a job's driver) names the cluster to join
    address = address or os.environ.get("RAY_ADDRESS") or None
    if pending_timeout == "default":
        pending_timeout = None if address else pending.LOCAL_TIMEOUT_S
    started_ray = not ray.is_initialized()
    own_api_env, previous_api_env = started_ray and not address, os.environ.get(API_SERVER_ENV)
    log = console.Log() if verbose <= 1 else None      # Ray's, Tune's and MLflow's output: sweep.log (-v: here)
    try:
        if started_ray:
            with console.diverted(log):
                if address:
                    join_cluster(address, verbose)
                else:
                    start_local_ray(driver_slots, verbose)
        if address:
            for line in preflight.check_cluster_resources(list(cells), address):
                print(line, file=sys.stderr, flush=True)
    except BaseException:
        _end_ray(started_ray, own_api_env, previous_api_env, log)
        if log is not None:
            print(f"(Ray's output: {log.path})", file=sys.stderr, flush=True)
        raise
    if resume is None:
        run_dir = results.new_run_dir(results_root, name)
        results.write_atomic(run_dir / "spec.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
        results.update_state(run_dir, **state, phase=None)
    else:
        run_dir = resume
    if log is not None:
        log.settle(run_dir)
    sweep_id = run_dir.name
    try:
        cluster = ray.cluster_resources()
        git = results.git_info()
        env_file = "env.json" if resume is None else "env.resumed.json"   # the first start's stays as it was
        results.write_atomic(run_dir / env_file, json.dumps(results.env_info(
            {"ray_cluster_resources": cluster, "ray_address": address or "local"}), indent=2, default=str))
        uri = tracking.default_tracking_uri(results_root)
        with console.diverted(log):      # MLflow's database set-up messages
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
                    cpus=int(cluster.get("CPU", 1)), verbose=verbose, results_root=results_root,
                    watch=pending.PendingWatch(pending_timeout), log=log)
        try:
            yield s
        except BaseException as e:    # on the parent run, what stopped it (a bug in rlseg, say, or Ctrl-C)
            what = str(e).strip().splitlines()[0] if str(e).strip() else ""
            tracker.end_run(parent, ok=False, error=f"the sweep itself stopped with an exception: "
                                                    f"{type(e).__name__}{': ' + what if what else ''}")
            raise
    finally:
        _end_ray(started_ray, own_api_env, previous_api_env, log)
        if log is not None:
            log.stream.close()


def _end_ray(started_ray: bool, own_api_env: bool, previous_api_env: str | None, log: console.Log | None) -> None:
    """Shut down the Ray this session started (its messages to the log) and restore RAY_API_SERVER_ADDRESS."""
    import ray

    if started_ray:
        with console.diverted(log):
            ray.shutdown()
    if own_api_env:
        _restore_env(API_SERVER_ENV, previous_api_env)


def join_cluster(address: str, verbose: int) -> None:
    """ray.init of an existing cluster; an address Ray rejects or cannot reach is the one-line error."""
    import ray

    from orchestrator.spec import SpecError

    try:
        ray.init(address=address, log_to_driver=verbose > 2)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"command line: --address {address}: {first}") from None


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
              verbose: int = 1, resume: Path | None = None, reuse: bool = True, fill: bool = False,
              pending_timeout: float | None | str = "default") -> Outcome:
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
                 state={**run_state(plan, max_concurrent), "kind": "ablation"}, resume=resume,
                 cells=preflight.plan_cells(plan), pending_timeout=pending_timeout) as s:
        recorder = s.run_grid(plan, max_concurrent, reuse=reuse, refill=fill)
        summary, md = s.finish_table(recorder)
        failed = [r for r in recorder.trials.values() if r["status"] != OK]
        end_parent(s, failed, interrupted=recorder.interrupted > 0)
        return Outcome(run_dir=s.run_dir, summary=summary, markdown=md, failed=failed, tracking_uri=s.tracker.uri,
                       parent_run_id=s.parent_run_id, trials=len(plan.trials), interrupted=recorder.interrupted > 0,
                       tracking_offline=s.tracker.offline, stalled=s.stalled)
