"""Nothing lost: a trial whose worker fails mid-run resumes from its last epoch checkpoint and ends exactly where an
uninterrupted run ends. Fast tests drive trainers.loop.fit and the debug.fault hook without Ray; the integration
tests run real sweeps (orchestrator.sweep.run_sweep -> Tune -> TorchTrainer) with an injected worker death."""
import io
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, tiny
from trainers.config import Config
from trainers.loop import (DIVERGED_FILE, InjectedFaultError, TrainingDiverged, fit, read_checkpoint,
                           write_checkpoint)

TIMING = ("time/", "train/images_per_s")     # wall-clock measurements: the only metrics allowed to differ


def _saved(state: dict) -> dict:
    """The state as a checkpoint file gives it back (torch.save + torch.load)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def run(cfg, state=None):
    """fit(cfg) -> (final metrics or the exception it raised, [(metrics, saved state)] per reported epoch)."""
    reports = []
    try:
        final = fit(cfg, lambda m, s: reports.append((dict(m), _saved(s))), state=state)
    except Exception as e:   # noqa: BLE001 - the tests assert on which one
        final = e
    return final, reports


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


def preset(name: str, **over) -> dict:
    """A shipped preset's method and model on the tiny data and schedule."""
    p = yaml.safe_load((REPO / "trainers" / "presets" / f"{name}.yaml").read_text())
    cfg = tiny(method=p["method"], model=p.get("model", {}), **over)
    if name == "latent_rl":
        cfg["method"]["policy"]["pool"] = [2, 2]
    if name == "clip_rl":
        cfg["data"]["image_size"] = 64     # its ViT's positional embedding fixes the input size
    return cfg


def fault(kind, epoch, step=0, rank=0):
    return {"fault": {"kind": kind, "epoch": epoch, "step": step, "rank": rank}}


# --- without Ray -----------------------------------------------------------------------------------------------

def test_nan_fault_raises_training_diverged_in_that_epoch():
    final, reports = run(tiny(schedule={"epochs": 3}, debug=fault("nan", 2, step=1)))
    assert isinstance(final, TrainingDiverged) and "in epoch 2" in str(final)
    assert [m["epoch"] for m, _ in reports] == [1]


def test_checkpoint_of_a_diverged_run_raises_again(tmp_path):
    """The last checkpoint of a Ray Train run that diverged holds the reason instead of a state (train_worker)."""
    (tmp_path / DIVERGED_FILE).write_text("training loss became nan in epoch 2")
    with pytest.raises(TrainingDiverged, match="^training loss became nan in epoch 2$"):
        read_checkpoint(str(tmp_path), rank=1)


def test_raise_fault_names_where_it_struck():
    final, reports = run(tiny(schedule={"epochs": 3}, debug=fault("raise", 3, step=2)))
    assert isinstance(final, InjectedFaultError)
    assert str(final) == "debug.fault: injected failure in epoch 3 step 2 on rank 0"
    assert [m["epoch"] for m, _ in reports] == [1, 2]


def test_fault_on_another_rank_does_not_fire_on_this_one():
    cfg = tiny(debug=fault("raise", 1, rank=1), resources={"workers": 2})
    final, reports = run(cfg)      # fit() is one process: rank 0
    assert isinstance(final, dict) and len(reports) == 2


@pytest.mark.parametrize("name", ["supervised", "latent_rl", "clip_rl"])
def test_resume_after_a_fault_ends_as_the_uninterrupted_run(name):
    """The fault strikes in epoch 3 after the epoch-2 checkpoint; fit resumed from that checkpoint (the fault still
    configured: it does not fire again) ends with bit-identical metrics and weights. latent_rl carries the EMA old
    policy, the EMA reward baseline and Gaussian sampling; clip_rl an EMA baseline, categorical actions and a
    curriculum, so the model buffers and the RNG state must all come back."""
    cfg = preset(name, schedule={"epochs": 4})
    full, full_reports = run(cfg)
    assert isinstance(full, dict), full

    faulty = {**cfg, "debug": fault("raise", 3, step=1)}
    failed, reports = run(faulty)
    assert isinstance(failed, InjectedFaultError)
    assert [m["epoch"] for m, _ in reports] == [1, 2]

    resumed, resumed_reports = run(faulty, state=reports[-1][1])
    assert isinstance(resumed, dict), resumed
    assert [m["epoch"] for m, _ in resumed_reports] == [3, 4]
    assert comparable(resumed) == comparable(full)
    for (a, sa), (b, sb) in zip(resumed_reports, full_reports[2:]):
        assert comparable(a) == comparable(b)
        assert sa["model"].keys() == sb["model"].keys()
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]), "weights differ"
    if name != "supervised":
        assert "baseline.b" in sb["model"] and bool(sb["model"]["baseline.initialised"])


