"""trainers.loop.fit without Ray: determinism, resume from a checkpoint, divergence, reports."""
import math

import pytest
import torch

from conftest import tiny
from trainers.loop import TrainingDiverged, fit


def run(cfg):
    """fit, keeping each report's metrics and a copy of its checkpoint state as a file would hold it."""
    reports = []
    final = fit(cfg, lambda m, state: reports.append((dict(m), torch.load(_roundtrip(state), weights_only=False))))
    return final, reports


def test_same_seed_same_final_metrics():
    a, reports = run(tiny(seed=3))
    b, _ = run(tiny(seed=3))
    timing = ("time/", "train/images_per_s")
    assert {k: v for k, v in a.items() if not k.startswith(timing)} == \
        {k: v for k, v in b.items() if not k.startswith(timing)}
    c, _ = run(tiny(seed=4))
    assert c["train/loss"] != a["train/loss"]


def test_reports_once_per_epoch_with_checkpoint_state():
    final, reports = run(tiny(schedule={"epochs": 3}))
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    m, state = reports[-1]
    assert state["epoch"] == 3 and set(state) >= {"model", "optimizer", "lr_schedule", "rng"}
    assert 0 <= m["val/mIoU"] <= 100 and 0 <= m["val/pixel_acc"] <= 100
    assert any(k.startswith("val/IoU/") for k in m)
    assert math.isfinite(m["train/loss"]) and m["train/images_per_s"] > 0


def test_eval_every_skips_validation_but_not_the_last_epoch():
    _, reports = run(tiny(schedule={"epochs": 3, "eval_every": 2}))
    assert ["val/mIoU" in m for m, _ in reports] == [False, True, True]


def test_resume_from_epoch_checkpoint_matches_uninterrupted():
    cfg = tiny(schedule={"epochs": 3})
    full, reports = run(cfg)
    resumed = fit(cfg, state=reports[0][1])   # the epoch-1 checkpoint
    assert resumed["train/loss"] == full["train/loss"]
    assert resumed["val/mIoU"] == full["val/mIoU"]


def _roundtrip(state):
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_nan_loss_raises_training_diverged():
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        fit(tiny(schedule={"lr": 1e30}))


def test_dice_term_is_logged_when_configured():
    final, _ = run(tiny(method={"name": "supervised", "seg_loss": {"ce": 1.0, "dice": 1.0}}, schedule={"epochs": 1}))
    assert "train/loss_dice" in final
    assert final["train/loss"] == pytest.approx(final["train/loss_ce"] + final["train/loss_dice"], rel=1e-5)


def test_latent_rl_preset_trains_and_resumes_exactly(tmp_path):
    """The shipped latent_rl preset on a tiny embedded default: finite RL terms, the policy moves, the old policy
    and the EMA baseline survive a checkpoint (resume from epoch 1 == the uninterrupted run)."""
    import yaml

    from conftest import REPO

    preset = yaml.safe_load((REPO / "trainers" / "presets" / "latent_rl.yaml").read_text())
    cfg = tiny(method=preset["method"])
    cfg["method"]["policy"]["pool"] = [2, 2]
    final, reports = run(cfg)
    for key in ("train/loss_policy", "train/loss_kl", "train/reward", "rl/clipfrac", "rl/zero_grad_frac", "rl/policy_grad_norm", "val/mIoU"):
        assert math.isfinite(final[key]), key
    (_, first), (_, last) = reports
    moved = [k for k, v in last["model"].items() if k.startswith("policy.") and v.is_floating_point()
             and not torch.equal(v, first["model"][k])]
    assert moved, "the policy did not train"
    assert "baseline.b" in last["model"] and any(k.startswith("old_policy.") for k in last["model"])
    resumed = fit(cfg, lambda m, s: None, state=first)
    timing = ("time/", "train/images_per_s")
    assert {k: v for k, v in resumed.items() if not k.startswith(timing)} == \
        {k: v for k, v in final.items() if not k.startswith(timing)}
