"""latent_rl method: every modulation and baseline kind takes a finite step; the old policy only moves by Eq. 19."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import method_step
from reference import image_iou
from trainers.config import Config
from trainers.methods import build_method
from trainers.rl import group_advantages


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
        assert first["rl/clipfrac"] == 0 and abs(first["loss_kl"]) < 1e-6
        torch.testing.assert_close(first["loss_policy"], -first["advantage"])
        with torch.no_grad():
            model.policy.fc_mu.bias.add_(0.05)
        torch.manual_seed(3)
        outs[level] = model(x, y)
    d = make().segmentor.encoder.out_channels
    h = w = 32 // 8
    torch.testing.assert_close(outs["element"]["loss_kl"] * d * h * w, outs["image"]["loss_kl"])
    assert outs["image"]["rl/clipfrac"] >= outs["element"]["rl/clipfrac"]


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


def test_mha_modulation_equals_torch_multihead_attention():
    """Modulation.attend (batch-first, on the module's own parameters) gives what nn.MultiheadAttention gives, with
    the policy's s (Eq. 14) and without it (Table 6), values and gradients."""
    from trainers.methods.latent_rl import Modulation

    torch.manual_seed(0)
    mod = Modulation("mha", 8, 2)
    with torch.no_grad():     # non-zero biases, so a bias that went missing would show
        mod.attention.in_proj_bias.normal_()
        mod.attention.out_proj.bias.normal_()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 8, 4, 5, generator=g, requires_grad=True)
    s = torch.randn(3, 8, 4, 5, generator=g, requires_grad=True)

    def reference(z, s):
        b, d, h, w = z.shape
        query = z if s is None else z - mod.project(s)
        tokens = z.flatten(2).transpose(1, 2)
        z_mod, _ = mod.attention(query.flatten(2).transpose(1, 2), tokens, tokens, need_weights=False)
        return torch.cat([z, mod.alpha * z_mod.transpose(1, 2).reshape(b, d, h, w)], dim=1)

    params = [z, s] + list(mod.parameters())
    for signal in (s, None):
        gy = torch.randn(3, 16, 4, 5, generator=g)
        got, expect = mod(z, signal), reference(z, signal)
        torch.testing.assert_close(got, expect)
        grads = [torch.autograd.grad(y, params, gy, allow_unused=True) for y in (got, expect)]
        for name, a, b in zip(["z", "s"] + [n for n, _ in mod.named_parameters()], *grads):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, msg=name)


