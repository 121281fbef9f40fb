"""Search specs: spaces and their errors, the dry run, and a real tiny search (Ray Tune + OptunaSearch + ASHA)
confirmed over seeds, with its Optuna study, Parquet and MLflow runs."""
import json
import subprocess
import textwrap

import mlflow
import optuna
import pandas as pd
import pytest

from conftest import BIN
from orchestrator.cli import sweep_main
from orchestrator.search import optuna_distributions, rank
from orchestrator.spec import SearchPlan, SpecError, config_with, resolve

SPACE = textwrap.dedent("""
    name: demo
    method: latent_rl
    params:
      method.policy.ema_eta: {uniform: [0.5, 0.99]}
      method.loss.lambda_kl: {loguniform: [0.01, 10]}
      method.policy.blocks: {int: [1, 5], step: 2}
      method.baseline.kind: {choice: [ema, batch_mean]}
""")

SPEC = textwrap.dedent("""
    name: demo_search
    metric: {name: train/loss, mode: min}   # at this size val/mIoU ties (one class); the loss tells configs apart
    base: latent_rl
    profiles:
      tiny: {data: {image_size: 32, train_size: 32, val_size: 16}, schedule: {epochs: 2, batch_size: 8}}
    search: space.yaml
    num_samples: 4
    sampler: {seed: 0, n_startup_trials: 2}   # ASHA prunes 2 (seed 3: each config beat the last at epoch 1)
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 4}
    confirm: {top_k: 1, seeds: [0, 1]}
""")


@pytest.fixture
def search_spec(tmp_path):
    def write(space: str = SPACE, spec: str = SPEC):
        (tmp_path / "space.yaml").write_text(space)
        (tmp_path / "search.yaml").write_text(spec)
        return tmp_path / "search.yaml"
    return write


def test_a_search_spec_resolves_to_a_search_plan(search_spec):
    plan = resolve(search_spec(), "tiny", ["num_samples=6", "scheduler=none"])
    assert isinstance(plan, SearchPlan)
    assert plan.spec.num_samples == 6 and plan.spec.scheduler.kind == "none"   # spec keys from the command line
    assert [p.key for p in plan.params] == ["method.policy.ema_eta", "method.loss.lambda_kl", "method.policy.blocks",
                                            "method.baseline.kind"]
    assert plan.search_config["schedule"]["eval_every"] == 1 and plan.epochs == 2
    dists = optuna_distributions(plan.params)
    assert dists["method.loss.lambda_kl"] == optuna.distributions.FloatDistribution(0.01, 10, log=True)
    assert dists["method.policy.blocks"] == optuna.distributions.IntDistribution(1, 5, step=2)
    assert dists["method.baseline.kind"] == optuna.distributions.CategoricalDistribution(["ema", "batch_mean"])
    cfg = config_with(plan.search_config, {"method.policy.ema_eta": 0.7, "method.baseline.kind": "batch_mean"})
    assert cfg["method"]["policy"]["ema_eta"] == 0.7 and cfg["method"]["baseline"]["kind"] == "batch_mean"
    assert cfg["method"]["policy"]["blocks"] == plan.search_config["method"]["policy"]["blocks"]

    confirm = plan.confirm_plan([("top-1: search 03", {"method.policy.ema_eta": 0.7})])
    assert [r.name for r in confirm.rows] == ["base", "top-1: search 03"]
    assert confirm.rows[1].changes == {"method.policy.ema_eta": 0.7}
    assert [(t.row, t.seed) for t in confirm.trials] == [("base", 0), ("base", 1), ("top-1: search 03", 0),
                                                         ("top-1: search 03", 1)]


