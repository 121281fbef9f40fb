"""Real tiny searches (Ray Tune + OptunaSearch, in-process trials) of a conditional space: what the study, Parquet and
MLflow hold, the importances and plots, reproducibility at --max-concurrent 1, and a multi-objective search whose
Pareto configs are confirmed."""
import json
import math
import subprocess
import textwrap

import mlflow
import optuna
import pandas as pd
import pytest

from conftest import BIN

SPACE = textwrap.dedent("""
    method: latent_rl
    params:
      method.baseline.kind: {choice: [ema, batch_mean]}
      method.baseline.tau: {momentum: [0.5, 0.999], when: {method.baseline.kind: ema}}
      method.policy.log_sigma_bound: {choice: [2.0, null]}
      method.loss.lambda_kl: {loguniform: [0.01, 10]}
""")

SPEC = textwrap.dedent("""
    name: cond_search
    metric: {name: train/loss, mode: min}   # at this size val/mIoU ties (one class); the loss tells configs apart
    base: latent_rl
    profiles:
      tiny: {data: {image_size: 32, train_size: 32, val_size: 16}, schedule: {epochs: 2, batch_size: 8},
             resources: {workers: 0}}
    search: space.yaml
    num_samples: 5
    sampler: {seed: 0, n_startup_trials: 2}
    scheduler: none
    confirm: {top_k: 1, seeds: [0]}
""")


def _run(spec, results, *args):
    proc = subprocess.run([str(BIN / "rlseg-sweep"), str(spec), "--profile", "tiny", "--max-concurrent", "1",
                           "--results-dir", str(results), *args],
                          capture_output=True, text=True, timeout=900, cwd=spec.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _study(run_dir, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'optuna.db'}")


@pytest.mark.integration
def test_conditional_search_records_only_used_parameters_logs_importances_and_repeats_itself(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "search.yaml").write_text(SPEC)
    first = _run(tmp_path / "search.yaml", tmp_path / "a")
    (run_dir,) = (tmp_path / "a" / "cond_search").iterdir()

    # study and Parquet: tau only where the baseline is ema (the study holds 1 - tau, log-scaled)
    study = _study(run_dir, "cond_search")
    search = pd.read_parquet(run_dir / "search" / "trials.parquet").sort_values("row")
    assert len(study.trials) == 5 and len(search) == 5 and set(search["status"]) == {"ok"}
    kinds = [t.params["method.baseline.kind"] for t in study.trials]
    assert set(kinds) == {"ema", "batch_mean"}, kinds          # both branches ran (seed 0)
    for t in study.trials:
        assert ("1 - method.baseline.tau" in t.params) == (t.params["method.baseline.kind"] == "ema"), t.params
    for _, r in search.iterrows():
        used = json.loads(r["params_json"])
        cfg = json.loads(r["config_json"])
        ema = r["param/method.baseline.kind"] == "ema"
        assert ("method.baseline.tau" in used) == ema and (not pd.isna(r["param/method.baseline.tau"])) == ema
        if ema:
            assert cfg["method"]["baseline"]["tau"] == r["param/method.baseline.tau"]
        else:   # the config keeps the base value, which the trial did not use
            assert cfg["method"]["baseline"]["tau"] == 0.9
        assert cfg["method"]["policy"]["log_sigma_bound"] == used["method.policy.log_sigma_bound"]   # null: unbounded

    # MLflow: each search run holds the parameters it used, and only those; importances on the parent
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cond_search").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    for r in (r for r in runs if r.data.tags.get("phase") == "search"):
        used = {k for k in r.data.params if k.startswith("search.")}
        row = search[search["mlflow_run_id"] == r.info.run_id].iloc[0]
        assert used == {f"search.{k}" for k in json.loads(row["params_json"])}
    importances = json.loads((run_dir / "importances.json").read_text())["train/loss"]
    assert set(importances) >= {"method.baseline.kind", "method.policy.log_sigma_bound", "method.loss.lambda_kl"}
    assert math.isclose(sum(importances.values()), 1.0, abs_tol=1e-6)
    logged = {k: v for k, v in parent.data.metrics.items() if k.startswith("importance/train/loss/")}
    assert logged == pytest.approx({f"importance/train/loss/{k}": v for k, v in importances.items()})
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optuna_importances.png", "plots/optuna_slice.png", "plots/optuna_contour.png"} <= arts
    assert {"optuna_slice.png", "optuna_contour.png"} <= {p.name for p in (run_dir / "plots").glob("*.png")}
    table = (run_dir / "table.md").read_text()
    assert "importance (fANOVA) for train/loss" in table and "optuna-dashboard sqlite:///" in first.stdout + table

    # the same spec at --max-concurrent 1 samples the same configs again: its first 3 (2 random, then TPE's)
    _run(tmp_path / "search.yaml", tmp_path / "b", "num_samples=3")
    (again,) = (tmp_path / "b" / "cond_search").iterdir()
    assert [t.params for t in _study(again, "cond_search").trials] == [t.params for t in study.trials[:3]]
    second = pd.read_parquet(again / "search" / "trials.parquet").sort_values("row")
    assert list(second["params_json"]) == list(search["params_json"])[:3]


MO_SPEC = SPEC.replace("name: cond_search", "name: mo_search").replace(
    "metric: {name: train/loss, mode: min}   # at this size val/mIoU ties (one class); the loss tells configs apart",
    "objectives: [train/loss min, time/epoch_s min]").replace("scheduler: none\n", "").replace(
    "confirm: {top_k: 1, seeds: [0]}", "confirm: {top_k: 3, seeds: [0]}").replace("num_samples: 5", "num_samples: 3")


@pytest.mark.integration
def test_multi_objective_search_confirms_its_pareto_configs(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "search.yaml").write_text(MO_SPEC)
    _run(tmp_path / "search.yaml", tmp_path / "results")
    (run_dir,) = (tmp_path / "results" / "mo_search").iterdir()
    study = _study(run_dir, "mo_search")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]

    search = pd.read_parquet(run_dir / "search" / "trials.parquet")
    assert len(search) == 3 and set(search["status"]) == {"ok"}
    points = {r["row"]: (r["train/loss"], r["time/epoch_s"]) for _, r in search.iterrows()}
    front = {a for a, p in points.items()     # not dominated: no other trial at least as good on both, better on one
             if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for b, q in points.items() if b != a)}
    assert front and {json.dumps(t.params, sort_keys=True) for t in study.best_trials} == {
        json.dumps(t.params, sort_keys=True) for t in study.trials
        if any(math.isclose(t.values[0], points[r][0]) and math.isclose(t.values[1], points[r][1]) for r in front)}

    trials = pd.read_parquet(run_dir / "trials.parquet")
    confirmed = {row.split(": ", 1)[1] for row in trials["row"] if row != "base"}
    assert confirmed == front and all(row.startswith(("base", "pareto-")) for row in trials["row"])
    assert set(trials["status"]) == {"ok"} and len(trials) == len(front) + 1
    for _, r in trials[trials["row"] != "base"].iterrows():   # each confirm row trains its Pareto config
        src = search[search["row"] == r["row"].split(": ", 1)[1]].iloc[0]
        assert json.loads(r["config_json"])["method"] == {**json.loads(src["config_json"])["method"]}
    assert (run_dir / "plots" / "optuna_pareto.png").exists()
    imp = json.loads((run_dir / "importances.json").read_text())
    assert set(imp) == {"train/loss", "time/epoch_s"}
