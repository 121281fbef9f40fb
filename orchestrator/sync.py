"""rlseg-sync RUN_DIR: copy into MLflow what a sweep could not log there (the server was down, or went away).

The run folder is the record (run.json, spec.resolved.yaml, env.json, trials.parquet, epochs.parquet, search/,
table.*, plots/); this creates what the tracking store lacks, as the sweep would have logged it: the parent run
(tags, params, the table files and plots as artifacts, its terminal status) and one nested run per trial (params =
the flattened config, tags, metrics per epoch with step = epoch, FINISHED or FAILED).

Runs are found before anything is created: the parent by its sweep_id tag, a trial by its identity tag
rlseg.cell=<sweep_id>/<trial_id> (the sweep's own runs carry it too). A trial run the sweep left RUNNING (MLflow went
away during the trial) is completed, not duplicated; a run that has ended is left as it is. So a second sync adds
nothing. Each trial whose row in trials.parquet has no MLflow run id gets its run's id written there.

Exit codes: 0 synced (one summary line); 1 MLflow failed (one line); 2 not a run folder (one line).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_MLFLOW_FAILED, EXIT_BAD_INPUT = 0, 1, 2
TERMINAL = ("FINISHED", "FAILED", "KILLED")
SYNC_TAG = {"rlseg.logged_by": "rlseg-sync"}   # on the runs this command creates


class NotARunFolder(Exception):
    pass


@dataclass
class Phase:
    """The trials of one Parquet folder (the run folder, or its search/ subfolder) and the tags their runs carry."""
    folder: Path
    tags: dict[str, str]
    trials: list[dict[str, Any]]
    epochs: list[dict[str, Any]]


@dataclass
class RunFolder:
    path: Path
    state: dict[str, Any]           # run.json
    resolved: dict[str, Any]        # spec.resolved.yaml
    git_sha: str
    phases: list[Phase] = field(default_factory=list)

    @property
    def sweep_id(self) -> str:
        return self.path.name

    @property
    def experiment(self) -> str:
        return self.resolved["spec"]["name"]

    @property
    def search(self) -> bool:
        return self.state.get("kind") == "search" or "space_path" in self.resolved

    @property
    def done(self) -> bool:
        """The command ended (not interrupted). Run folders older than run.json count as done with a table."""
        return self.state.get("phase") == "done" or (not self.state and (self.path / "table.md").is_file())


def read_folder(path: Path) -> RunFolder:
    import yaml

    from orchestrator import results

    if not (path / "spec.resolved.yaml").is_file():
        raise NotARunFolder(f"{path}: not a run folder of rlseg-sweep (no spec.resolved.yaml)")
    try:
        resolved = yaml.safe_load((path / "spec.resolved.yaml").read_text())
        env = json.loads((path / "env.json").read_text()) if (path / "env.json").is_file() else {}
        state = results.read_state(path)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise NotARunFolder(f"{path}: cannot be read ({e.__class__.__name__}: {e})") from None
    if not isinstance(resolved, dict) or "name" not in (resolved.get("spec") or {}):
        raise NotARunFolder(f"{path}/spec.resolved.yaml: no spec name (not written by rlseg-sweep)")
    folder = RunFolder(path, state, resolved, env.get("git_sha") or "unknown")
    search_dir = path / "search"
    if (search_dir / "trials.parquet").is_file():
        folder.phases.append(Phase(search_dir, {"phase": "search"}, *_read_parquet(search_dir)))
    if (path / "trials.parquet").is_file():
        tags = {"phase": "confirm"} if search_dir.is_dir() else {}
        folder.phases.append(Phase(path, tags, *_read_parquet(path)))
    return folder


def _read_parquet(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows as dicts, through pyarrow so that a missing value (None) stays apart from a NaN metric."""
    import pyarrow.parquet as pq

    try:
        trials = pq.read_table(folder / "trials.parquet").to_pylist()
        epochs = pq.read_table(folder / "epochs.parquet").to_pylist() if (folder / "epochs.parquet").is_file() else []
    except Exception as e:   # pyarrow raises several kinds for a damaged file
        raise NotARunFolder(f"{folder}: Parquet cannot be read ({e.__class__.__name__}: {e})") from None
    return trials, epochs


# --------------------------------------------------------------------------- what the sweep logs, rebuilt

def parent_tags(f: RunFolder) -> dict[str, str]:
    """As sweep.session / run_sweep / run_search tag the parent run."""
    tags = {"sweep_id": f.sweep_id, "git_sha": f.git_sha, "results_dir": str(f.path.resolve()),
            "spec": str(f.resolved.get("spec_path")), "profile": f.resolved.get("profile") or "embedded"}
    return {**tags, "kind": "search"} if f.search else tags