def test_seg_loss_with_pixel_ce_equals_seg_loss():
    """Plain CE: the L_seg that also hands its per-pixel CE to r^CE equals SegMethod.seg_loss (value, gradient);
    with a Dice term it is seg_loss itself and no per-pixel CE."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 8, 6, 7, generator=g, requires_grad=True)
    masks = torch.randint(0, 8, (3, 6, 7), generator=g)
    masks[0, :2] = 255
    masks[2] = 255
    for dice in (0.0, 0.5):
        model = make(seg_loss={"ce": 0.7, "dice": dice})
        got, pixel_ce = model.seg_loss_and_pixel_ce(logits, masks)
        expect = model.seg_loss(logits, masks)
        assert got.keys() == expect.keys()
        for key in expect:
            torch.testing.assert_close(got[key], expect[key], msg=key)
        torch.testing.assert_close(torch.autograd.grad(got["loss_seg"], logits)[0],
                                   torch.autograd.grad(expect["loss_seg"], logits)[0])
        if dice:
            assert pixel_ce is None
        else:
            torch.testing.assert_close(pixel_ce, F.cross_entropy(logits, masks, ignore_index=255, reduction="none"))


def test_forward_equals_the_straightforward_formulation():
    """One image-level step recomputed plainly from the same z, s and logits: Eq. 12 summed element by element for
    phi and phi_old, the four rewards, batch-mean advantages clamped to [-1, 1], Eq. 4 and Eq. 5."""
    from trainers.rl import gaussian_kl, gaussian_log_prob, ppo_clip_loss, segmentation_rewards

    model = make(baseline={"kind": "batch_mean"}, policy={"pool": [2, 2], "detach_state": True})
    with torch.no_grad():                   # phi off phi_old, so the ratio and the KL are not trivial
        model.policy.fc_mu.bias.add_(0.002)
        model.policy.fc_logsigma.bias.add_(0.001)
    seen = {}
    sample, decode = model.policy.sample, model.decode

    def record_sample(mu, log_sigma, spatial):
        seen["mu"], seen["log_sigma"] = mu, log_sigma
        seen["s"] = sample(mu, log_sigma, spatial)
        return seen["s"]

    def record_decode(z, s, size):
        seen["z"], seen["logits"] = z, decode(z, s, size)
        return seen["logits"]

    model.policy.sample, model.decode = record_sample, record_decode
    x, y = batch()
    out = model(x, y)
    with torch.no_grad():
        mu_old, log_sigma_old = model.old_policy(seen["z"].detach())     # BN momentum 0: no state change
    mu, log_sigma, s = seen["mu"], seen["log_sigma"], seen["s"].detach()
    h, w = s.shape[-2:]
    # Eq. 12 element by element in float64 (a float32 sum of d*h*w terms would be off by ~1e-3 in its difference)
    logp, logp_old = (gaussian_log_prob(s.double(), m_.double(), ls_.double())
                      for m_, ls_ in ((mu, log_sigma), (mu_old, log_sigma_old)))
    rewards = segmentation_rewards(seen["logits"], y, 8)
    r = sum(rewards.values())
    adv = (r - r.mean()).clamp(-1, 1)
    expect_policy = ppo_clip_loss(logp, logp_old, adv.double(), 0.2)
    expect_kl = gaussian_kl(mu_old, log_sigma_old, mu, log_sigma, spatial=h * w).mean()
    for key, v in rewards.items():
        torch.testing.assert_close(out[f"reward_{key}"], v.mean(), msg=key)
    torch.testing.assert_close(out["loss_kl"], expect_kl.detach())
    # the model's log-ratio is formed channel by channel in float64 from float32 moments of s: it agrees with the
    # float64 element-wise reference to ~1e-7 (float32 rounding of m1, m2), so L_Policy to float32 precision
    torch.testing.assert_close(out["loss_policy"], expect_policy.detach().float(), rtol=1e-5, atol=1e-6)
    assert (logp - logp_old).abs().min() > 0.05 and expect_kl > 0        # not the trivial phi = phi_old point


def test_group_baseline_normalises_each_images_own_samples():
    """GRPO in latent_rl: G actions s per image; the advantages in L_Policy are group_advantages of the (B, G)
    rewards whose row b holds image b's own G samples. Rewards from numpy IoU (tests/reference.py) of each sample
    decoded against its own image's mask; L_Policy rebuilt from torch.distributions.Normal log-densities. The old
    policy is moved off phi first: with rho = 1 the loss is -mean(A) = 0 for any grouping."""
    g, eps = 3, 0.2
    model = make(baseline={"kind": "group", "group_size": g, "a_min": -1e9, "a_max": 1e9},
                 reward={"weights": {"iou": 1, "dice": 0, "ce": 0, "boundary": 0}}, loss={"ppo_eps": eps})
    with torch.no_grad():
        model.old_policy.fc_mu.bias.add_(0.002)
    seen = {}
    hooks = [model.policy.register_forward_hook(lambda m, i, o: seen.update(z=i[0].detach(), phi=o)),
             model.old_policy.register_forward_hook(lambda m, i, o: seen.update(old=o)),
             model.modulation.register_forward_pre_hook(lambda m, i: seen.update(s=i[1].detach()))]
    x, y = batch()
    model.train()
    model.segmentor.decoder.dropout.eval()   # the decoder's Dropout2d draws: off, so a second decode is the same
    try:
        out = model(x, y)
    finally:
        for h in hooks:
            h.remove()
    z_g, y_g = seen["z"].repeat_interleave(g, 0), y.repeat_interleave(g, 0)   # rows b*G .. b*G + G-1: image b
    s = seen["s"]
    assert s.shape[0] == len(x) * g
    with torch.no_grad():
        reward = torch.from_numpy(image_iou(model.decode(z_g, s, x.shape[-2:]), y_g)).view(len(x), g)
    adv = group_advantages(reward).reshape(-1)
    assert (adv != 0).sum() >= 4, "the test needs groups whose samples differ in reward"

    def log_prob(mu, log_sigma):   # Eq. 12: summed over d, h, w
        mu, sigma = mu.detach().double().repeat_interleave(g, 0), log_sigma.detach().double().exp().repeat_interleave(g, 0)
        return torch.distributions.Normal(mu[..., None, None], sigma[..., None, None]).log_prob(s.double()).sum((1, 2, 3))

    rho = (log_prob(*seen["phi"]) - log_prob(*seen["old"])).exp()
    assert ((rho - 1).abs() > 1e-3).all() and ((rho - 1).abs() < eps).any()
    loss_policy = -torch.min(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv).mean()      # Eq. 4
    assert out["reward"].item() == pytest.approx(reward.mean().item(), abs=1e-6)
    # rho from a channel-wise float64 log-ratio (~1e-7 off the reference), float64 group advantages: float32 rounding
    # of the final mean is what is left
    assert out["loss_policy"].item() == pytest.approx(loss_policy.item(), rel=1e-5, abs=1e-7)
