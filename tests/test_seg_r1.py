"""seg_r1 (Seg-R1's GRPO prompt policy for a frozen promptable segmenter): the segmenter stays frozen through RL,
GRPO's advantages / objective / k3 term against values computed independently (numpy, pysodmetrics), the format
check, the checkpoint obtained on first use, and the SAM 2 load path."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trainers.config import Config
from trainers.data import build_dataset
from trainers.loop import train_one_epoch
from trainers.methods import build_method
from trainers.methods.prompt_policy import parse
from trainers.methods.promptable_pretrain import SegmenterConfig
from trainers.methods.segmenter_cache import config_hash, pretrain_config, segmenter_checkpoint
from trainers.models.promptable import build_promptable
from trainers.optim import build_lr_schedule, build_optimizer
from trainers.rl import group_advantages, k3_kl
from trainers.runtime import Runtime

from conftest import SEG_TINY as SEG  # noqa: E402  (seg_checkpoint: conftest)


def _config(checkpoint: str, **method) -> Config:
    return Config.model_validate({
        "method": {"name": "seg_r1", "segmenter": {**SEG, "checkpoint": checkpoint},
                   "policy": {"bins": 8, "hidden": 16, "points": 1}, **method},
        "data": {"name": "synthetic_cod", "image_size": 32, "train_size": 16, "val_size": 4},
        "schedule": {"epochs": 1, "batch_size": 4, "lr": 0.01, "weight_decay": 0.0}})


def test_segmenter_frozen_through_rl_and_policy_trained(seg_checkpoint):
    cfg = _config(seg_checkpoint)
    torch.manual_seed(0)
    data = build_dataset(cfg.data, "train")
    model = build_method(cfg, data.num_classes, data.ignore_index)
    policy_before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    loader = DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    opt = build_optimizer(cfg.schedule, model)
    sched = build_lr_schedule(cfg.schedule, opt, len(loader))
    metrics = train_one_epoch(model, model, loader, opt, sched, cfg, Runtime(device=torch.device("cpu")))
    saved = torch.load(seg_checkpoint, weights_only=True)
    for name, p in model.segmenter.state_dict().items():
        assert torch.equal(p, saved[name]), f"segmenter {name} changed"          # bit-equal after RL
    assert all(not p.requires_grad and p.grad is None for p in model.segmenter.parameters())
    assert not model.segmenter.training                                          # eval mode inside model.train()
    assert not any(k.startswith("segmenter.") for k in model.checkpoint_state())
    assert any(not torch.equal(v, policy_before[k]) for k, v in model.policy.state_dict().items())
    assert metrics["rl/policy_grad_norm"] > 0 and 0 <= metrics["rl/format_valid"] <= 1


def test_grpo_advantages_and_k3_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2], [0.9, 0.5, 0.1, 0.5]])
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: constant -> 0; group 2: mean 0.5, std sqrt(0.32/3)
    s0, s2 = math.sqrt(1 / 3), math.sqrt(0.32 / 3)
    expected = [[0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4)], [0, 0, 0, 0],
                [0.4 / (s2 + 1e-4), 0, -0.4 / (s2 + 1e-4), 0]]
    assert torch.allclose(group_advantages(r), torch.tensor(expected), atol=1e-6)
    logp, logp_ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = [-0.5, 1.0, 0.0]                                          # logp_ref - logp
    assert torch.allclose(k3_kl(logp, logp_ref), torch.tensor([math.exp(x) - x - 1 for x in d]), atol=1e-6)


def test_seg_r1_objective_against_independent_rewards_and_gradient(seg_checkpoint):
    """One GRPO step: rewards recomputed with numpy IoU and pysodmetrics' S-measure, advantages with numpy
    (ddof 1), and the gradient of -mean_t(A logp) + beta mean_t(k3) built by hand, equal to the method's."""
    sod = pytest.importorskip("py_sod_metrics")
    cfg = _config(seg_checkpoint, loss={"kl_reference": "init", "beta_ref": 0.5},
                  reward={"iou": 0.7, "s_measure": 0.3, "format": 1.0})
    torch.manual_seed(1)
    data = build_dataset(cfg.data, "train")
    model = build_method(cfg, 2, 255)
    with torch.no_grad():                      # move the policy away from its reference so k3 is not 0
        for p in model.policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    images = torch.stack([data[i][0] for i in range(3)])
    masks = torch.stack([data[i][1] for i in range(3)])
    g = cfg.method.baseline.group_size
    torch.manual_seed(5)
    out = model(images, masks)
    model.policy.zero_grad()
    out["loss"].backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.policy.parameters()]

    torch.manual_seed(5)                       # the same rollout: act is the first draw of the step
    emb = model.segmenter.embed_image(images)
    feats = model.policy.features(emb)
    values = model.policy.act(feats, g)
    pred, valid = model.masks_for(emb.repeat_interleave(g, 0), values, masks.shape[-2:])
    gt = masks.repeat_interleave(g, 0).numpy() == 1
    rewards = []
    for p_i, g_i, v in zip(pred.numpy(), gt, valid.numpy()):
        union = (p_i | g_i).sum()
        iou = (p_i & g_i).sum() / union if union else 1.0
        sm = sod.Smeasure()
        sm.step((p_i * 255).astype(np.uint8), (g_i * 255).astype(np.uint8))
        rewards.append(float(v) * (0.7 * iou + 0.3 * sm.sms[-1]) + 1.0 * float(v))
    r = np.array(rewards).reshape(-1, g)
    assert out["rl/reward"].item() == pytest.approx(r.mean(), abs=1e-5)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)

    model.policy.zero_grad()
    logp = model.policy.log_prob(feats, values)
    with torch.no_grad():
        logp_ref = model.ref_policy.log_prob(model.ref_policy.features(emb), values)
    x = logp_ref - logp
    surrogate = -(torch.as_tensor(adv, dtype=torch.float32)[:, None] * logp).mean() + 0.5 * (x.exp() - x - 1).mean()
    surrogate.backward()
    for mine, ref in zip(grads, (torch.zeros_like(p) if p.grad is None else p.grad for p in model.policy.parameters())):
        assert torch.allclose(mine, ref, atol=1e-6, rtol=1e-4)
    assert out["rl/kl_ref"].item() == pytest.approx((x.exp() - x - 1).mean().item(), rel=1e-5)


