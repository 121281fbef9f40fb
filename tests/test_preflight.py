"""Fail fast (issue 16): what would hang or fail a sweep later is one line before anything starts, in --dry-run too;
a trial that waits for resources it cannot get says so and ends the sweep at --pending-timeout."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import sweep_main
from orchestrator.preflight import fits, local_nodes

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sweep(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = sweep_main(list(argv))
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def one_line_both_ways(tmp_path, *argv: str) -> str:
    """rlseg-sweep ARGV and rlseg-sweep ARGV --dry-run: exit 2, the same single line, no traceback, nothing written."""
    results = tmp_path / "results"
    rc, out, err = sweep(*argv, "--results-dir", str(results))
    rc_dry, out_dry, err_dry = sweep(*argv, "--dry-run", "--results-dir", str(results))
    assert (rc, out) == (2, ""), (rc, out, err)
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert (rc_dry, out_dry, err_dry) == (rc, out, err)
    assert not results.exists()
    return err.strip()


def test_more_workers_than_this_machine_has_cpus(tmp_path):
    cpus = int(local_nodes()[0]["CPU"])
    line = one_line_both_ways(tmp_path, str(REPO / "ablations/loss.yaml"), f"resources.workers={cpus + 1}",
                              "data.train_size=64")
    assert line == (f"rlseg-sweep: {REPO / 'ablations/loss.yaml'}: rows[0] (CE): resources.workers={cpus + 1} x "
                    f"resources.cpus_per_worker=1 = {cpus + 1} CPUs per trial, but this machine has {cpus} CPUs and "
                    f"{local_nodes()[0]['GPU']:g} GPUs (a local Ray; lower resources.*, or run on a cluster with "
                    f"--address)")


def test_paper_profile_with_a_missing_data_root(tmp_path):
    line = one_line_both_ways(tmp_path, str(REPO / "ablations/reward.yaml"), "--profile", "paper",
                              "data.root=/nonexistent", "seeds=[0]")
    assert line.startswith(f"rlseg-sweep: {REPO / 'ablations/reward.yaml'}: rows[0] (FCN): data.root: /nonexistent "
                           "does not exist or is not a folder (expected the PASCAL VOC 2012 layout"), line


def test_paper_profile_names_the_first_missing_folder_then_the_gpus(tmp_path):
    """With the VOC layout present but for one folder, the dataset's own check names it; with all of it, the next
    problem is the paper's 2 GPUs x 8 CPUs on this machine."""
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = "\n".join(f"2007_{i:06d}" for i in range(40)) + "\n"
    for name in ("train_aug.txt", "val.txt"):
        (voc / "ImageSets" / "Segmentation" / name).write_text(ids)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    argv = (str(REPO / "ablations/reward.yaml"), "--profile", "paper", f"data.root={tmp_path / 'data'}", "seeds=[0]")
    line = one_line_both_ways(tmp_path, *argv)
    assert "data.root: " in line and "has no VOCdevkit/VOC2012/SegmentationClassAug/" in line, line
    (voc / "SegmentationClassAug").mkdir()
    line = one_line_both_ways(tmp_path, *argv)
    machine = local_nodes()[0]
    if machine["GPU"] >= 2 and machine["CPU"] >= 16:
        pytest.skip("this machine has the paper's resources")
    assert line.endswith(f"rows[0] (FCN): resources.workers=2 x resources.cpus_per_worker=8 + "
                         f"resources.gpus_per_worker=1 = 16 CPUs and 2 GPUs per trial, but this machine has "
                         f"{machine['CPU']:g} CPUs and {machine['GPU']:g} GPUs (a local Ray; lower resources.*, or run "
                         f"on a cluster with --address)"), line


def test_search_grace_period_beyond_the_epochs(tmp_path):
    line = one_line_both_ways(tmp_path, str(REPO / "ablations/search_latent_rl.yaml"), "schedule.epochs=1",
                              "num_samples=2")
    assert line == (f"rlseg-sweep: {REPO / 'ablations/search_latent_rl.yaml'}: scheduler.grace_period: 2 is more than "
                    "schedule.epochs = 1 (ASHA's max_t: the epochs of a search trial); expected grace_period <= 1, "
                    "or scheduler: none")


def test_batch_size_beyond_a_ranks_share_of_the_data(tmp_path):
    line = one_line_both_ways(tmp_path, str(REPO / "ablations/loss.yaml"), "schedule.batch_size=1000",
                              "data.train_size=64")
    assert line == (f"rlseg-sweep: {REPO / 'ablations/loss.yaml'}: rows[0] (CE): schedule.batch_size: 1000 is larger "
                    "than a rank's share of the training data (64 images of synthetic_surgical over 1 rank(s) = 64); "
                    "expected at most 64")
    # two ranks halve the share: 40 fits 64 images on one rank, not 32 on each of two
    assert sweep(str(REPO / "ablations/loss.yaml"), "schedule.batch_size=40", "data.train_size=64", "--dry-run")[0] == 0
    line = one_line_both_ways(tmp_path, str(REPO / "ablations/loss.yaml"), "schedule.batch_size=40",
                              "data.train_size=64", "resources.workers=2")
    assert "schedule.batch_size: 40 is larger than a rank's share of the training data (64 images of " \
           "synthetic_surgical over 2 rank(s) = 32)" in line, line


