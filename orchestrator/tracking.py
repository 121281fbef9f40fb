"""MLflow: experiment = spec name, one parent run per sweep, one nested run per trial.

Only the sweep driver logs (a Tune callback calls this), so a sqlite store never sees two writers.
Default store: sqlite:///<abs results root>/mlflow.db with artifacts beside it, unless
MLFLOW_TRACKING_URI is set (an http:// server for clusters).

MLflow is a copy of the results, never a condition for them: the run folder's Parquet is the record. A Tracker
bounds every MLflow call in time and never raises for the store: after the first call that fails with a connection,
HTTP, database or MLflow error (store_errors) it is offline for the rest of the command (no further attempts, so no
stalls add up), says so in one line on stderr, and `rlseg-sync RUN_DIR` copies what was missed once the store is
back (orchestrator/sync.py). Any other exception is a bug in rlseg, not MLflow being down: it raises.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import queue
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from orchestrator import console
from orchestrator.tables import spec_columns
from trainers.config import flatten

MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit)
CELL_TAG = "rlseg.cell"   # <sweep_id>/<trial_id>: the identity of a trial's run, for rlseg-sync to find it
# MLflow 3's UI opens an experiment on its GenAI (traces) page unless told it holds training runs. Up to 3.x with the
# sidebar's GenAI / Model training switch the experiment tag decides ("custom_model_development": the classic runs
# table and charts); from the switch on (3.17 here) the browser's choice decides, which the URL query
# `workflowType=machine_learning` sets (and the browser keeps): the links rlseg writes carry it (UI_QUERY).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_QUERY = "workflowType=machine_learning"
ROW_PARAM = "row"          # on every trial run, so that the UI's "group by" can group the nested runs by ablation row
# MLflow's UI opens a saved view of the runs table from `?viewStateShareKey=<key>`, stored as the experiment tag
# mlflow.sharedViewState.<key> (JSON of the table's state: filter, group by, columns); rlseg saves one per sweep
SHARED_VIEW_TAG = "mlflow.sharedViewState."
ROWS_VIEW_TAG = "rlseg.rows_view"     # on the parent run: the UI path of its trials grouped by row
ROW_STATS = ("n", "mean", "std", "ci_low", "ci_high", "delta", "delta_ci_low", "delta_ci_high", "p_improve", "p_holm",
             "delta_control", "p_control")

# MLflow's HTTP client waits 120 s per request and retries 7 times with backoff 2, 4, 8 ... s (minutes per call
# while a server is down). A sweep can do without MLflow, so each request gets 5 s and one immediate retry.
# Values the user set in the environment win; CALL_DEADLINE_S caps a whole call whatever they are.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}
CALL_DEADLINE_S = 30.0


def default_tracking_uri(results_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_root.resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def store_errors() -> tuple[type[BaseException], ...]:
    """What MLflow raises when its store is unreachable or failing: its own MlflowException (HTTP errors and
    exhausted retries included), OSError (connection refused, requests' errors, a full disk, the Tracker's deadline)
    and the database errors of a sqlite store ("database is locked")."""
    from mlflow.exceptions import MlflowException

    errors: list[type[BaseException]] = [MlflowException, OSError, sqlite3.Error]
    try:
        import urllib3.exceptions
        errors.append(urllib3.exceptions.HTTPError)
    except ImportError:
        pass
    try:
        import sqlalchemy.exc        # not in mlflow-skinny
        errors.append(sqlalchemy.exc.SQLAlchemyError)
    except ImportError:
        pass
    return tuple(errors)


def bound_http_requests() -> None:
    """HTTP_BOUNDS into this process's environment (MLflow reads them at every request), unless already set."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


# --------------------------------------------------------------------------- logging with any client
# These take the MlflowClient to use: the Tracker's guarded one (calls return None when offline) or rlseg-sync's
# plain one (calls raise).

