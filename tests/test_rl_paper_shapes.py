"""The PPO term at the paper's own shapes: FCN-R50-D8 (d = 2048, a 64 x 64 latent from 512 x 512 crops), batch 2,
CPU, random weights, one step of the paper profile's method config (ablations/reward.yaml --profile paper). A term
that works at 64 px can be inert here: the image-level log-ratio sums 2048 * 64 * 64 terms."""
from pathlib import Path

import pytest
import torch

from orchestrator.spec import resolve
from trainers.config import Config
from trainers.methods import build_method

REPO = Path(__file__).resolve().parents[1]
RL_KEYS = ("rl/clipfrac", "rl/log_ratio_abs_mean", "rl/zero_grad_frac", "rl/approx_kl")


@pytest.fixture(scope="module")
def paper_method():
    """The paper profile's full-method row, with L_Policy alone in the loss (rl_only, no KL term, b = 0); built
    once (372M parameters at these shapes) for both signs."""
    plan = resolve(REPO / "ablations" / "reward.yaml", "paper", [
        "model.pretrained=null", "method.regime=rl_only", "method.loss.lambda_kl=0", "method.baseline.kind=none"])
    full = next(r for r in plan.rows if r.name == "r_IoU + r_Dice + r_CE + r_Boundary")   # not the control row
    cfg = Config.model_validate(full.config)
    torch.manual_seed(0)
    return cfg, build_method(cfg, 21, 255).train()


def ringed_batch():
    """2 images at 512^2; masks: one object each, ringed by a 5 px 255 band (VOC's outlines)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 512, 512, dtype=torch.long)
    for i, (lo, hi, c) in enumerate(((100, 300, 15), (200, 460, 7))):
        masks[i, lo - 5:hi + 5, lo - 5:hi + 5] = 255
        masks[i, lo:hi, lo:hi] = c
    return torch.randn(2, 3, 512, 512, generator=g), masks


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_policy_gradient_at_paper_shapes_for_both_advantage_signs(paper_method, sign, monkeypatch):
    cfg, model = paper_method
    assert cfg.model.encoder == "resnet50c_d8" and model.segmentor.encoder.out_channels == 2048
    assert cfg.method.loss.ratio_level == "element"          # the paper profile's measured choice (its preset)
    # the reward weights times `sign`, so every advantage has that sign
    monkeypatch.setattr(model, "weights", {k: sign * w for k, w in cfg.method.reward.weights.model_dump().items()})
    bias = model.policy.fc_mu.bias.detach().clone()
    with torch.no_grad():                  # phi one small step away from phi_old, as after an optimizer step
        model.policy.fc_mu.bias.add_(0.01)
    images, masks = ringed_batch()
    try:
        out = model(images, masks)
    finally:
        with torch.no_grad():
            model.policy.fc_mu.bias.copy_(bias)
    assert sign * float(out["advantage"]) > 0
    params = [p for p in model.policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss"], params, allow_unused=True)      # loss = lambda_Policy L_Policy here
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
    assert torch.isfinite(norm) and float(norm) > 0
    for key in RL_KEYS:
        assert key in out and torch.isfinite(out[key]), key
    assert float(out["rl/clipfrac"]) < 0.05 and float(out["rl/zero_grad_frac"]) < 0.05
    assert 0 < float(out["rl/log_ratio_abs_mean"]) < 0.2     # per element: a small move of the mean
