"""MLflow unreachable or going away: the sweep completes with its Parquet, each MLflow call is bounded in time, one
warning line says how to recover, and rlseg-sync later copies exactly what MLflow missed (once)."""
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from conftest import BIN
from orchestrator import results, tracking

TINY = "{data: {image_size: 32, train_size: 32, val_size: 16}, schedule: {epochs: 2, batch_size: 8}}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("rlseg: MLflow")]


# --------------------------------------------------------------------------- the Tracker on its own (fast)

class CountingServer:
    """An HTTP server on 127.0.0.1 that counts the requests it gets and answers each with `status` (503: a server
    that is up and failing), or, with status None, accepts connections, counts them and never answers."""

    def __init__(self, status: int | None):
        import http.server
        import threading

        self.requests, self.connections = [], 0
        self._release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def handle(self):
                outer.connections += 1
                if status is None:
                    outer._release.wait()                  # hold the connection open, say nothing
                    return
                super().handle()

            def answer(self):
                outer.requests.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


def offline_calls(tracker) -> None:
    """Every kind of call a sweep makes, as the Tracker's and its client's."""
    assert tracker.start_sweep("sweep", {"sweep_id": "s"}, {"a": 1}) is None
    assert tracker.start_trial("row | seed 0", {"seed": 0}, {"sweep_id": "s", "trial_id": "t"}) is None
    tracker.log_metrics("run", {"val/mIoU": 1.0}, step=1)
    tracker.client.set_tag("run", "stopped_early", "after epoch 1")
    assert tracker.client.log_metric("some-run", "search/trials", 3.0) is None
    tracker.end_run("run", ok=False, error="boom")
    tracker.log_sweep_results(pd.DataFrame(), [], [])


@pytest.fixture
def bounds_unset(monkeypatch):
    """The HTTP bounds as a user who set none has them (the Tracker fills them in)."""
    for name in tracking.HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)


def test_a_closed_port_goes_offline_with_one_warning(tmp_path, capsys, bounds_unset):
    run_dir = tmp_path / "results" / "exp" / "20260101T000000Z-abcdef"
    run_dir.mkdir(parents=True)
    (run_dir / "env.json").write_text("{}")    # what sweep.session writes just before it makes the Tracker
    tracker = tracking.Tracker(f"http://127.0.0.1:{free_port()}", "exp", tmp_path / "results" / "mlartifacts")
    assert tracker.offline and tracker.experiment_id is None
    # MLflow's own client waits 120 s per request with 7 retries; the Tracker set 5 s and 1 retry for it
    assert {k: os.environ[k] for k in tracking.HTTP_BOUNDS} == tracking.HTTP_BOUNDS
    offline_calls(tracker)                     # offline: run ids are None, and every call does nothing
    tracker.log_metrics(None, {"val/mIoU": 1.0}, step=1)
    tracker.client.set_tag(None, "stopped_early", "after epoch 1")
    assert pickle.loads(pickle.dumps(tracker)).offline   # Tune ships the Session (with its Tracker) to trials
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(warnings_in(err)) == 1
    assert "Connection refused" in err and f"rlseg-sync {run_dir}" in err


def test_a_failing_server_is_asked_once_and_retried_once_then_never_again(capsys, bounds_unset):
    """A server that answers 503: the first call makes 1 + MLFLOW_HTTP_REQUEST_MAX_RETRIES (= 1) requests, then the
    Tracker is offline and no call of any kind sends another (what MLflow's own 7 retries with backoff would cost
    per call is in benchmarks/mlflow_down.py)."""
    server = CountingServer(503)
    try:
        tracker = tracking.Tracker(server.uri, "exp", None)
        assert tracker.offline
        assert len(server.requests) == 2 and len(set(server.requests)) == 1, server.requests
        for _ in range(3):
            offline_calls(tracker)
        assert len(server.requests) == 2
    finally:
        server.close()
    err = capsys.readouterr().err
    assert len(warnings_in(err)) == 1 and "(connect: " in err