@pytest.mark.parametrize("params, where, expected", [
    ("method.policy.ema_eta: {gaussian: [0, 1]}", "params.method.policy.ema_eta", "expected one of {uniform"),
    ("method.policy.ema_eta: {uniform: [0.9, 0.5]}", "params.method.policy.ema_eta", "low < high"),
    ("method.policy.ema_eta: {uniform: [0.5]}", "params.method.policy.ema_eta", "[low, high]"),
    ("method.policy.ema_eta: {uniform: [0.5, .inf]}", "params.method.policy.ema_eta", "two finite numbers"),
    ("method.loss.lambda_kl: {loguniform: [0, 1]}", "params.method.loss.lambda_kl", "0 < low < high"),
    ("method.policy.blocks: {int: [1, 4], step: 2}", "params.method.policy.blocks", "divides high - low"),
    ("method.policy.blocks: {int: [1.5, 4]}", "params.method.policy.blocks", "two whole numbers"),
    ("method.policy.blocks: {uniform: [1, 4], step: 1}", "params.method.policy.blocks", "step: unknown key"),
    ("method.baseline.kind: {choice: []}", "params.method.baseline.kind", "non-empty list"),
    ("method.baseline.kind: {choice: [[1, 2]]}", "params.method.baseline.kind", "scalar values"),
    ("method.baseline.kind: {choice: [ema, ema]}", "params.method.baseline.kind", "distinct"),
    ("method.policy.ema_eta: {uniform: [0.5, 1.5]}", "params.method.policy.ema_eta", "1.5 is not a valid value"),
    ("method.baseline.kind: {choice: [ema, median]}", "params.method.baseline.kind", "'median' is not a valid"),
    ("method.policy.nope: {uniform: [0, 1]}", "params.method.policy.nope", "unknown key"),
    ("method.reward.weights: {choice: [1]}", "params.method.reward.weights", "not a valid value"),
])
def test_bad_distributions_are_spec_errors(search_spec, capsys, tmp_path, params, where, expected):
    spec = search_spec(space=f"params:\n  {params}\n")
    rc = sweep_main([str(spec), "--dry-run", "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "space.yaml" in err and where in err and expected in err, err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("space, expected", [
    ("params: {}\n", "non-empty `params:`"),
    ("method: clip_rl\nparams: {method.rl.lambda_rl: {uniform: [0, 1]}}\n", "method: this space is for 'clip_rl'"),
    ("prams: {}\nparams: {method.policy.ema_eta: {uniform: [0.5, 0.9]}}\n", "prams: unknown key"),
    ("params:\n  method.reward.weights: {choice: [null]}\n  method.reward.weights.iou: {uniform: [0, 1]}\n",
     "overlaps params.method.reward.weights"),
])
def test_bad_spaces_are_spec_errors(search_spec, space, expected):
    with pytest.raises(SpecError, match=r"space\.yaml: .*" + expected.replace("(", r"\(").replace("`", ".")):
        resolve(search_spec(space=space))


def test_bad_search_spec_keys(search_spec):
    with pytest.raises(SpecError, match=r"search\.yaml: scheduler\.kind: Input should be 'asha' or 'none'"):
        resolve(search_spec(spec=SPEC.replace("kind: asha", "kind: hyperband")))
    with pytest.raises(SpecError, match=r"search\.yaml: search: no search space file 'nowhere\.yaml'"):
        resolve(search_spec(spec=SPEC.replace("search: space.yaml", "search: nowhere.yaml")))
    with pytest.raises(SpecError, match=r"command line: confirm\.top_k: Input should be greater than or equal to 1"):
        resolve(search_spec(), overrides=["confirm.top_k=0"])
    with pytest.raises(SpecError, match=r"search\.yaml: rows: unknown key"):
        resolve(search_spec(spec=SPEC + "rows: [{name: a}]\n"))


