"""One real step of the paper profile (`rlseg-sweep ablations/reward.yaml --profile paper`) on CPU: the resolved
FCN row, SSSegmentation's recipe at 512 x 512 crops on a tiny VOC fixture, through trainers.loop.fit."""
from __future__ import annotations

import math

from test_voc import make_voc


def test_paper_profile_trains_one_step_at_512(repo, tmp_path):
    from orchestrator.spec import resolve
    from trainers.loop import fit

    root = make_voc(tmp_path / "data")
    # CPU-sized: random init (no download), one worker (SyncBN needs CUDA), 2 images, 1 step; validation resized to
    # (64, 32) keep-ratio instead of (2048, 512), so the val forward stays small (the protocol is the same); fp32
    # NCHW: bf16 convolutions on a CPU without bf16 units took > 10 min for this step (measured, 2 shared cores)
    plan = resolve(repo / "ablations" / "reward.yaml", profile="paper", overrides=[
        f"data.root={root}", "model.pretrained=null", "resources.workers=1", "resources.gpus_per_worker=0",
        "data.num_workers=0", "data.train_size=2", "data.val_size=1", "data.val_resize=[64, 32]",
        "schedule.batch_size=2", "schedule.epochs=1", "schedule.precision=fp32", "schedule.channels_last=false"])
    cfg = plan.rows[0].config                       # FCN (supervised): the recipe without the RL module
    assert cfg["model"]["encoder"] == "resnet50c_d8" and cfg["model"]["aux_head"]["enabled"]
    assert cfg["data"]["image_size"] == 512 and cfg["data"]["cat_max_ratio"] == 0.75 and cfg["data"]["photometric"]
    metrics = fit(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/loss_aux"])
    assert 0 <= metrics["val/mIoU"] <= 100


def test_paper_profile_dry_run_shows_the_recipe(repo, tmp_path, capsys):
    """`rlseg-sweep ablations/reward.yaml --profile paper data.root=<fixture> --dry-run` names every switch."""
    from orchestrator.cli import sweep_main

    root = make_voc(tmp_path / "data")
    rc = sweep_main([str(repo / "ablations" / "reward.yaml"), "--profile", "paper", f"data.root={root}",
                     "--debug-skip-plan-check", "--dry-run"])    # the fixture is too small for the paper's batches
    out = capsys.readouterr().out
    assert rc == 0, out
    recipe = next(line for line in out.splitlines() if line.startswith("recipe: "))
    for switch in ("resnet50c_d8", "aux head 0.4", "SyncBN", "photometric", "crop 512 cat_max_ratio 0.75",
                   "resize (2048, 512) x [0.5, 2.0]", "val_resize (2048, 512)", "bf16 channels_last"):
        assert switch in recipe, (switch, recipe)