def test_a_server_that_never_answers_costs_one_deadline(monkeypatch, capsys):
    # a server that accepts connections and never answers
    server = CountingServer(None)
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")    # a user's own (long) timeout is kept ...
        monkeypatch.setattr(tracking, "CALL_DEADLINE_S", 1.0)     # ... and the whole call stops at the deadline
        tracker = tracking.Tracker(server.uri, "exp", None)
        assert tracker.offline and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
        assert server.connections == 1 and not server.requests
        for _ in range(5):   # no further attempts: stalls do not add up
            tracker.client.set_tag("run", "k", "v")
        offline_calls(tracker)
        assert server.connections == 1
    finally:
        server.close()
    err = capsys.readouterr().err
    assert len(warnings_in(err)) == 1 and "no answer within 1 s" in err


def test_a_bug_in_an_mlflow_call_fails_loudly_and_an_mlflow_error_goes_offline(tmp_path, capsys, monkeypatch):
    """Only the store failing (connection, HTTP, MLflow errors) turns the Tracker offline; a call rlseg got wrong is a
    bug that raises where it happens and leaves MLflow online, not "MLflow is down". Real MLflow: a file store (no
    database to set up)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracker = tracking.Tracker((tmp_path / "mlruns").as_uri(), "exp", tmp_path / "mlartifacts")
    parent = tracker.start_sweep("sweep", {"sweep_id": "s"}, {"a": 1})
    assert parent is not None and not tracker.offline
    with pytest.raises(TypeError, match="set_tag"):
        tracker.client.set_tag(parent, "only a key")              # a bug in rlseg: MLflow never saw the call
    assert not tracker.offline and not warnings_in(capsys.readouterr().err)
    tracker.client.set_tag(parent, "k", "v")                    # still logging
    assert tracker.client.get_run(parent).data.tags["k"] == "v"
    assert tracker.client.set_tag("no-such-run", "k", "v") is None   # MLflow's own error (MlflowException)
    assert tracker.offline
    err = capsys.readouterr().err
    assert len(warnings_in(err)) == 1 and "(set_tag: MlflowException: Run 'no-such-run' not found" in err


def test_rlseg_sync_says_in_one_line_when_a_folder_is_not_a_run(tmp_path):
    out = subprocess.run([str(BIN / "rlseg-sync"), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "not a run folder" in out.stderr


# --------------------------------------------------------------------------- rlseg-sync on a sqlite store

SPEC = {"name": "synced", "seeds": [0, 1], "metric": {"name": "val/mIoU", "mode": "max"}}


def write_run_folder(root: Path) -> tuple[Path, list[dict]]:
    """A run folder as a sweep that lost MLflow leaves it: two ended trials, two epochs each."""
    run_dir = root / "synced" / "20260101T000000Z-0a1b2c"
    config = {"seed": 0, "schedule": {"epochs": 2, "lr": 0.001}, "resources": {"workers": 1}}
    (run_dir).mkdir(parents=True)
    (run_dir / "spec.resolved.yaml").write_text(yaml.safe_dump({
        "spec": SPEC, "spec_path": "/specs/synced.yaml", "profile": None, "overrides": [],
        "rows": [{"name": "CE", "config": config}]}))
    (run_dir / "env.json").write_text(json.dumps({"git_sha": "abc123"}))
    results.update_state(run_dir, spec_path="/specs/synced.yaml", profile=None, overrides=[], kind="ablation",
                         phase="done", parent_run_id=None)
    meta = {"spec": "synced", "metric": "val/mIoU", "mode": "max", "seeds": [0, 1],
            "rows": [{"name": "CE", "paper": None, "paper_std": None, "pending": None}], "sweep_id": run_dir.name}
    trials = [{"trial_id": f"t_0000{s}", "row": "CE", "row_index": 0, "seed": s, "status": "ok", "error": None,
               "trial_path": "torch_trainer", "mlflow_run_id": None, "epochs": 2, "wall_s": 1.0,
               "config_json": json.dumps({**config, "seed": s}), "val/mIoU": 40.0 + s} for s in (0, 1)]
    epochs = [{"trial_id": t["trial_id"], "row": "CE", "row_index": 0, "seed": t["seed"], "epoch": e,
               "val/mIoU": t["val/mIoU"] - 2 + e, "train/loss": 1.0 / e} for t in trials for e in (1, 2)]
    results.write_parquet(run_dir / "trials.parquet", trials, results.TRIAL_COLUMNS, meta)
    results.write_parquet(run_dir / "epochs.parquet", epochs, results.EPOCH_COLUMNS, meta)
    (run_dir / "table.md").write_text("| row |\n")
    return run_dir, trials


def sync(run_dir: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "rlseg-sync"), str(run_dir), *args], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.integration
def test_sync_completes_a_run_the_sweep_left_running_and_adds_the_rest_once(tmp_path):
    root = tmp_path / "results"
    run_dir, trials = write_run_folder(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # what the sweep logged before MLflow went away: the parent, trial 0 whole, trial 1 started with one epoch
    tracker = tracking.Tracker(uri, "synced", root / "mlartifacts")
    parent = tracker.start_sweep(run_dir.name, {"sweep_id": run_dir.name}, {"spec": "synced"})
    for t, epochs in ((trials[0], (1, 2)), (trials[1], (1,))):
        rid = tracker.start_trial(f"CE | seed {t['seed']}", json.loads(t["config_json"]),
                                  {"row": "CE", "seed": str(t["seed"]), "sweep_id": run_dir.name,
                                   "trial_id": t["trial_id"]})
        t["mlflow_run_id"] = rid
        for e in epochs:
            tracker.log_metrics(rid, {"val/mIoU": t["val/mIoU"] - 2 + e, "train/loss": 1.0 / e}, step=e)
    tracker.end_run(trials[0]["mlflow_run_id"], ok=True)
    assert not tracker.offline

    first = sync(run_dir)
    assert "created 0 runs, 1 already there, 2 completed; 2 run ids written to trials.parquet" in first.stdout
    second = sync(run_dir)
    assert second.stdout.rstrip().endswith("created 0 runs, 3 already there, 0 completed")
    written = pd.read_parquet(run_dir / "trials.parquet")    # the sweep had written None for both
    assert list(written["mlflow_run_id"]) == [t["mlflow_run_id"] for t in trials]
    assert list(written["val/mIoU"]) == [40.0, 41.0] and results.read_run(run_dir)[2]["spec"] == "synced"

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("synced").experiment_id])
    children = {r.data.tags["trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(runs) == 3 and set(children) == {"t_00000", "t_00001"}
    for t in trials:
        run = children[t["trial_id"]]
        assert run.info.run_id == t["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags[tracking.CELL_TAG] == f"{run_dir.name}/{t['trial_id']}"
        assert run.data.params["schedule.lr"] == "0.001"
        history = client.get_metric_history(run.info.run_id, "val/mIoU")
        assert sorted((m.step, m.value) for m in history) == [(1, t["val/mIoU"] - 1), (2, t["val/mIoU"])]
    assert children["t_00001"].data.tags["git_sha"] == "abc123"   # completed by the sync, as the sweep tags it
    p = client.get_run(parent)
    assert p.info.status == "FINISHED" and p.data.tags["failed_trials"] == "0"
    assert {"table.md", "table.json"} <= {a.path for a in client.list_artifacts(parent)}
    assert p.data.metrics["best/mean"] == pytest.approx(40.5)


# --------------------------------------------------------------------------- a real server that goes away

def start_server(store: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1 in its own process group (stop_server ends the whole group)."""
    store.mkdir(exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(store / f"server-{port}.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not start: {(store / f'server-{port}.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn and its worker), SIGKILL what is left after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.poll()


def ended_trials(results_dir: Path) -> pd.DataFrame | None:
    found = sorted(results_dir.glob("*/*/trials.parquet"))
    return pd.read_parquet(found[-1]) if found else None


@pytest.mark.integration
def test_sweep_finishes_without_mlflow_and_sync_copies_what_it_missed_once(tmp_path):
    store, results_dir = tmp_path / "server", tmp_path / "results"
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: downtime
        metric: {{name: val/mIoU, mode: max}}
        seeds: [0, 1, 2]
        base: {TINY}
        rows:
          - {{name: CE}}
    """))
    port = free_port()
    server = start_server(store, port)
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(tmp_path / "sweep.out", "w") as out, open(tmp_path / "sweep.err", "w") as err:
            sweep = subprocess.Popen([str(BIN / "rlseg-sweep"), str(spec), "--results-dir", str(results_dir),
                                      "--max-concurrent", "1"], stdout=out, stderr=err, cwd=tmp_path, env=env)
            try:
                deadline = time.monotonic() + 400
                while (ended_trials(results_dir) is None or len(ended_trials(results_dir)) == 0) \
                        and sweep.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                stop_server(server)       # the server goes away after the first trial has ended
                rc = sweep.wait(timeout=400)
            finally:
                if sweep.poll() is None:
                    sweep.kill()
        stdout, stderr = (tmp_path / "sweep.out").read_text(), (tmp_path / "sweep.err").read_text()
        assert rc == 0, stderr[-3000:]
        trials = ended_trials(results_dir)
        run_dir = sorted(results_dir.glob("downtime/*/trials.parquet"))[-1].parent
        assert len(trials) == 3 and set(trials["status"]) == {"ok"}
        assert len(pd.read_parquet(run_dir / "epochs.parquet")) == 6 and (run_dir / "table.md").is_file()
        warned = warnings_in(stderr)
        assert len(warned) == 1 and f"rlseg-sync {run_dir}" in warned[0], stderr[-3000:]
        # what the outage cost the sweep: one call, refused (the server is gone) or cut at the call deadline; every
        # later one is skipped (the time it takes: benchmarks/mlflow_down.py)
        assert re.search(r"failed \([\w. ]+: (Connection refused|.*no answer within 30 s|timed out)", warned[0]), warned

        port = free_port()
        server = start_server(store, port)     # back, on the same store
        env["MLFLOW_TRACKING_URI"] = uri = f"http://127.0.0.1:{port}"
        first = sync(run_dir, env=env)
        second = sync(run_dir, env=env)
        print(first.stdout, second.stdout)
        # the parent and the first trial were logged by the sweep; the rest is created, or completed if it started
        made = re.search(r"created (\d+) runs, 1 already there, (\d+) completed", first.stdout)
        assert made and int(made.group(1)) + int(made.group(2)) == 3, first.stdout
        assert "created 0 runs, 4 already there, 0 completed" in second.stdout, (first.stdout, second.stdout)

        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("downtime").experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and len(children) == 3
        parent = parents[0]
        assert parent.info.status == "FINISHED" and parent.data.tags["sweep_id"] == run_dir.name
        assert json.loads((run_dir / "run.json").read_text())["parent_run_id"] == parent.info.run_id
        assert {"table.md", "table.csv", "table.json", "plots"} <= {a.path for a in client.list_artifacts(
            parent.info.run_id)}
        by_trial = trials.set_index("trial_id")
        assert sorted(c.data.tags["trial_id"] for c in children) == sorted(by_trial.index)
        for c in children:
            t = by_trial.loc[c.data.tags["trial_id"]]
            assert c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert c.data.tags[tracking.CELL_TAG] == f"{run_dir.name}/{c.data.tags['trial_id']}"
            assert int(c.data.tags["seed"]) == t["seed"] and c.data.params["schedule.epochs"] == "2"
            assert c.data.metrics["val/mIoU"] == pytest.approx(t["val/mIoU"])
            assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "val/mIoU")) == [1, 2]
        # the trial the sweep logged before the stop is that same run, not a copy
        logged = trials.dropna(subset=["mlflow_run_id"])
        assert len(logged) >= 1 and set(logged["mlflow_run_id"]) <= {c.info.run_id for c in children}
        # and trials.parquet now names every trial's run, the ones the sync made too
        named = pd.read_parquet(run_dir / "trials.parquet").set_index("trial_id")["mlflow_run_id"]
        assert {t: named[t] for t in by_trial.index} == {c.data.tags["trial_id"]: c.info.run_id for c in children}
    finally:
        stop_server(server)