def parent_params(f: RunFolder) -> dict[str, Any]:
    spec, r = f.resolved["spec"], f.resolved
    common = {"spec": spec["name"], "profile": r.get("profile") or "embedded"}
    if f.search:
        return {**common, "space": r.get("space_path"), "num_samples": spec.get("num_samples"),
                "sampler": spec.get("sampler"), "scheduler": spec.get("scheduler"), "confirm": spec.get("confirm"),
                "overrides": r.get("overrides"), "metric": spec["metric"]["name"]}
    rows = [row["name"] for row in r.get("rows") or []]
    return {**common, "seeds": spec.get("seeds"), "rows": rows, "overrides": r.get("overrides"),
            "metric": spec["metric"]["name"], "trials": len(rows) * len(spec.get("seeds") or [])}


def trial_run_name(rec: dict[str, Any]) -> str:
    return f"{rec['row']} | seed {rec['seed']}" + (" (reused)" if rec.get("reused") else "")


def trial_config(rec: dict[str, Any]) -> dict[str, Any]:
    """The config a trial trained ({} for one that had none: sampled values its search config rejected)."""
    return json.loads(rec["config_json"]) if rec.get("config_json") else {}


def trial_run_tags(f: RunFolder, phase: Phase, rec: dict[str, Any]) -> dict[str, str]:
    """As SweepRecorder.on_trial_start (or .adopt, for a reused cell) and _end tag a trial's run."""
    from orchestrator.trial import trial_path

    config = trial_config(rec)
    tags = {"row": rec["row"], "row_index": str(rec["row_index"]), "seed": str(rec["seed"]), "sweep_id": f.sweep_id,
            "trial_id": rec["trial_id"]}
    if rec.get("reused"):
        tags.update(reused="true", source_run=str(rec.get("source_run") or ""),
                    source_mlflow_run_id=str(rec.get("source_mlflow_run_id") or ""))
    else:
        tags["git_sha"] = f.git_sha
        if rec.get("trial_path") or config:
            tags["trial_path"] = rec.get("trial_path") or trial_path(config)
    if rec.get("error"):
        tags["error"] = str(rec["error"])[:5000]
    if rec.get("stopped_early"):
        tags["stopped_early"] = f"after epoch {rec['epochs']}"
    return {**tags, **phase.tags}