def test_fault_fires_only_in_an_attempt_without_a_checkpoint():
    """The rule of debug.fault: a run resumed from any checkpoint, before the fault epoch or after it, runs on."""
    cfg = tiny(schedule={"epochs": 3})
    _, reports = run(cfg)
    faulty = {**cfg, "debug": fault("raise", 2)}
    for m, state in reports[:2]:          # the epoch-1 checkpoint (before the fault epoch) and the epoch-2 one
        final, later = run(faulty, state=state)
        assert isinstance(final, dict), f"fired after resuming from epoch {m['epoch']}: {final}"
        assert [r["epoch"] for r, _ in later] == list(range(m["epoch"] + 1, 4))
    assert isinstance(run(faulty)[0], InjectedFaultError)   # a fresh attempt: it fires


def test_exit_fault_ends_the_process_like_a_kill():
    """`python -m trainers.loop` (no Ray) with an exit fault: exit status 1 in epoch 2, no traceback, epoch 1 done."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.loop", "data.image_size=32", "data.train_size=32", "data.val_size=16",
         "schedule.batch_size=8", "schedule.epochs=3", "debug.fault.kind=exit", "debug.fault.epoch=2"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "debug.fault: ending the worker process in epoch 2 step 0 on rank 0" in proc.stderr
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == ["epoch=1"]


def test_fault_that_could_never_fire_is_a_config_error():
    with pytest.raises(ValueError, match=r"debug.fault.epoch: 5 is after the last epoch"):
        Config.model_validate(tiny(schedule={"epochs": 4}, debug=fault("exit", 5)))
    with pytest.raises(ValueError, match=r"debug.fault.rank: 1 but there are only 1 rank"):
        Config.model_validate(tiny(debug=fault("exit", 1, rank=1)))
    with pytest.raises(ValueError, match="kind"):
        Config.model_validate(tiny(debug={"fault": {"kind": "segfault"}}))
    with pytest.raises(ValueError, match=r"debug.fault.step: 4 but an epoch has only 4 steps"):
        fit(tiny(debug=fault("nan", 1, step=4)))   # 32 images, batch 8
    assert Config().debug.fault.kind == "none" and Config().resources.max_failures == 2


def test_every_rank_resumes_its_own_rng_state(tmp_path):
    """Train V2 merges every rank's checkpoint files into one folder: rank 0's state.pt, rank r's rng/rank<r>.pt."""
    states = []
    fit(tiny(schedule={"epochs": 1}), lambda m, s: states.append(s))
    rank0 = states[0]
    rank1 = {**rank0, "rng": {**rank0["rng"], "torch": torch.manual_seed(123).get_state()}}
    write_checkpoint(str(tmp_path), rank0, rank=0)
    write_checkpoint(str(tmp_path), rank1, rank=1)
    assert torch.equal(read_checkpoint(str(tmp_path), 0)["rng"]["torch"], rank0["rng"]["torch"])
    assert torch.equal(read_checkpoint(str(tmp_path), 1)["rng"]["torch"], rank1["rng"]["torch"])
    assert not torch.equal(rank0["rng"]["torch"], rank1["rng"]["torch"])
    assert read_checkpoint(str(tmp_path), 1)["epoch"] == 1


# --- real Ray: orchestrator.sweep.run_sweep -> Tune -> TorchTrainer ---------------------------------------------

TINY4 = {"data": {"image_size": 32, "train_size": 32, "val_size": 16}, "schedule": {"epochs": 4, "batch_size": 8}}