def test_weights_file_metric_and_tracking_store(tmp_path, monkeypatch):
    loss = str(REPO / "ablations/loss.yaml")
    line = one_line_both_ways(tmp_path, loss, f"model.pretrained={tmp_path / 'missing.pth'}")
    assert f"rows[0] (CE): model.pretrained: no checkpoint file at {tmp_path / 'missing.pth'}" in line
    line = one_line_both_ways(tmp_path, loss, "metric.name=val/IoU/liver")
    assert line.startswith(f"rlseg-sweep: {loss}: metric.name: no trial reports 'val/IoU/liver'") and "thread" in line
    assert sweep(loss, "metric.name=val/IoU/thread", "--dry-run")[0] == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://x")
    line = one_line_both_ways(tmp_path, loss)
    assert line.startswith("rlseg-sweep: MLFLOW_TRACKING_URI (environment): 'nosuchstore://x': "), line


def test_a_method_with_its_own_validation_metrics_is_checked_against_them(tmp_path):
    """seg_r1 reports COD metrics (SegMethod.VAL_METRICS): its spec's val/S_measure passes, a name it does not
    report is one line listing what it does."""
    seg_r1 = str(REPO / "ablations/seg_r1.yaml")
    assert sweep(seg_r1, "--dry-run")[0] == 0
    line = one_line_both_ways(tmp_path, seg_r1, "metric.name=val/pixel_acc")
    assert "metric.name: no trial reports 'val/pixel_acc' (method seg_r1 reports val/S_measure" in line, line


def test_fits_places_bundles_on_nodes():
    assert fits([({"CPU": 1.0}, 2)], [{"CPU": 2.0}]) and not fits([({"CPU": 1.0}, 3)], [{"CPU": 2.0}])
    assert fits([({"CPU": 1.0}, 2)], [{"CPU": 1.0}, {"CPU": 1.0}])          # spread over two nodes
    assert not fits([({"CPU": 2.0}, 1)], [{"CPU": 1.0}, {"CPU": 1.0}])      # 2 in all, but no node has 2
    assert not fits([({"CPU": 1.0, "GPU": 1.0}, 1)], [{"CPU": 8.0, "GPU": 0.0}])
    assert fits([({"CPU": 1.0, "GPU": 0.5}, 2)], [{"CPU": 2.0, "GPU": 1.0}])   # fractional GPUs share one


def test_when_rays_autoscaler_api_cannot_be_read_one_line_names_the_error(monkeypatch, capsys):
    """A private Ray API that moved (a Ray upgrade, here without the method preflight reads) says so in one line
    naming the error, instead of a check that quietly stops checking."""
    from ray._private.state import GlobalState

    from orchestrator.preflight import autoscaler_max

    monkeypatch.delattr(GlobalState, "get_max_resources_from_cluster_config")
    assert autoscaler_max() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("warning: could not read what the cluster's autoscaler can reach"), err
    assert "AttributeError" in err and "get_max_resources_from_cluster_config" in err and "check" in err


@pytest.mark.integration
def test_a_trial_waiting_for_a_gpu_says_so_and_ends_at_the_pending_timeout(tmp_path):
    """An in-process trial that asks for a GPU on a CPU-only local Ray (the plan check skipped): the waiting line,
    exit 2 at --pending-timeout with it, and a run folder that --resume accepts."""
    if local_nodes()[0]["GPU"] > 0:
        pytest.skip("this machine has a GPU")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: wait\nbase: supervised\nseeds: [0]\nrows: [{name: gpu}]\n")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}
    cmd = [str(BIN / "rlseg-sweep"), str(spec), "resources.workers=0", "resources.gpus_per_worker=1",
           "data.train_size=16", "data.val_size=8", "data.image_size=32", "schedule.epochs=1",
           "--debug-skip-plan-check", "--pending-timeout", "4", "--results-dir", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    waiting = [ln for ln in proc.stderr.splitlines() if ln.startswith("waiting ")]
    assert len(waiting) == 1 and "'gpu | seed 0' asks {1 CPU, 1 GPU}" in waiting[0] and "GPUs" in waiting[0], \
        proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlseg-sweep: --pending-timeout 4 s: waiting ") and "--resume" in last, last
    assert "Traceback" not in proc.stderr
    run_dir = next((tmp_path / "results" / "wait").iterdir())
    state = json.loads((run_dir / "run.json").read_text())
    assert state.get("phase") != "done"
    from orchestrator.cli import _resumable
    from argparse import Namespace

    args = Namespace(spec=str(spec), profile=None, overrides=[], resume=str(run_dir), fill=None,
                     results_dir=str(tmp_path / "results"), max_concurrent=None)
    assert _resumable(args)[0] == run_dir