def epoch_metrics(phase: Phase, rec: dict[str, Any]) -> dict[int, dict[str, float]]:
    """{epoch: {metric: value}} of a trial as the sweep logged them (none for a reused cell: they stay in its source)."""
    from orchestrator.results import EPOCH_COLUMNS

    if rec.get("reused"):
        return {}
    out: dict[int, dict[str, float]] = {}
    for e in phase.epochs:
        if e["trial_id"] != rec["trial_id"]:
            continue
        out[int(e["epoch"])] = {k: float(v) for k, v in e.items() if k not in EPOCH_COLUMNS
                                and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def trial_status(rec: dict[str, Any]) -> str:
    return "FINISHED" if rec["status"] == "ok" else "FAILED"


# --------------------------------------------------------------------------- the sync

@dataclass
class Counts:
    created: int = 0
    completed: int = 0      # runs the sweep had started and left RUNNING
    there: int = 0
    not_run: int = 0        # cells the sweep never started (no run to copy)
    named: int = 0          # trials.parquet rows given the MLflow run id the sweep could not write there


class Sync:
    def __init__(self, client, folder: RunFolder, experiment_id: str):
        self.client, self.f, self.experiment_id = client, folder, experiment_id
        self.counts = Counts()
        self.parent_created = False
        self.runs = self._runs_of_sweep()

    def _runs_of_sweep(self) -> list:
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=f"tags.sweep_id = '{self.f.sweep_id}'",
                                           max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def parent(self):
        """The sweep's parent run: run.json's if it is here, else the newest with this sweep_id; created if none."""
        from orchestrator import results
        from orchestrator.tracking import log_params

        parents = [r for r in self.runs if "mlflow.parentRunId" not in r.data.tags]
        known = [r for r in parents if r.info.run_id == self.f.state.get("parent_run_id")]
        if known or parents:
            return (known or sorted(parents, key=lambda r: r.info.start_time))[-1]
        run = self.client.create_run(self.experiment_id, run_name=self.f.sweep_id,
                                     tags={**parent_tags(self.f), **SYNC_TAG})
        log_params(self.client, run.info.run_id, parent_params(self.f))
        self.counts.created += 1
        self.parent_created = True
        if self.f.state and not self.f.state.get("parent_run_id"):    # so that --resume continues this parent
            results.update_state(self.f.path, parent_run_id=run.info.run_id)
        return self.client.get_run(run.info.run_id)

    def trial(self, parent_id: str, phase: Phase, rec: dict[str, Any]) -> str | None:
        """The trial's run, created or completed where needed -> its run id (None: the trial never started)."""
        from orchestrator.tracking import CELL_TAG, create_trial_run

        if rec.get("trial_id") is None:   # "not run: the sweep stopped before this trial started"
            self.counts.not_run += 1
            return None
        cell = f"{self.f.sweep_id}/{rec['trial_id']}"
        mine = [r for r in self.runs if "mlflow.parentRunId" in r.data.tags and
                r.data.tags.get(CELL_TAG, f"{r.data.tags.get('sweep_id')}/{r.data.tags.get('trial_id')}") == cell]
        if mine:
            run = sorted(mine, key=lambda r: r.info.start_time)[-1]
            if run.info.status in TERMINAL:
                self.counts.there += 1
                return run.info.run_id
            self._complete_trial(run, phase, rec)
            self.counts.completed += 1
            return run.info.run_id
        tags = trial_run_tags(self.f, phase, rec)
        run_id = create_trial_run(self.client, self.experiment_id, parent_id, trial_run_name(rec),
                                  trial_config(rec), {**tags, **SYNC_TAG})
        self._log_epochs(run_id, epoch_metrics(phase, rec), have={})
        self.client.set_terminated(run_id, status=trial_status(rec))
        self.counts.created += 1
        return run_id

    def _complete_trial(self, run, phase: Phase, rec: dict[str, Any]) -> None:
        from trainers.config import flatten

        from orchestrator.tracking import log_params

        run_id = run.info.run_id
        params = {k: v for k, v in flatten(trial_config(rec)).items() if k not in run.data.params}
        log_params(self.client, run_id, params)
        for k, v in trial_run_tags(self.f, phase, rec).items():
            if run.data.tags.get(k) != v:
                self.client.set_tag(run_id, k, v)
        metrics = epoch_metrics(phase, rec)
        keys = {k for m in metrics.values() for k in m}
        have = {k: {m.step for m in self.client.get_metric_history(run_id, k)} for k in keys if k in run.data.metrics}
        self._log_epochs(run_id, metrics, have)
        self.client.set_terminated(run_id, status=trial_status(rec))

    def _log_epochs(self, run_id: str, metrics: dict[int, dict[str, float]], have: dict[str, set[int]]) -> None:
        from orchestrator.tracking import log_metrics

        for epoch, values in sorted(metrics.items()):
            missing = {k: v for k, v in values.items() if epoch not in have.get(k, ())}
            if missing:
                log_metrics(self.client, run_id, missing, step=epoch)

    def finish_parent(self, parent) -> None:
        """What the end of the command logs on the parent (search summary, table, failed_trials), then its status:
        FINISHED / FAILED as end_parent sets it, KILLED if the command did not end (--resume reopens it)."""
        run_id = parent.info.run_id
        if self.f.search:
            self._search_summary(parent)
        if not self.f.done:
            self.client.set_terminated(run_id, status="KILLED")
            return
        if (self.f.path / "trials.parquet").is_file():
            self._table(parent)
        failed = sum(rec["status"] != "ok" for phase in self.f.phases for rec in phase.trials)
        if self.f.search and not self.f.state.get("picks"):
            failed = max(failed, 1)   # "no search trial finished"
        self.client.set_tag(run_id, "failed_trials", str(failed))
        if failed:
            self.client.set_tag(run_id, "error", f"{failed} trial(s) failed")
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def _table(self, parent) -> None:
        from orchestrator import results, tables
        from orchestrator.tracking import log_results

        trials, _, meta = results.read_run(self.f.path)
        summary = tables.summarize(trials, meta["metric"], meta["rows"], mode=meta.get("mode", "max"),
                                   columns=meta.get("columns"))
        files = [p for p in (self.f.path / n for n in ("table.md", "table.csv", "table.tex")) if p.is_file()]
        plots = sorted((self.f.path / "plots").glob("*.png"))
        present = {a.path for a in self.client.list_artifacts(parent.info.run_id)}
        if "plots" in present:
            present |= {a.path for a in self.client.list_artifacts(parent.info.run_id, "plots")}
        log_results(self.client, parent.info.run_id, summary, files, plots, present=frozenset(present))

    def _search_summary(self, parent) -> None:
        """As search._log_search: the search counts, the best trial and its values (once the search phase ended)."""
        from orchestrator.tracking import log_params

        picks = self.f.state.get("picks")
        search = next((p for p in self.f.phases if p.tags.get("phase") == "search"), None)
        if search is None or not self.f.state.get("phase") in ("confirm", "done"):
            return
        run_id, metrics = parent.info.run_id, parent.data.metrics
        counts = {"search/trials": float(len(search.trials)),
                  "search/stopped_early": float(sum(bool(r.get("stopped_early")) for r in search.trials))}
        for k, v in counts.items():
            if k not in metrics:
                self.client.log_metric(run_id, k, v)
        if picks:
            name, values = picks[0][0].split(": ", 1)[1], picks[0][1]
            log_params(self.client, run_id, {f"best.{k}": v for k, v in values.items()
                                             if f"best.{k}" not in parent.data.params})
            self.client.set_tag(run_id, "best_search_trial", name)
            metric = self.f.resolved["spec"]["metric"]["name"]
            best = next((r for r in search.trials if r["row"] == name), {})
            value = best.get(metric)
            if "search/best" not in metrics and isinstance(value, float) and math.isfinite(value):
                self.client.log_metric(run_id, "search/best", value)


def sync(folder: RunFolder, uri: str, artifact_root: Path) -> Counts:
    """Everything of `folder` into the store at `uri`; MLflow's exceptions propagate."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import bound_http_requests, open_experiment

    bound_http_requests()
    client = MlflowClient(tracking_uri=uri)
    s = Sync(client, folder, open_experiment(client, uri, folder.experiment, artifact_root))
    parent = s.parent()
    for phase in folder.phases:
        run_ids = {rec["trial_id"]: s.trial(parent.info.run_id, phase, rec) for rec in phase.trials}
        s.counts.named += record_run_ids(phase, run_ids)
    if parent.info.status in TERMINAL:
        s.counts.there += 1
    else:   # created just now, or left RUNNING by a sweep that lost MLflow
        s.counts.completed += not s.parent_created
        s.finish_parent(parent)
    return s.counts


def record_run_ids(phase: Phase, run_ids: dict[str | None, str | None]) -> int:
    """Write into the phase's trials.parquet the run id of each trial that has none there (the sweep could not
    name it while MLflow was down): the run this sync created or completed, or found. Returns how many."""
    import pyarrow.parquet as pq

    from orchestrator import results

    missing = [rec for rec in phase.trials if rec.get("mlflow_run_id") is None and run_ids.get(rec.get("trial_id"))]
    if not missing:
        return 0
    for rec in missing:
        rec["mlflow_run_id"] = run_ids[rec["trial_id"]]
    path = phase.folder / "trials.parquet"
    schema = pq.read_schema(path)
    meta = json.loads((schema.metadata or {}).get(results.META_KEY, b"{}"))
    results.write_parquet(path, phase.trials, list(schema.names), meta)
    return len(missing)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like rlseg-sweep
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: command line: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="rlseg-sync",
                description="Copy a sweep's run folder into MLflow: what the sweep could not log because MLflow was "
                            "down (parent run, one nested run per trial with params, tags, per-epoch metrics and "
                            "status, the table as artifacts). Runs already there are not duplicated; running it "
                            "again adds nothing.")
    p.add_argument("run_dir", help="results/<spec>/<run>/")
    p.add_argument("--results-dir", help="the results root whose mlflow.db to use (default: the run folder's "
                                         "grandparent), unless MLFLOW_TRACKING_URI is set")
    p.add_argument("--tracking-uri", help="the MLflow store (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<results root>/mlflow.db, as rlseg-sweep)")
    args = p.parse_args(argv)

    run_dir = Path(args.run_dir)
    try:
        folder = read_folder(run_dir)
    except NotARunFolder as e:
        print(f"rlseg-sync: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    import requests
    from mlflow.exceptions import MlflowException

    from orchestrator.tracking import _reason, default_tracking_uri
    root = Path(args.results_dir) if args.results_dir else run_dir.resolve().parent.parent
    uri = args.tracking_uri or default_tracking_uri(root)
    try:
        counts = sync(folder, uri, root / "mlartifacts")
    except (MlflowException, requests.RequestException, OSError) as e:
        print(f"rlseg-sync: MLflow at {uri} failed ({_reason(e)}); nothing more was copied, run it again once "
              f"MLflow answers", file=sys.stderr)
        return EXIT_MLFLOW_FAILED
    extra = f", {counts.not_run} never started (nothing to copy)" if counts.not_run else ""
    extra += f"; {counts.named} run ids written to trials.parquet" if counts.named else ""
    print(f"rlseg-sync: {run_dir} -> {uri} (experiment {folder.experiment!r}): created {counts.created} runs, "
          f"{counts.there} already there, {counts.completed} completed{extra}")
    return EXIT_OK
