"""MLflow's own views of a sweep, with a real sqlite store: the experiment opens on the training-runs view, the parent
run holds every row's statistics as metrics and report.html as an artifact, the trial runs carry their row as a
param and a saved view groups them by it. Where Chromium is installed, a real `mlflow server` on 127.0.0.1 and a
headless screenshot of the parent run and of the grouped view, and of report.html, checked not blank."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from mlflow.tracking import MlflowClient

from orchestrator import results, tracking
from orchestrator.sweep import render_tables
from test_report import METRIC, ROWS, make_run

BIN = Path(sys.executable).parent


def sweep_in_mlflow(root: Path) -> dict:
    """What a finished ablation leaves in MLflow, driven through the Tracker as the sweep drives it."""
    run_dir = root / "reward" / "20261201T000000Z-abcdef"
    made = make_run(run_dir)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = tracking.Tracker(uri, "reward", root / "mlartifacts")
    parent = tracker.start_sweep("sweep-abc", tags={"sweep_id": "abc", "results_dir": str(run_dir)},
                                 params={"spec": "reward", "rows": [r["name"] for r in ROWS], "metric": METRIC})
    trials, epochs, meta = results.read_run(run_dir)
    for rec in made["trials"]:
        config = {"seed": rec["seed"], "method": {"name": "latent_rl"}}
        run_id = tracker.start_trial(f"{rec['row']} | seed {rec['seed']}", config,
                                     tags={"row": rec["row"], "seed": str(rec["seed"]), "sweep_id": "abc",
                                           "trial_id": rec["trial_id"]})
        for e in epochs[epochs["trial_id"] == rec["trial_id"]].to_dict("records"):
            tracker.log_metrics(run_id, {METRIC: e[METRIC]}, step=int(e["epoch"]))
        tracker.end_run(run_id, ok=rec["status"] == "ok")
    summary, _, files, plots = render_tables(run_dir, trials, epochs, meta)
    tracker.log_sweep_results(summary, files, plots)
    tracker.end_run(parent, ok=True)
    return {"uri": uri, "parent": parent, "experiment_id": tracker.experiment_id, "summary": summary,
            "run_dir": run_dir, "tracker": tracker}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    return sweep_in_mlflow(tmp_path_factory.mktemp("mlflow") / "results")


def test_experiment_opens_on_the_training_runs_view(swept):
    client = MlflowClient(swept["uri"])
    exp = client.get_experiment(swept["experiment_id"])
    # without this tag MLflow 3's UI lands on the GenAI traces page of an experiment
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_an_experiment_made_before_gets_the_tag_but_a_users_choice_stays(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    mine = client.create_experiment("mine", artifact_location=(tmp_path / "b").as_uri(),
                                    tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.open_experiment(client, uri, "old", tmp_path) == old
    assert tracking.open_experiment(client, uri, "mine", tmp_path) == mine
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(mine).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_parent_run_holds_every_rows_statistics_and_the_report(swept):
    client = MlflowClient(swept["uri"])
    metrics = client.get_run(swept["parent"]).data.metrics
    summary = swept["summary"]
    names = ["row/00_FCN", "row/01_r_IoU_only", "row/02_r_IoU_r_Dice_b"]   # what MLflow refuses in a name -> _
    for name, rec in zip(names, summary.to_dict("records")):
        for stat in ("mean", "std", "ci_low", "ci_high", "n"):
            assert metrics[f"{name}/{stat}"] == pytest.approx(rec[stat]), (name, stat)
    for name, rec in zip(names[1:], summary.to_dict("records")[1:]):
        for stat in ("delta", "delta_ci_low", "delta_ci_high", "p_improve", "p_holm"):
            assert metrics[f"{name}/{stat}"] == pytest.approx(rec[stat]), (name, stat)
    assert "row/00_FCN/delta" not in metrics           # the baseline has no Δ to itself: nothing, not a 0
    artifacts = {a.path for a in client.list_artifacts(swept["parent"])}
    assert {"report.html", "table.json", "table.csv", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(swept["parent"], "plots")}
    assert {"plots/class_iou.png", "plots/rl_diagnostics.png", "plots/seeds_val_mIoU.png"} <= plots
    # table.json is the run folder's (records, the statistics included), not a second rendering
    local = client.download_artifacts(swept["parent"], "table.json", str(swept["run_dir"].parent))
    assert json.loads(Path(local).read_text())[1]["p_improve"] == pytest.approx(summary.loc[1, "p_improve"])


def test_trial_runs_carry_their_row_and_a_saved_view_groups_them(swept):
    client = MlflowClient(swept["uri"])
    children = client.search_runs([swept["experiment_id"]], f"tags.mlflow.parentRunId = '{swept['parent']}'")
    assert len(children) == 9
    assert {r.data.params[tracking.ROW_PARAM] for r in children} == {r["name"] for r in ROWS}
    # "group by row" through the param, as the UI's filter would ask for it
    assert len(client.search_runs([swept["experiment_id"]], "params.row = 'r_IoU only'")) == 3
    key = f"rlseg-{swept['parent']}"
    state = json.loads(client.get_experiment(swept["experiment_id"]).tags[tracking.SHARED_VIEW_TAG + key])
    assert state["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "row"}]
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{swept['parent']}'"
    path = client.get_run(swept["parent"]).data.tags[tracking.ROWS_VIEW_TAG]
    assert f"viewStateShareKey={key}" in path and "workflowType=machine_learning" in path
    # the saved filter is one MLflow itself accepts, and it finds exactly the sweep's trials
    assert len(client.search_runs([swept["experiment_id"]], state["searchFilter"])) == 9


# --------------------------------------------------------------------------- as a user sees it (Chromium)

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium); "
                                    ".ci/run installs it where it can")


def screenshot(url: str, path: Path, size=(1400, 1600), wait_ms: int = 0) -> np.ndarray:
    """A headless Chromium screenshot of `url` as an RGB array; its own temporary profile, killed if it hangs."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={path.parent / ('profile-' + path.stem)}", f"--window-size={size[0]},{size[1]}",
            f"--screenshot={path}"]
    if wait_ms:
        args.append(f"--virtual-time-budget={wait_ms}")
    subprocess.run(args + [url], check=True, timeout=120, capture_output=True)
    return mpimg.imread(path)[..., :3]


