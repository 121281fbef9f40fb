"""latent_rl method: every modulation and baseline kind takes a finite step; the old policy only moves by Eq. 19."""
import copy

import pytest
import torch

from conftest import method_step
from trainers.config import Config
from trainers.methods import build_method


def make(**method):
    cfg = Config.model_validate({
        "data": {"image_size": 32, "train_size": 16, "val_size": 8},
        "method": {"name": "latent_rl", "policy": {"pool": [2, 2]}, **method},
    })
    torch.manual_seed(0)
    return build_method(cfg, num_classes=8, ignore_index=255)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 8, (n, 32, 32), generator=g)


def step(model, opt):
    return method_step(model, opt, *batch())


@pytest.mark.parametrize("modulation", ["add", "mul", "concat", "mha"])
@pytest.mark.parametrize("baseline", ["none", "batch_mean", "ema", "group"])
def test_every_modulation_and_baseline_takes_a_finite_step(modulation, baseline):
    model = make(modulation=modulation, baseline={"kind": baseline, "group_size": 2})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = copy.deepcopy(model.policy.state_dict())
    for _ in range(2):
        out = step(model, opt)
        assert all(torch.isfinite(v).all() for v in out.values()), out
    changed = [k for k, v in model.policy.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "policy parameters did not change"
    assert model.predict(batch()[0]).shape == (4, 8, 32, 32)


def test_old_policy_gets_no_gradient_and_moves_by_exactly_the_ema_rule():
    eta = 0.9
    model = make(policy={"pool": [2, 2], "ema_eta": eta})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert all(not p.requires_grad for p in model.old_policy.parameters())
    old_before = copy.deepcopy(model.old_policy.state_dict())
    x, y = batch()
    out = model(x, y)
    opt.zero_grad()
    out["loss"].backward()
    assert all(p.grad is None for p in model.old_policy.parameters())
    opt.step()
    new = model.policy.state_dict()
    model.after_optimizer_step()
    for k, v in model.old_policy.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, old_before[k] * eta + (1 - eta) * new[k]), k


def test_regimes_switch_terms():
    model = make(regime="sft_then_rl", rl_start_epoch=1)
    model.on_epoch_start(0, 2)
    assert (model.seg_phase, model.rl_phase) == (True, False)
    model.on_epoch_start(1, 2)
    assert (model.seg_phase, model.rl_phase) == (False, True)
    rl_only = make(regime="rl_only")
    x, y = batch()
    out = rl_only(x, y)
    # no L_seg: the decoder gets no gradient in rl_only (Table 1 row 2)
    out["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in rl_only.segmentor.decoder.parameters())


def test_policy_disabled_is_mha_of_z_only():
    model = make(policy={"enabled": False})
    assert model.policy is None
    x, y = batch()
    out = model(x, y)
    assert torch.isfinite(out["loss"]) and "loss_policy" not in out


def test_detach_state_keeps_rl_gradients_out_of_the_encoder():
    """rl_only leaves L_Policy + L_KL; through z they reach the encoder (the paper), through z.detach() they don't."""
    for detach, reaches in ((False, True), (True, False)):
        model = make(regime="rl_only", policy={"pool": [2, 2], "detach_state": detach})
        with torch.no_grad():   # move phi off phi_old so L_KL and the ratio are not at their stationary point
            model.policy.fc_mu.bias.add_(0.5)
        x, y = batch()
        model(x, y)["loss"].backward()
        grads = [p.grad for p in model.segmentor.encoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches, detach
        assert model.policy.fc_mu.weight.grad.abs().sum() > 0


def test_element_level_ratio_and_kl():
    """Same model and noise: at phi = phi_old both levels give L_Policy = -mean(A), clipfrac 0; once phi moves,
    the element-level KL is the image-level KL divided by d*h*w, and the image-level ratio clips more."""
    outs = {}
    for level in ("image", "element"):
        model = make(loss={"ratio_level": level}, baseline={"kind": "batch_mean"})
        x, y = batch()
        torch.manual_seed(3)
        first = model(x, y)
        assert first["clipfrac"] == 0 and abs(first["loss_kl"]) < 1e-6
        torch.testing.assert_close(first["loss_policy"], -first["advantage"])
        with torch.no_grad():
            model.policy.fc_mu.bias.add_(0.05)
        torch.manual_seed(3)
        outs[level] = model(x, y)
    d = make().segmentor.encoder.out_channels
    h = w = 32 // 8
    torch.testing.assert_close(outs["element"]["loss_kl"] * d * h * w, outs["image"]["loss_kl"])
    assert outs["image"]["clipfrac"] >= outs["element"]["clipfrac"]


def test_policy_lr_scale_makes_its_own_param_group():
    from trainers.config import ScheduleConfig
    from trainers.loop import build_optimizer

    model = make(policy={"pool": [2, 2], "lr_scale": 0.01})
    opt = build_optimizer(ScheduleConfig(lr=0.1), model)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert sorted(by_lr) == pytest.approx([0.001, 0.1])
    policy_ids = {id(p) for p in model.policy.parameters()}
    assert by_lr[min(by_lr)] == policy_ids
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert by_lr[max(by_lr)] == trainable - policy_ids