def test_dry_run_shows_the_space_and_the_confirm_matrix(search_spec, capsys):
    rc = sweep_main([str(search_spec()), "--dry-run", "--profile", "tiny", "num_samples=8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "search: 8 trials" in out and "TPE (seed 0, 2 random first)" in out
    assert "asha (grace period 1 epochs, reduction factor 4, max 2 epochs)" in out
    assert "top 1 configs and the base config x seeds 0,1 = 4 trials" in out
    assert "method.policy.blocks" in out and "int [1, 5] step 2" in out and "choice ['ema', 'batch_mean']" in out


def test_rank_puts_full_length_trials_first_then_the_metric():
    recs = [{"row": "a", "status": "ok", "epochs": 1, "val/mIoU": 90.0},     # stopped early: not comparable
            {"row": "b", "status": "ok", "epochs": 4, "val/mIoU": 50.0},
            {"row": "c", "status": "ok", "epochs": 4, "val/mIoU": 60.0},
            {"row": "d", "status": "failed", "epochs": 4, "val/mIoU": 99.0},
            {"row": "e", "status": "ok", "epochs": 4, "val/mIoU": float("nan")}]
    assert [r["row"] for r in rank(recs, "val/mIoU", "max", 4)] == ["c", "b", "a"]
    assert [r["row"] for r in rank(recs, "val/mIoU", "min", 4)] == ["b", "c", "a"]


@pytest.mark.integration
def test_tiny_search_prunes_confirms_and_leaves_study_parquet_and_mlflow(search_spec, tmp_path):
    spec = search_spec()
    proc = subprocess.run([str(BIN / "rlseg-sweep"), str(spec), "--profile", "tiny", "--max-concurrent", "1",
                           "--results-dir", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "results" / "demo_search").iterdir()

    # the search phase: 4 trials, their sampled values as columns, ASHA stopped some after the grace period
    search = pd.read_parquet(run_dir / "search" / "trials.parquet")
    assert len(search) == 4 and set(search["status"]) == {"ok"}
    keys = ["method.policy.ema_eta", "method.loss.lambda_kl", "method.policy.blocks", "method.baseline.kind"]
    assert all(f"param/{k}" in search.columns for k in keys)
    for _, t in search.iterrows():   # the trial trained with the values it records
        cfg = json.loads(t["config_json"])
        assert cfg["method"]["policy"]["ema_eta"] == t["param/method.policy.ema_eta"]
        assert cfg["method"]["baseline"]["kind"] == t["param/method.baseline.kind"]
        assert cfg["seed"] == 0 and cfg["schedule"]["eval_every"] == 1
    stopped = search[search["stopped_early"]]
    assert len(stopped) >= 1 and set(stopped["epochs"]) == {1}
    assert set(search[~search["stopped_early"]]["epochs"]) == {2}

    # the Optuna study is in sqlite under the run folder, one trial per search trial, named by config path
    study = optuna.load_study(study_name="demo_search", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    assert len(study.trials) == 4 and all(set(t.params) == set(keys) for t in study.trials)
    assert sorted(round(t.params["method.policy.ema_eta"], 12) for t in study.trials) == sorted(
        round(v, 12) for v in search["param/method.policy.ema_eta"])

    # the confirm phase: base + the best full-length search config over seeds 0, 1, as an ablation table
    best = search[~search["stopped_early"]].sort_values("train/loss").iloc[0]
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert sorted(zip(trials["row"], trials["seed"])) == [
        ("base", 0), ("base", 1), (f"top-1: {best['row']}", 0), (f"top-1: {best['row']}", 1)]
    assert set(trials["status"]) == {"ok"}
    top = json.loads(trials[trials["row"] != "base"].iloc[0]["config_json"])
    assert top["method"]["policy"]["ema_eta"] == best["param/method.policy.ema_eta"]
    assert top["method"]["loss"]["lambda_kl"] == best["param/method.loss.lambda_kl"]
    table = (run_dir / "table.md").read_text()
    assert "| base " in table and f"top-1: {best['row']}" in table and "Optuna study 'demo_search'" in table
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {"optuna_history.png", "optuna_importances.png",
                                                                   "bars_train_loss.png"}

    # MLflow: one parent with the best values and the plots; 4 search + 4 confirm nested runs
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo_search").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["phase"] for r in nested) == ["confirm"] * 4 + ["search"] * 4
    assert all(r.info.status == "FINISHED" for r in nested)
    assert float(parent.data.params["best.method.policy.ema_eta"]) == pytest.approx(
        best["param/method.policy.ema_eta"])
    assert parent.data.tags["best_search_trial"] == best["row"] and parent.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optuna_history.png", "plots/optuna_importances.png"} <= arts


@pytest.mark.integration
def test_resume_continues_an_interrupted_search_without_rerunning_finished_trials(search_spec, tmp_path):
    import signal
    import time

    spec = search_spec()
    results = tmp_path / "results"
    cmd = [str(BIN / "rlseg-sweep"), str(spec), "--results-dir", str(results)]
    proc = subprocess.Popen(cmd + ["--profile", "tiny", "--max-concurrent", "1", "num_samples=3", "scheduler=none",
                                   "confirm={top_k: 1, seeds: [0]}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    search_parquet = lambda: next(results.glob("demo_search/*/search/trials.parquet"), None)  # noqa: E731
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:   # Ctrl-C once the first search trial has ended
        if search_parquet() is not None and len(pd.read_parquet(search_parquet())) >= 1:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    (run_dir,) = (results / "demo_search").iterdir()
    assert f"--resume {run_dir}" in err
    before = pd.read_parquet(run_dir / "search" / "trials.parquet")
    done_before = before[before["status"] == "ok"]
    assert 1 <= len(done_before) < 3

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert list((results / "demo_search").iterdir()) == [run_dir]          # the same run folder
    search = pd.read_parquet(run_dir / "search" / "trials.parquet")
    assert len(search) == 3 and set(search["status"]) == {"ok"}
    kept = search.set_index("trial_id").loc[done_before["trial_id"]]     # finished trials were not run again
    assert list(kept["wall_s"]) == list(done_before["wall_s"]) and list(kept["row"]) == list(done_before["row"])
    assert sorted(search["row"]) == ["search 01", "search 02", "search 03"]
    study = optuna.load_study(study_name="demo_search", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert sorted(trials["row"]) == ["base", trials[trials["row"] != "base"]["row"].item()]
    assert set(trials["status"]) == {"ok"}

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo_search").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    finished = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("phase") == "search"]
    assert sorted(r.data.tags["row"] for r in finished) == ["search 01", "search 02", "search 03"]   # each once
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_search_whose_trials_diverge_records_them_failed_without_retries(search_spec, tmp_path):
    """A diverged trial's last report is no epoch and has no metric: Tune, which stops a whole search on a result
    without the searcher's or scheduler's metric, never sees it; the trial fails with TrainingDiverged, once."""
    space = SPACE.replace("params:\n", "params:\n  schedule.lr: {loguniform: [1.0e+29, 1.0e+30]}\n")
    spec = search_spec(space=space, spec=SPEC.replace("num_samples: 4", "num_samples: 2"))
    proc = subprocess.run([str(BIN / "rlseg-sweep"), str(spec), "--profile", "tiny", "--max-concurrent", "1",
                           "--results-dir", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "did not include the specified metric" not in proc.stderr
    (run_dir,) = (tmp_path / "results" / "demo_search").iterdir()
    search = pd.read_parquet(run_dir / "search" / "trials.parquet")
    assert list(search["status"]) == ["failed", "failed"], search["error"].tolist()
    assert all(e.startswith("TrainingDiverged: training loss became") for e in search["error"]), search["error"]
    assert list(search["epochs"]) == [0, 0]


@pytest.mark.integration
def test_resume_in_the_confirm_phase_keeps_the_search_and_the_ended_confirm_trials(search_spec, tmp_path):
    """Ctrl-C once the first confirm trial has ended, then --resume: the search is not run again (its Parquet and
    the Optuna study are as they were), the confirm trials that had ended are not retrained, the rest run, and
    MLflow has one parent and one FINISHED run per trial. In-process trials (resources.workers=0) keep it short."""
    import signal
    import time

    spec = search_spec()
    results = tmp_path / "results"
    cmd = [str(BIN / "rlseg-sweep"), str(spec), "--results-dir", str(results)]
    proc = subprocess.Popen(cmd + ["--profile", "tiny", "--max-concurrent", "1", "num_samples=2", "scheduler=none",
                                   "confirm={top_k: 1, seeds: [0, 1]}", "resources.workers=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    confirm_parquet = lambda: next(results.glob("demo_search/*/trials.parquet"), None)  # noqa: E731
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:   # Ctrl-C once the first confirm trial has ended
        if confirm_parquet() is not None and len(pd.read_parquet(confirm_parquet())) >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    (run_dir,) = (results / "demo_search").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["phase"] == "confirm"
    search_before = pd.read_parquet(run_dir / "search" / "trials.parquet")
    before = pd.read_parquet(run_dir / "trials.parquet")
    done_before = before[before["status"] == "ok"]
    assert len(search_before) == 2 and 1 <= len(done_before) < 4

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert list((results / "demo_search").iterdir()) == [run_dir]
    search = pd.read_parquet(run_dir / "search" / "trials.parquet")
    pd.testing.assert_frame_equal(search, search_before)                    # the search was not run again
    study = optuna.load_study(study_name="demo_search", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    assert len(study.trials) == 2
    trials = pd.read_parquet(run_dir / "trials.parquet")
    top = [r for r in trials["row"].unique() if r != "base"]
    assert len(top) == 1 and sorted(zip(trials["row"], trials["seed"])) == [("base", 0), ("base", 1), (top[0], 0),
                                                                           (top[0], 1)]
    assert set(trials["status"]) == {"ok"}
    kept = trials.set_index("trial_id").loc[done_before["trial_id"]]       # ended confirm trials: not retrained
    assert list(kept["wall_s"]) == list(done_before["wall_s"])
    assert list(kept["mlflow_run_id"]) == list(done_before["mlflow_run_id"])
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert len(epochs) == 8 and not epochs.duplicated(["trial_id", "epoch"]).any()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo_search").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    finished = [r for r in runs if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["phase"] for r in finished) == ["confirm"] * 4 + ["search"] * 2
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_search_trial_whose_sampled_values_do_not_fit_is_recorded_without_a_config(search_spec, tmp_path,
                                                                                       monkeypatch):
    """Sampled values the search config rejects: the trial's row and MLflow run say why and claim no config (not
    the search's base config, which the trial never trained). Real MLflow (a file store: no database to set up)."""
    from ray.tune.experiment import Trial

    from orchestrator import tracking
    from orchestrator.recorder import SweepRecorder
    from orchestrator.search import SearchCells
    from orchestrator.study import SAMPLED

    plan = resolve(search_spec(), "tiny", ["scheduler=none"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracker = tracking.Tracker((tmp_path / "mlruns").as_uri(), "demo_search", tmp_path / "mlartifacts")
    parent = tracker.start_sweep("sweep", {"sweep_id": "s"}, {})
    meta = {"spec": "demo_search", "metric": "train/loss", "mode": "min", "seeds": [0], "rows": [], "sweep_id": "s"}
    recorder = SweepRecorder(meta, tmp_path / "search", tracker, "s", None, total=1, cell_of=SearchCells(plan),
                             progress=False)
    trial = Trial("__fake", config={"trial": {"config": plan.search_config},
                                    SAMPLED: {"method.policy.blocks": "many"}}, stub=True)
    recorder.on_trial_start(0, [trial], trial)
    rec = recorder.trials[trial.trial_id]
    assert rec["config_json"] is None and rec["cell_key"] is None
    assert rec["error"].startswith("SpecError: sampled values: method.policy.blocks: Input should be a valid integer")
    assert json.loads(rec["params_json"]) == {"method.policy.blocks": "many"}
    run = tracker.client.get_run(rec["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert "method.name" not in run.data.params and run.data.params["row"] == "search 01"
    recorder.on_trial_complete(0, [trial], trial)      # (a stub Trial has no error file for on_trial_error)
    assert not tracker.offline
    row = pd.read_parquet(tmp_path / "search" / "trials.parquet").iloc[0]
    assert row["status"] == "failed" and row["config_json"] is None and row["row"] == "search 01"
