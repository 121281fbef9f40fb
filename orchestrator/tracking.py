"""MLflow: experiment = spec name, one parent run per sweep, one nested run per trial.

Only the sweep driver logs (a Tune callback calls this), so a sqlite store never sees two writers.
Default store: sqlite:///<abs results root>/mlflow.db with artifacts beside it, unless
MLFLOW_TRACKING_URI is set (an http:// server for clusters).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from trainers.config import flatten

MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit)


def default_tracking_uri(results_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_root.resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            local = not uri.startswith(("http://", "https://"))
            # a sqlite store would put artifacts in ./mlruns of whatever folder we run from; pin them
            location = (artifact_root / experiment).resolve().as_uri() if local and artifact_root else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None

    def start_sweep(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_trial(self, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> str:
        assert self.parent_id is not None
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={**tags, "mlflow.parentRunId": self.parent_id})
        self.log_params(run.info.run_id, flatten(config))
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def resume_sweep(self, run_id: str) -> None:
        """Reopen the parent run of an interrupted sweep (--resume): the same run collects the rest."""
        self.client.update_run(run_id, status="RUNNING")
        self.parent_id = run_id

    def end_run(self, run_id: str, ok: bool, error: str | None = None, killed: bool = False) -> None:
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.set_terminated(run_id, status="KILLED" if killed else "FINISHED" if ok else "FAILED")

    def log_sweep_results(self, summary, files: list[Path], plots: list[Path]) -> None:
        assert self.parent_id is not None
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        for p in plots:
            self.client.log_artifact(self.parent_id, str(p), artifact_path="plots")
        table = summary.astype({"best": bool}).copy()
        table = table.where(table.notna(), None)   # JSON has no NaN
        self.client.log_table(self.parent_id, data=table, artifact_file="table.json")
        best = summary[summary["best"]]
        if len(best):
            self.client.set_tag(self.parent_id, "best_row", str(best.iloc[0]["row"]))
            if not math.isnan(best.iloc[0]["mean"]):
                self.client.log_metric(self.parent_id, "best/mean", float(best.iloc[0]["mean"]))

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MLFLOW_BATCH])
