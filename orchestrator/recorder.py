"""The sweep's recorder: a Ray Tune callback that turns what Tune sees into one MLflow run and one trials.parquet row
per trial (and epochs.parquet rows per epoch).

`SweepRecorder` runs in the driver process: it is the one MLflow writer and writes trials.parquet / epochs.parquet
as trials end, so a killed sweep keeps what finished.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import console, results, tracking
from orchestrator.trial import trial_path

OK, FAILED = "ok", "failed"
METRIC_PREFIXES = ("train/", "val/", "time/", "rl/", "continual/")   # continual/step: a task sequence's step


def planned_epochs(config: dict) -> int:
    """The epochs a trial of this config reports: schedule.epochs, or every step's of a continual task sequence."""
    from trainers.config import Config
    from trainers.continual.loop import total_epochs

    return total_epochs(Config.model_validate(config))


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
    if m.group(1) == "FinalTrialError" and pattern.match(message):   # a restart re-raising the trial's own error
        return error_line(message)
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


def _record(trial_id: str | None, row: str, row_index: int, seed: int, config: dict[str, Any] | None, *,
            status: str, error: str | None = None, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """A trials.parquet row before any epoch arrived (metrics are added as they are reported). config None: the
    trial has no config (its error says why): no path, cell key, device or config_json either."""
    rec = {"trial_id": trial_id, "row": row, "row_index": row_index, "seed": seed, "status": status, "error": error,
           "trial_path": None, "mlflow_run_id": mlflow_run_id, "epochs": 0, "wall_s": None, "cell_key": None,
           "code_version": results.code_version(), "reused": False, "source_run": None, "device": None,
           "config_json": None}
    if config is not None:
        rec.update(trial_path=trial_path(config), cell_key=results.cell_key(config),
                   device="cuda" if config["resources"]["gpus_per_worker"] > 0 else "cpu",
                   config_json=json.dumps(config, sort_keys=True))
    return rec


@dataclass
class Cell:
    """What one Tune trial trains: a (row, seed) of an ablation, or a sampled config of a search."""
    row: str
    row_index: int
    seed: int
    config: dict[str, Any] | None     # None: sampled values the search config rejects (extra["error"] says why)
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
        self.live = console.LiveLine()

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
        if self.trials.get(trial.trial_id, {}).get("status") == "running":
            return                           # Tune retries a failed trial (FailureConfig): same record and MLflow run
        cell = self.cell_of(trial)
        rec = {**_record(trial.trial_id, cell.row, cell.row_index, cell.seed, cell.config, status="running"),
               **cell.extra}
        tags = {"row": cell.row, "row_index": str(cell.row_index), "seed": str(cell.seed), "sweep_id": self.sweep_id,
                "git_sha": self.git_sha or "unknown", "trial_id": trial.trial_id,
                **({"trial_path": rec["trial_path"]} if rec["trial_path"] else {}),
                **({"error": rec["error"]} if rec["error"] else {}), **self.tags}
        rec["mlflow_run_id"] = self.tracker.start_trial(run_name=f"{cell.row} | seed {cell.seed}",
                                                        config=cell.config or {}, tags=tags)
        self.started[trial.trial_id] = time.time()
        self.trials[trial.trial_id] = {**rec, "planned_epochs": planned_epochs(cell.config) if cell.config else 0}
        self.show_status()

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
        self.show_status()

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
        planned = rec.get("planned_epochs") or (planned_epochs(json.loads(rec["config_json"])) if rec["config_json"]
                                                else 0)
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
            self.live.line(f"[{done}/{self.total}] {rec['row']} | seed {rec['seed']}: {status} {what}{early} "
                           f"({rec['wall_s']:.1f}s, {rec['epochs']} epochs)")
            self.show_status()

    def show_status(self) -> None:
        """The live line: cells done / running / failed, each running cell's epoch, and an ETA from the cells that
        finished (their mean wall time over what is left, at the current concurrency)."""
        if not self.progress:
            return
        recs = [r for tid, r in self.trials.items() if tid not in self.resumed or r["status"] == "running"]
        running = [r for r in recs if r["status"] == "running"]
        done = sum(r["status"] in (OK, FAILED) for r in self.trials.values())
        failed = sum(r["status"] == FAILED for r in self.trials.values())
        walls = [r["wall_s"] for r in recs if r["status"] == OK and r.get("wall_s")]
        cells = ", ".join(f"{r['row']} s{r['seed']} e{r['epochs']}/{r['planned_epochs']}" for r in running[:4])
        cells += ", ..." if len(running) > 4 else ""
        text = f"{done}/{self.total} done, {len(running)} running" + (f" ({cells})" if cells else "")
        text += f", {failed} failed" if failed else ""
        if walls and running:
            mean = sum(walls) / len(walls)
            waiting = max(0, self.total - done - len(running))
            left = mean * waiting + sum(mean * (1 - r["epochs"] / max(r["planned_epochs"], 1)) for r in running)
            eta = left / len(running)
            text += f", ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        self.live.show(text)

    def finish(self) -> int:
        """After Tune returns: cells that never ran or never ended (an interrupted sweep) count as failed.
        Returns how many there are (0 unless the sweep was interrupted)."""
        self.live.clear()
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


INTERRUPTED = ("interrupted:", "not run:")


def _interrupted(error: str | None) -> bool:
    return bool(error) and error.startswith(INTERRUPTED)


# Live recorders by Tune experiment name. Tune pickles its callbacks into the experiment (tuner.pkl) and a restored
# Tuner gets those copies back, so a callback carries only this key and finds the recorder of this process.
RECORDERS: dict[str, SweepRecorder] = {}


def as_tune_callback(recorder: SweepRecorder, key: str):
    import ray.tune

    # by reference: the restored callback must see this process's RECORDERS (orchestrator.sweep re-exports this
    # same dict, which the callbacks pickled before the recorder moved here name)
    from orchestrator import recorder as module

    RECORDERS[key] = recorder

    class _Callback(ray.tune.Callback):
        def __init__(self, key: str):
            self.key = key

        def _call(self, hook: str, *a, **k):
            getattr(module.RECORDERS[self.key], hook)(*a, **k)

        def on_trial_start(self, *a, **k):
            self._call("on_trial_start", *a, **k)

        def on_trial_result(self, *a, **k):
            self._call("on_trial_result", *a, **k)

        def on_trial_complete(self, *a, **k):
            self._call("on_trial_complete", *a, **k)

        def on_trial_error(self, *a, **k):
            self._call("on_trial_error", *a, **k)

    return _Callback(key)