def open_experiment(client, uri: str, experiment: str, artifact_root: Path | None) -> str:
    """The id of experiment `experiment`, created (or restored) if need be, marked as a training experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # a sqlite store would put artifacts in ./mlruns of whatever folder we run from; pin them
        location = (artifact_root / experiment).resolve().as_uri() if not is_remote(uri) and artifact_root else None
        experiment_id = client.create_experiment(experiment, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        return experiment_id
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):    # an experiment made before rlseg set it; a user's choice stays
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def trial_tags(tags: dict[str, str], parent_id: str) -> dict[str, str]:
    """A trial run's tags: the caller's, its parent, and its identity (CELL_TAG) when sweep_id and trial_id are known."""
    out = {**tags, "mlflow.parentRunId": parent_id}
    if tags.get("sweep_id") and tags.get("trial_id"):
        out[CELL_TAG] = f"{tags['sweep_id']}/{tags['trial_id']}"
    return out


def create_trial_run(client, experiment_id: str, parent_id: str, run_name: str, config: dict[str, Any],
                     tags: dict[str, str]) -> str | None:
    run = client.create_run(experiment_id, run_name=run_name, tags=trial_tags(tags, parent_id))
    if run is None:
        return None
    params = flatten(config)
    if "row" in tags:
        params[ROW_PARAM] = tags["row"]
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), MLFLOW_BATCH):
        client.log_batch(run_id, params=items[i:i + MLFLOW_BATCH])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])


def log_results(client, run_id: str, summary, files: list[Path], plots: list[Path],
                present: frozenset[str] = frozenset()) -> None:
    """A sweep's table on its parent run: the files (report.html among them), plots/, table.json (skipping the
    artifact paths in `present`), the best row as a tag and its mean as `best/mean`, and every row's statistics as
    metrics (row_metrics). A report.html beside the files goes too, though not listed (rlseg-sync lists the tables)."""
    pages = {f.parent / "report.html" for f in files} - set(files)
    files = [*files, *sorted(p for p in pages if p.is_file())]
    for f in files:
        if f.name not in present:
            client.log_artifact(run_id, str(f))
    for p in plots:
        if f"plots/{p.name}" not in present:
            client.log_artifact(run_id, str(p), artifact_path="plots")
    if "table.json" not in present and "table.json" not in {f.name for f in files}:
        table = summary.astype({"best": bool}).copy()
        table = table.where(table.notna(), None)   # JSON has no NaN
        client.log_table(run_id, data=table, artifact_file="table.json")
    best = summary[summary["best"]]
    if len(best):
        client.set_tag(run_id, "best_row", str(best.iloc[0]["row"]))
        if not math.isnan(best.iloc[0]["mean"]):
            client.log_metric(run_id, "best/mean", float(best.iloc[0]["mean"]))
    metrics = row_metrics(summary)
    if metrics:
        log_metrics(client, run_id, metrics, step=0)


def row_metric_prefix(index: int, row: str) -> str:
    """`row/<spec index>_<row name with what MLflow refuses in a metric name as _>`: the index keeps spec order in
    the UI's sorted lists and the name is the same in every run of a spec, so compare lines the rows up."""
    return f"row/{index:02d}_" + _metric_name_part(row, "row")


def _metric_name_part(text: str, empty: str) -> str:
    """`text` with what MLflow refuses in a metric name as _ (`empty` if nothing is left)."""
    return re.sub(r"[^\w.\-]+", "_", text).strip("_") or empty


def row_metrics(summary) -> dict[str, float]:
    """Each row's finite statistics (ROW_STATS) as `row/<NN_name>/<stat>` metrics for the parent run."""
    out = {}
    # a spec column's mean and Δ (orchestrator.columns): `row/<NN_name>/<column>/mean`, `.../delta`
    column_stats = [(f"{_metric_name_part(name, 'column')}/{stat}", f"{name}: {stat}")
                    for name in spec_columns(summary) for stat in ("mean", "delta")]
    for index, rec in enumerate(summary.to_dict("records")):
        for stat, key in [(s, s) for s in ROW_STATS] + column_stats:
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{row_metric_prefix(index, str(rec['row']))}/{stat}"] = float(value)
    return out