def test_token_policy_teacher_forcing_reproduces_sampling(seg_checkpoint):
    model = build_method(_config(seg_checkpoint), 2, 255)
    feats = model.policy.features(torch.randn(2, 16, 8, 8))
    torch.manual_seed(3)
    tokens, logp_sampled = model.policy.run_tokens(feats, 6, None)
    assert torch.allclose(model.policy.log_prob(feats, model.policy.values(tokens)), logp_sampled, atol=1e-6)


def test_format_check_and_invalid_prompts_get_no_mask(seg_checkpoint):
    # one box (x1, y1, x2, y2) + one point (x, y, label) per row
    values = torch.tensor([[0.1, 0.1, 0.6, 0.7, 0.3, 0.3, 1.0],     # valid
                           [0.5, 0.1, 0.5, 0.7, 0.3, 0.3, 1.0],     # degenerate: x2 == x1
                           [0.6, 0.1, 0.2, 0.7, 0.3, 0.3, 1.0],     # inverted
                           [0.1, 0.1, 0.6, 0.7, 1.2, 0.3, 0.0]])    # point outside the image
    assert parse(values, 1, 1, 1 / 16).valid.tolist() == [True, False, False, False]
    model = build_method(_config(seg_checkpoint), 2, 255)
    emb = model.segmenter.embed_image(torch.randn(1, 3, 32, 32)).expand(4, -1, -1, -1)
    pred, valid = model.masks_for(emb, values, (32, 32))
    assert valid.tolist() == [True, False, False, False] and not pred[1:].any()


def test_segmenter_checkpoint_trained_once_into_the_cache(tmp_path):
    cfg = Config.model_validate({
        "method": {"name": "seg_r1", "segmenter": SEG, "pretrain": {"cache_dir": str(tmp_path)}},
        "data": {"name": "synthetic_cod", "image_size": 32, "train_size": 16, "val_size": 4},
        "schedule": {"batch_size": 16}})
    torch.manual_seed(11)
    random.seed(11)
    path = segmenter_checkpoint(cfg.method, cfg.data)
    after = (torch.rand(3), random.random())
    torch.manual_seed(11)
    random.seed(11)
    assert (torch.rand(3).tolist(), random.random()) == (after[0].tolist(), after[1])   # caller's RNG untouched
    mtime = Path(path).stat().st_mtime_ns
    assert Path(path).parent.parent == tmp_path / "promptable"
    assert segmenter_checkpoint(cfg.method, cfg.data) == path and Path(path).stat().st_mtime_ns == mtime   # cached
    model = build_method(cfg, 2, 255)                               # loads it
    assert torch.equal(model.segmenter.state_dict()["mask_token"], torch.load(path)["mask_token"])
    # the cache key is the resolved pretraining config: another segmenter shape or other data, another file
    wider = cfg.method.model_copy(update={"segmenter": SegmenterConfig(**{**SEG, "dim": 24})})
    other_data = cfg.data.model_copy(update={"seed": 1})
    keys = {config_hash(pretrain_config(m, d)) for m, d in [(cfg.method, cfg.data), (wider, cfg.data),
                                                             (cfg.method, other_data)]}
    assert len(keys) == 3 and Path(path).parent.name in keys


def test_sam2_load_path_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="method.segmenter.checkpoint"):
        build_promptable(SegmenterConfig(name="sam2.1_hiera_large"))
    ckpt = tmp_path / "sam2.1_hiera_large.pt"
    ckpt.write_bytes(b"not used")
    try:
        import sam2  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="`sam2` package"):
            build_promptable(SegmenterConfig(name="sam2.1_hiera_large", checkpoint=str(ckpt)))
    with pytest.raises(ValueError, match="unknown promptable segmenter"):
        SegmenterConfig(name="sam3")