def not_blank(pixels: np.ndarray) -> float:
    """The share of pixels that are not the page background (the most common colour)."""
    flat = (pixels.reshape(-1, 3) * 255).astype(np.uint8)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    return 1 - counts.max() / counts.sum()


@needs_chromium
@pytest.mark.integration
def test_report_screenshot_is_not_blank(swept, tmp_path):
    # offline: a file:// page that would need the network shows nothing where it is missing
    pixels = screenshot((swept["run_dir"] / "report.html").as_uri(), tmp_path / "report.png", wait_ms=3000)
    assert not_blank(pixels) > 0.08


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(swept, tmp_path):
    """`mlflow server` on the sweep's store, 127.0.0.1, its own process group; stopped by that group's id."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(tmp_path / "mlflow_server.log", "wb")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", swept["uri"], "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "mlflow_server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@needs_chromium
@pytest.mark.integration
def test_mlflow_ui_screenshots_of_the_parent_run_and_the_rows_view_are_not_blank(swept, mlflow_ui, tmp_path):
    exp, parent = swept["experiment_id"], swept["parent"]
    shots = {
        "parent": f"{mlflow_ui}/#/experiments/{exp}/runs/{parent}?{tracking.UI_QUERY}",
        "rows": f"{mlflow_ui}/{MlflowClient(swept['uri']).get_run(parent).data.tags[tracking.ROWS_VIEW_TAG]}",
    }
    out = Path(os.environ.get("RLSEG_SCREENSHOTS", tmp_path))
    for name, url in shots.items():
        pixels = screenshot(url, out / f"mlflow_{name}.png", wait_ms=15000)
        assert not_blank(pixels) > 0.03, name


def test_the_report_beside_the_tables_goes_to_mlflow_even_when_only_the_tables_are_listed(swept):
    # rlseg-sync (MLflow was down during the sweep) lists the table files of the run folder; the page must follow
    client = MlflowClient(swept["uri"])
    run = client.create_run(swept["experiment_id"], run_name="synced later")
    tracking.log_results(client, run.info.run_id, swept["summary"], [swept["run_dir"] / "table.md"], [])
    assert {"table.md", "report.html", "table.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