# --------------------------------------------------------------------------- the sweep's tracker

class _Worker:
    """One daemon thread that runs the calls, so that a caller can stop waiting for one (a stuck thread is left
    behind, and nothing else is sent to it: the Tracker is offline by then)."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="rlseg-mlflow", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, args, kwargs, future = self.jobs.get()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:   # handed to the caller, which decides
                future.set_exception(e)

    def run(self, deadline_s: float, fn: Callable, *args, **kwargs) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((fn, args, kwargs, future))
        try:
            return future.result(timeout=deadline_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no answer within {deadline_s:g} s") from None


class GuardedClient:
    """MlflowClient's methods through the Tracker: each bounded in time, none raising for the store (None when it
    failed or the Tracker is offline; a bug in the call raises). A call whose run id (first argument) is None does
    nothing, so callers can pass the id of a run that was never created."""

    def __init__(self, tracker: "Tracker"):
        self._tracker = tracker

    def __getattr__(self, name: str):
        from mlflow.tracking import MlflowClient

        if name.startswith("_") or not callable(getattr(MlflowClient, name, None)):
            raise AttributeError(f"MlflowClient has no method {name!r}")

        def call(*args, **kwargs):
            if (args and args[0] is None) or ("run_id" in kwargs and kwargs["run_id"] is None):
                return None
            return self._tracker._call(name, lambda: getattr(self._tracker._mlflow, name)(*args, **kwargs))
        return call


class Tracker:
    """The sweep's MLflow writer. `client` is a GuardedClient. Once offline (a call failed with one of
    store_errors()), start_* return None and everything else does nothing; every method takes None for a run id."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None, run_dir: Path | None = None):
        bound_http_requests()
        self.uri, self.experiment = uri, experiment
        self.run_dir = run_dir      # for the recovery hint; start_sweep learns it from its results_dir tag
        self.results_root = artifact_root.parent if artifact_root else None
        self.offline = False
        self.parent_id: str | None = None
        self.client = GuardedClient(self)
        self._mlflow = None
        # a local store (sqlite) needs no deadline, and its first use may migrate a new database for many seconds
        self._worker = _Worker() if is_remote(uri) else None
        self.experiment_id = self._call("connect", lambda: self._connect(artifact_root))

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles the Session (and so this) with the trainable. A copy never logs: the driver is the writer."""
        return {**self.__dict__, "_worker": None, "_mlflow": None, "offline": True}

    def _connect(self, artifact_root: Path | None) -> str:
        from mlflow.tracking import MlflowClient

        self._mlflow = MlflowClient(tracking_uri=self.uri)
        return open_experiment(self._mlflow, self.uri, self.experiment, artifact_root)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.offline:
            return None
        start = time.monotonic()
        try:
            return self._worker.run(CALL_DEADLINE_S, fn) if self._worker else fn()
        except store_errors() as e:
            self.offline = True
            self._warn(what, e, time.monotonic() - start)
            return None
        except Exception as e:       # e.g. a TypeError from arguments rlseg got wrong: going offline would hide it
            if hasattr(e, "add_note"):   # Python >= 3.11
                e.add_note(f"rlseg: raised by the MLflow call {what!r} ({self.uri}): not a connection, HTTP, database "
                           f"or MLflow error, so a bug in rlseg, not MLflow being down")
            raise

    def _warn(self, what: str, error: Exception, seconds: float) -> None:
        run_dir = self.run_dir or self._guess_run_dir()
        where = str(run_dir) if run_dir else "results/<spec>/<run>"
        uri_opt = f" --tracking-uri {self.uri}" if os.environ.get("MLFLOW_TRACKING_URI") else ""
        print(f"rlseg: MLflow at {self.uri} failed ({what}: {_reason(error)}, after {seconds:.1f} s); this command logs nothing more to "
              f"MLflow (the run folder still gets every trial, epoch and table); once MLflow is back, copy what it "
              f"missed with: rlseg-sync {where}{uri_opt}", file=console.err(), flush=True)

    def _guess_run_dir(self) -> Path | None:
        """The run folder this process just prepared (session writes env.json or env.resumed.json, then makes us)."""
        if self.results_root is None:
            return None
        marks = [p for pattern in ("env.json", "env.resumed.json")
                 for p in (self.results_root / self.experiment).glob(f"*/{pattern}")]
        return max(marks, key=lambda p: p.stat().st_mtime).parent if marks else None

    # --- what sweep.py and search.py call ---
    def start_sweep(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str | None:
        if tags.get("results_dir"):
            self.run_dir = Path(tags["results_dir"])
        if self.offline:
            return None
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        if run is None:
            return None
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        if "rows" in params:     # an ablation: its trials grouped by row in the UI, from the start of the sweep
            self.share_rows_view(params.get("metric"))
        return self.parent_id

    def resume_sweep(self, run_id: str | None) -> None:
        """Reopen the parent run of an interrupted sweep (--resume): the same run collects the rest."""
        self.parent_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        # trials that were running when the sweep died (kill -9, lost node) never ended their runs: KILLED now;
        # their cells run again under new nested runs
        stale = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")
        for run in stale or []:
            self.client.set_tag(run.info.run_id, "error", "interrupted: the sweep stopped while this trial ran")
            self.client.set_terminated(run.info.run_id, status="KILLED")

    def start_trial(self, run_name: str, config: dict[str, Any], tags: dict[str, str]) -> str | None:
        if self.offline or self.parent_id is None:
            return None
        return create_trial_run(self.client, self.experiment_id, self.parent_id, run_name, config, tags)

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int) -> None:
        if run_id is not None and not self.offline:
            log_metrics(self.client, run_id, metrics, step)

    def end_run(self, run_id: str | None, ok: bool, error: str | None = None, killed: bool = False) -> None:
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.set_terminated(run_id, status="KILLED" if killed else "FINISHED" if ok else "FAILED")

    def log_sweep_results(self, summary, files: list[Path], plots: list[Path]) -> None:
        if self.parent_id is not None and not self.offline:
            log_results(self.client, self.parent_id, summary, files, plots)

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if run_id is not None and not self.offline:
            log_params(self.client, run_id, params)

    def share_rows_view(self, metric: str | None) -> None:
        if self.parent_id is not None and not self.offline:
            share_rows_view(self.client, self.experiment_id, self.parent_id, metric)


def rows_view_state(parent_id: str, metric: str | None) -> dict[str, Any]:
    """The runs-table state of MLflow's UI that shows one sweep's trials grouped by their row param, each group
    with its mean of `metric` (the UI's keys: searchFilter, groupBy, selectedColumns ...)."""
    return {
        "searchFilter": f"tags.mlflow.parentRunId = '{parent_id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": True,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": ROW_PARAM}]},
        "groupsExpanded": {}, "useGroupedValuesInCharts": True,
        "selectedColumns": [f"params.`{ROW_PARAM}`", "params.`seed`"] + ([f"metrics.`{metric}`"] if metric else []),
    }


def share_rows_view(client, experiment_id: str, parent_id: str, metric: str | None) -> str:
    """Save rows_view_state as a shared view of the experiment; returns its UI path (also the parent's ROWS_VIEW_TAG)."""
    import json

    key = f"rlseg-{parent_id}"
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(rows_view_state(parent_id, metric)))
    # the runs tab itself: the experiment root redirects there and keeps only a few query keys, not this one
    path = f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}&{UI_QUERY}"
    client.set_tag(parent_id, ROWS_VIEW_TAG, path)
    return path


def _reason(error: Exception) -> str:
    """A failed MLflow call in a few words ('Connection refused', 'timed out', 'TimeoutError: no answer ...')."""
    text = str(error)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip()
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{error.__class__.__name__}: {first[:200]}"
