"""Real sweeps: rlseg-sweep -> Ray Tune -> TorchTrainer -> MLflow (sqlite) -> Parquet -> table."""
import json
import subprocess
import textwrap

import mlflow
import pandas as pd
import pytest

from conftest import BIN
from orchestrator.rerun import main as rerun_main

pytestmark = pytest.mark.integration

TINY = "{data: {image_size: 32, train_size: 32, val_size: 16}, schedule: {epochs: 2, batch_size: 8}}"


def sweep(tmp_path, spec_text, *args, timeout=600):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(spec_text))
    proc = subprocess.run([str(BIN / "rlseg-sweep"), str(spec), "--results-dir", str(tmp_path / "results"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    runs = sorted((tmp_path / "results").glob("*/*/trials.parquet"))
    return proc, (runs[-1].parent if runs else None)


def test_two_rows_two_seeds_through_tune_torchtrainer_and_mlflow(tmp_path):
    proc, run_dir = sweep(tmp_path, f"""
        name: spine
        title: spine test
        metric: {{name: val/mIoU, mode: max}}
        seeds: [0, 1]
        base: supervised
        profiles: {{tiny: {TINY}}}
        rows:
          - {{name: CE, paper: 50.0}}
          - {{name: CE + Dice, set: {{method.seg_loss.dice: 1.0, resources.trial_path: torch_trainer}}}}
    """, "--profile", "tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert len(trials) == 4
    assert set(trials["status"]) == {"ok"}
    assert sorted(zip(trials["row"], trials["seed"])) == [("CE", 0), ("CE", 1), ("CE + Dice", 0), ("CE + Dice", 1)]
    # one worker trains in the Tune trial by default; the other row asks for a Ray Train TorchTrainer
    assert dict(zip(trials["row"], trials["trial_path"])) == {"CE": "in_process", "CE + Dice": "torch_trainer"}
    # the terminal shows rlseg's own lines; Ray's, Tune's and MLflow's go to sweep.log in the run folder
    terminal = proc.stdout + proc.stderr
    for noise in ("Started a local Ray instance", "Configuration for experiment", "TensorBoard", "INFO", "WARNING"):
        assert noise not in terminal, noise
    assert "Configuration for experiment" in (run_dir / "sweep.log").read_text()
    assert len(epochs) == 8 and sorted(set(epochs["epoch"])) == [1, 2]
    for _, t in trials.iterrows():   # the final metric is the last epoch's
        last = epochs[(epochs["trial_id"] == t["trial_id"]) & (epochs["epoch"] == 2)]
        assert last["val/mIoU"].item() == t["val/mIoU"]
    cfgs = trials.set_index("row")["config_json"].map(json.loads)
    assert {c["method"]["seg_loss"]["dice"] for c in cfgs.loc["CE + Dice"]} == {1.0}

    for f in ["spec.resolved.yaml", "env.json", "table.md", "table.csv", "table.tex", "table.json", "report.html"]:
        assert (run_dir / f).is_file(), f
    # the table's plots and report.html's own (no RL diagnostics: these rows are supervised)
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == [
        "bars_val_mIoU.png", "class_iou.png", "curves_val_mIoU.png", "seeds_val_mIoU.png"]

    # MLflow: one parent run, four nested runs whose metrics are the Parquet values
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spine")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == run_dir.name
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    by_id = trials.set_index("mlflow_run_id")
    for c in children:
        t = by_id.loc[c.info.run_id]
        assert c.info.status == "FINISHED"
        assert c.data.tags["row"] == t["row"] and int(c.data.tags["seed"]) == t["seed"]
        assert c.data.params["row"] == t["row"]          # the UI groups the trials by this param
        assert c.data.tags["sweep_id"] == run_dir.name and "git_sha" in c.data.tags
        assert c.data.metrics["val/mIoU"] == pytest.approx(t["val/mIoU"])
        assert c.data.params["schedule.epochs"] == "2"
        history = client.get_metric_history(c.info.run_id, "val/mIoU")
        assert sorted(m.step for m in history) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "table.csv", "table.json", "report.html", "plots"} <= artifacts

    # the rendered table: mean ± std over the two seeds, the paper column, printed at the end
    table = pd.read_csv(run_dir / "table.csv")
    ce = trials[trials["row"] == "CE"]["val/mIoU"]
    assert table.loc[0, "mean"] == pytest.approx(ce.mean())
    assert table.loc[0, "std"] == pytest.approx(ce.std(ddof=1))
    assert table.loc[0, "paper"] == 50.0
    assert f"{ce.mean():.2f} ± {ce.std(ddof=1):.2f}" in proc.stdout
    assert str(run_dir) in proc.stdout and "mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    # the manifest: each cell carries the line that retrains it; rlseg-rerun matches the TorchTrainer trial exactly
    ce0 = trials[(trials["row"] == "CE") & (trials["seed"] == 0)].iloc[0]
    assert ce0["rerun_command"] == f"rlseg-rerun {run_dir.resolve()} CE 0" and ce0["device"] == "cpu"
    assert ce0["code_version"] == json.loads((run_dir / "env.json").read_text())["code_version"]
    assert rerun_main([str(run_dir), "CE", "0"]) == 0
    assert rerun_main([str(run_dir), "CE", "7"]) == 2          # no such cell: one line, exit 2

    # rlseg-table re-renders from Parquet alone
    (run_dir / "table.md").unlink()
    md = (run_dir / "table.md")
    out = subprocess.run([str(BIN / "rlseg-table"), str(run_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert md.is_file() and "CE + Dice" in md.read_text() and f"{ce.mean():.2f}" in out.stdout


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    proc, run_dir = sweep(tmp_path, f"""
        name: failing
        seeds: [0]
        base: {TINY}
        rows:
          - {{name: fine, set: {{resources.workers: 0}}}}
          - {{name: diverges, set: {{schedule.lr: 1.0e+30}}}}
    """)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 2 trials failed" in proc.stderr and "TrainingDiverged" in proc.stderr
    trials = pd.read_parquet(run_dir / "trials.parquet").set_index("row")
    assert trials.loc["fine", "status"] == "ok" and trials.loc["fine", "trial_path"] == "in_process"
    assert trials.loc["diverges", "status"] == "failed"
    assert trials.loc["diverges", "error"].startswith("TrainingDiverged: training loss became nan in epoch 1")
    table = pd.read_csv(run_dir / "table.csv").set_index("row")
    assert table.loc["diverges", "failed"] == 1 and table.loc["diverges", "n"] == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("failing").experiment_id])}
    failed = runs[trials.loc["diverges", "mlflow_run_id"]]
    assert failed.info.status == "FAILED" and "TrainingDiverged" in failed.data.tags["error"]
    parent = runs[failed.data.tags["mlflow.parentRunId"]]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_trials"] == "1"


def test_rerun_with_an_added_row_trains_only_the_new_cells(tmp_path):
    """Cells are keyed by (config, seed, code version): a second run of the spec with one more row trains that
    row's two seeds and takes the other two from the first run (reused, linked in MLflow, not re-logged)."""
    one_row = f"""
        name: cells
        seeds: [0, 1]
        base: {TINY}
        rows:
          - {{name: CE, set: {{resources.workers: 0}}}}
    """
    proc, first = sweep(tmp_path, one_row)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, second = sweep(tmp_path, one_row + "      - {name: CE + Dice, set: {resources.workers: 0, "
                                             "method.seg_loss.dice: 1.0}}\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert second != first and "2 reused from earlier runs" in proc.stdout
    a = pd.read_parquet(first / "trials.parquet").set_index("seed")
    b = pd.read_parquet(second / "trials.parquet")
    assert len(b) == 4 and set(b["status"]) == {"ok"}
    reused, trained = b[b["reused"]].set_index("seed"), b[~b["reused"]]
    assert sorted(trained["row"]) == ["CE + Dice"] * 2 and sorted(reused["row"]) == ["CE"] * 2
    assert set(reused["source_run"]) == {first.name}
    for seed in (0, 1):      # the reused cells are the first run's: same key, same trial, same metrics
        assert reused.loc[seed, "cell_key"] == a.loc[seed, "cell_key"]
        assert reused.loc[seed, "trial_id"] == a.loc[seed, "trial_id"]
        assert reused.loc[seed, "val/mIoU"] == a.loc[seed, "val/mIoU"]
    epochs = pd.read_parquet(second / "epochs.parquet")
    assert len(epochs) == 8 and not epochs.duplicated(["trial_id", "epoch"]).any()
    assert "2 cells reused from earlier runs" in (second / "table.md").read_text()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    links = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("cells").experiment_id])}
    for _, t in reused.iterrows():
        run = links[t["mlflow_run_id"]]
        assert run.data.tags["reused"] == "true" and run.data.tags["source_mlflow_run_id"] == a.loc[
            int(t.name), "mlflow_run_id"]
        assert run.data.metrics == {}          # a link, not a copy

    proc, third = sweep(tmp_path, one_row, "--rerun")   # --rerun trains even known cells
    assert proc.returncode == 0 and not pd.read_parquet(third / "trials.parquet")["reused"].any()


def test_fill_reruns_only_the_failed_and_missing_cells(tmp_path):
    from orchestrator import results

    proc, run_dir = sweep(tmp_path, f"""
        name: refill
        seeds: [0, 1, 2]
        base: {TINY}
        rows:
          - {{name: CE, set: {{resources.workers: 0}}}}
    """, "--rerun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials, _, meta = results.read_run(run_dir)
    recs = {r["seed"]: r for r in results.records(trials)}
    # seed 0's cell goes missing, seed 1's failed (as a lost node would leave them); seed 2 is fine
    lost = [r for s, r in recs.items() if s != 0]
    lost = [({**r, "status": "failed", "error": "WorkerGroupError: node lost"} if r["seed"] == 1 else r) for r in lost]
    results.write_parquet(run_dir / "trials.parquet", lost, results.TRIAL_COLUMNS, meta)

    spec = tmp_path / "spec.yaml"
    proc = subprocess.run([str(BIN / "rlseg-sweep"), str(spec), "--fill", str(run_dir), "--results-dir",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "results" / "refill").iterdir()] == [run_dir.name]   # the same folder
    after = pd.read_parquet(run_dir / "trials.parquet").set_index("seed")
    assert sorted(after.index) == [0, 1, 2] and set(after["status"]) == {"ok"}
    assert after.loc[2, "trial_id"] == recs[2]["trial_id"]                   # untouched
    assert after.loc[0, "trial_id"] != recs[0]["trial_id"] and after.loc[1, "trial_id"] != recs[1]["trial_id"]
    assert after.loc[1, "val/mIoU"] == recs[1]["val/mIoU"]                    # the same cell, trained again
    assert "| CE " in (run_dir / "table.md").read_text() and "|    3 |" in (run_dir / "table.md").read_text()
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert len(epochs) == 6 and not epochs.duplicated(["trial_id", "epoch"]).any()


def test_resume_after_the_driver_is_killed(tmp_path):
    """kill -9 of the sweep's whole process group after two trials ended, then --resume: the same run folder and
    parent run; the cells that had ended are not trained again (one FINISHED nested run each); the runs of the
    trials cut off end KILLED; all 6 cells ok."""
    import os
    import signal
    import time

    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: killed
        seeds: [0, 1, 2]
        base: {TINY}
        rows:
          - {{name: CE}}
          - {{name: CE + Dice, set: {{method.seg_loss.dice: 1.0}}}}
    """))
    results_dir = tmp_path / "results"
    cmd = [str(BIN / "rlseg-sweep"), str(spec), "--results-dir", str(results_dir), "--rerun"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                            start_new_session=True)
    deadline = time.time() + 600
    ended = pd.DataFrame()
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list(results_dir.glob("killed/*/trials.parquet"))
            if found:
                ended = pd.read_parquet(found[0])
                if len(ended) >= 2:
                    break
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)      # the driver and everything in its group, Ray's processes included
        proc.wait(timeout=60)
    assert 2 <= len(ended) < 6, "the sweep must be killed mid-way"
    (run_dir,) = (results_dir / "killed").iterdir()

    resumed = subprocess.run([str(BIN / "rlseg-sweep"), str(spec), "--resume", "--results-dir", str(results_dir)],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [p.name for p in (results_dir / "killed").iterdir()] == [run_dir.name]
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 6 and set(trials["status"]) == {"ok"}
    before = ended.set_index("trial_id")
    kept = trials.set_index("trial_id").loc[before.index]                # the cells that had ended: not retrained
    assert list(kept["wall_s"]) == list(before["wall_s"]) and list(kept["mlflow_run_id"]) == list(before["mlflow_run_id"])
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert len(epochs) == 12 and not epochs.duplicated(["trial_id", "epoch"]).any()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert not [r for r in nested if r.info.status == "RUNNING"]
    for _, t in before.iterrows():   # exactly one FINISHED run per cell that had ended before the kill
        same_cell = [r for r in nested if r.data.tags["row"] == t["row"] and int(r.data.tags["seed"]) == t["seed"]]
        assert [r.info.status for r in same_cell] == ["FINISHED"]
    assert sum(r.info.status == "FINISHED" for r in nested) == 6