@pytest.fixture(scope="module", params=["torch_trainer", "in_process"])
def fault_sweep(tmp_path_factory, request):
    """One real sweep of one seed, four rows (Ray start-up is paid once), on each trial path: `clean` never fails;
    `killed` loses its process in epoch 3, after the epoch-2 checkpoint, and is restarted from that checkpoint
    (resources.max_failures: 2, the default; by Ray Train on the torch_trainer path, by Tune in process); `raises`
    raises in epoch 2 with no retry allowed; `diverges` gets a NaN loss in epoch 2 and, retries allowed, is not
    retried (a retry from the epoch-1 checkpoint would run without the fault and end ok)."""
    from orchestrator.spec import resolve
    from orchestrator.sweep import run_sweep

    tmp_path = tmp_path_factory.mktemp("faults")
    spec = tmp_path / "faults.yaml"
    base = {**TINY4, "resources": {"trial_path": request.param}}
    spec.write_text(yaml.safe_dump({"name": "faults", "seeds": [0], "base": base, "rows": [
        {"name": "clean"},
        {"name": "killed", "set": {"debug.fault": {"kind": "exit", "epoch": 3}}},
        {"name": "raises", "set": {"resources.max_failures": 0, "debug.fault": {"kind": "raise", "epoch": 2}}},
        {"name": "diverges", "set": {"debug.fault": {"kind": "nan", "epoch": 2}}},
    ]}, sort_keys=False))
    outcome = run_sweep(resolve(spec), results_root=tmp_path / "results", verbose=0)
    trials = pd.read_parquet(outcome.run_dir / "trials.parquet").set_index("row")
    epochs = pd.read_parquet(outcome.run_dir / "epochs.parquet")
    return outcome, trials, epochs, request.param


@pytest.mark.integration
def test_killed_worker_is_retried_from_its_checkpoint_and_ends_as_if_never_killed(fault_sweep):
    outcome, trials, epochs, path = fault_sweep
    killed, clean = trials.loc["killed"], trials.loc["clean"]
    assert (clean["status"], killed["status"]) == ("ok", "ok"), killed["error"]
    assert killed["epochs"] == 4 and killed["trial_path"] == clean["trial_path"] == path
    metrics = [c for c in trials.columns if c.startswith(("train/", "val/")) and not c.startswith(TIMING)]
    assert {"val/mIoU", "train/loss", "train/lr"} <= set(metrics)
    assert {m: killed[m] for m in metrics} == {m: clean[m] for m in metrics}

    killed_epochs = epochs[epochs["trial_id"] == killed["trial_id"]].sort_values("epoch")
    clean_epochs = epochs[epochs["trial_id"] == clean["trial_id"]].sort_values("epoch")
    assert list(killed_epochs["epoch"]) == [1, 2, 3, 4]
    assert list(killed_epochs["val/mIoU"]) == list(clean_epochs["val/mIoU"])

    # the final checkpoint's rank record says where the last attempt started: the epoch-2 checkpoint
    def last_attempt_start(trial_id: str) -> int:    # train-<id>/ (TorchTrainer) or tune/<row>-seed0-<id>/ (Tune)
        (record,) = (r for r in (outcome.run_dir / "ray").rglob("checkpoint_*/ranks/rank0.json") if trial_id in str(r))
        return json.loads(record.read_text())["resumed_from_epoch"]
    assert last_attempt_start(killed["trial_id"]) == 2
    assert last_attempt_start(clean["trial_id"]) == 0


@pytest.mark.integration
def test_failure_without_retries_fails_the_trial_and_the_sweep_goes_on(fault_sweep):
    outcome, trials, epochs, _ = fault_sweep
    raises = trials.loc["raises"]
    assert raises["status"] == "failed"
    assert raises["error"] == "InjectedFaultError: debug.fault: injected failure in epoch 2 step 0 on rank 0"
    assert raises["epochs"] == 1
    assert list(epochs[epochs["trial_id"] == raises["trial_id"]]["epoch"]) == [1]
    assert sorted(r["row"] for r in outcome.failed) == ["diverges", "raises"]
    assert trials.loc["clean", "status"] == "ok" and trials.loc["clean", "epochs"] == 4


@pytest.mark.integration
def test_divergence_fails_the_trial_at_once_without_retries(fault_sweep):
    outcome, trials, epochs, path = fault_sweep
    diverges = trials.loc["diverges"]
    assert diverges["status"] == "failed" and diverges["trial_path"] == path
    assert diverges["error"] == "TrainingDiverged: training loss became nan in epoch 2"
    assert diverges["epochs"] == 1      # the divergence report is not an epoch
    assert list(epochs[epochs["trial_id"] == diverges["trial_id"]]["epoch"]) == [1]
