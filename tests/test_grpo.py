"""GRPO as Seg-R1 releases it, and the pieces the PPO term needs at paper shapes: unclamped group advantages from the
config, k3 KL to a reference policy, the unclipped objective, the reference policies, and the ratio continuation."""
import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from conftest import tiny
from trainers.config import Config
from trainers.methods import build_method
from trainers.rl import (Baseline, group_advantages, k3_kl, policy_gradient_loss, ppo_clip_loss, ppo_stats,
                         soft_capped_ratio)

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def latent_rl(**method):
    cfg = tiny(method={"name": "latent_rl", "policy": {"pool": [2, 2]}, **method})
    torch.manual_seed(0)
    return Config.model_validate(cfg), build_method(Config.model_validate(cfg), 8, 255)


def test_group_of_four_is_unclamped_by_default_and_sums_to_zero():
    """The config's default baseline bounds are null: a group of 4 keeps advantages beyond +-1, summing to 0."""
    cfg, model = latent_rl(baseline={"kind": "group", "group_size": 4})
    assert cfg.method.baseline.a_min is None and cfg.method.baseline.a_max is None
    r = torch.tensor([[0.1, 0.2, 0.3, 0.9]])
    mean = sum(r[0].tolist()) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in r[0].tolist()) / 3)   # unbiased, as TRL
    expect = [(x - mean) / (std + 1e-4) for x in r[0].tolist()]
    adv = model.baseline.advantages(r)
    assert adv[0].tolist() == pytest.approx(expect, rel=1e-6)
    assert max(abs(a) for a in expect) > 1.0                          # a clamp to [-1, 1] would cut it
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(adv, group_advantages(r))
    # a one-sided bound clamps that side only
    torch.testing.assert_close(Baseline("group", clip=(None, 1.0)).advantages(r), adv.clamp(max=1.0))


def test_k3_matches_the_kl_in_expectation():
    """k3 = exp(l_ref - l) - (l_ref - l) - 1 at samples of pi is an unbiased estimate of KL(pi || pi_ref)."""
    pi, ref = Normal(torch.tensor(0.3), torch.tensor(0.8)), Normal(torch.tensor(-0.1), torch.tensor(1.2))
    x = pi.sample((400_000,))
    est = k3_kl(pi.log_prob(x), ref.log_prob(x))
    assert (est >= 0).all()
    exact = float(kl_divergence(pi, ref))
    assert float(est.mean()) == pytest.approx(exact, abs=4 * float(est.std()) / math.sqrt(len(x)))
    # and its gradient reaches logp only (the reference is a constant)
    logp = pi.log_prob(x[:5]).clone().requires_grad_()
    logp_ref = ref.log_prob(x[:5]).clone().requires_grad_()
    k3_kl(logp, logp_ref).sum().backward()
    torch.testing.assert_close(logp.grad, 1 - torch.exp(logp_ref.detach() - logp.detach()))
    assert logp_ref.grad is None


def test_unclipped_objective_is_reinforce():
    """Seg-R1's -(exp(logp - sg(logp)) A), token mean: value -mean(A), gradient -A / N per term, no clip."""
    logp = torch.tensor([-1.0, -50.0, 3.0, 0.5], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5, -3.0])
    loss = policy_gradient_loss(logp, adv)
    assert float(loss.detach()) == pytest.approx(-float(adv.mean()))
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 4)


def test_ratio_continuation_keeps_the_value_and_the_gradient():
    """Inside the cap rho = exp(log rho) exactly; beyond it rho stays finite and increasing, and Eq. 4 keeps a
    non-zero gradient wherever plain Eq. 4 has one (here A < 0 with rho far above 1 + eps: the unclipped branch)."""
    lr = torch.tensor([-30.0, -20.0, -3.0, 0.0, 2.5, 20.0, 400.0], dtype=torch.float64, requires_grad=True)
    rho = soft_capped_ratio(lr, 20.0)
    torch.testing.assert_close(rho[1:6], lr[1:6].exp())
    assert torch.isfinite(rho).all() and (rho.diff() > 0).all()
    (g,) = torch.autograd.grad(rho.sum(), lr)
    assert (g > 0).all()
    torch.testing.assert_close(g[1:6], lr[1:6].exp())
    # Eq. 4 at log rho = 400: with A < 0 the gradient is -A rho' != 0 (a hard clamp of log rho gave exactly 0);
    # with A > 0 the clipped branch is the min and Eq. 4 itself has none
    for a, nonzero in ((-1.0, True), (1.0, False)):
        logp = torch.tensor([400.0], dtype=torch.float64, requires_grad=True)
        loss = ppo_clip_loss(logp, torch.zeros(1, dtype=torch.float64), torch.tensor([a], dtype=torch.float64))
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and (float(grad) != 0) == nonzero
        st = ppo_stats(logp, torch.zeros(1, dtype=torch.float64), adv=torch.tensor([a], dtype=torch.float64))
        assert float(st["zero_grad_frac"]) == (0.0 if nonzero else 1.0)
        assert float(st["log_ratio_abs_mean"]) == 400.0 and float(st["clipfrac"]) == 1.0


def test_zero_grad_frac_matches_autograd():
    """rl/zero_grad_frac is the share of terms whose Eq. 4 gradient autograd finds to be 0."""
    logp_old = torch.zeros(8, dtype=torch.float64)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 1.0, 3.0], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -3.0, 0.0, -2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(ppo_clip_loss(logp, logp_old, adv), logp)
    st = ppo_stats(logp, logp_old, adv=adv)
    assert float(st["zero_grad_frac"]) == pytest.approx(float((grad == 0).double().mean()))
    assert float(st["zero_grad_frac"]) == pytest.approx(3 / 8)      # rho 1.5 A > 0, rho 0.5 A < 0, A = 0


@pytest.mark.parametrize("level", ["image", "element"])
def test_latent_rl_reference_kl_and_unclipped_objective(level):
    """kl_reference init: pi_ref is the policy as initialised, frozen, left out of checkpoints (rebuilt from the
    seed); k3 is 0 at pi = pi_ref and grows once pi moves; seg_r1's objective equals -mean(A) in value."""
    _, model = latent_rl(loss={"kl_reference": "init", "beta_ref": 0.04, "policy_loss": "seg_r1",
                               "ratio_level": level}, baseline={"kind": "batch_mean"})
    assert not any(p.requires_grad for p in model.ref_policy.parameters())
    assert not any(k.startswith("ref_policy.") for k in model.checkpoint_state())
    x = torch.randn(4, 3, 32, 32, generator=G(1))
    y = torch.randint(0, 8, (4, 32, 32), generator=G(2))
    out = model(x, y)
    assert float(out["rl/kl_ref"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["loss_policy"]) == pytest.approx(-float(out["advantage"]), abs=1e-6)
    with torch.no_grad():
        model.policy.fc_mu.bias.add_(0.3)
    moved = model(x, y)
    assert float(moved["rl/kl_ref"]) > 1e-3
    # the frozen copy did not move with the policy
    _, fresh = latent_rl()
    torch.testing.assert_close(model.ref_policy.fc_mu.bias, fresh.policy.fc_mu.bias)


def test_sft_checkpoint_reference_loads_the_policy(tmp_path):
    """kl_reference sft_checkpoint: pi_ref is the policy of an rlseg checkpoint (state.pt's model entry)."""
    _, trained = latent_rl()
    with torch.no_grad():
        trained.policy.fc_mu.bias.add_(1.0)
    path = tmp_path / "state.pt"
    torch.save({"epoch": 3, "model": trained.checkpoint_state()}, path)
    _, model = latent_rl(loss={"kl_reference": "sft_checkpoint", "reference_checkpoint": str(path)})
    torch.testing.assert_close(model.ref_policy.fc_mu.bias, trained.policy.fc_mu.bias)
    assert not torch.equal(model.policy.fc_mu.bias, trained.policy.fc_mu.bias)
    with pytest.raises(ValueError, match="method.loss.reference_checkpoint"):
        latent_rl(loss={"kl_reference": "sft_checkpoint", "reference_checkpoint": str(tmp_path / "missing.pt")})


def test_clip_rl_k3_to_the_reference():
    """clip_rl with kl_reference init: rl/kl_ref is the mean over the drawn actions of k3(log pi(a), log pi_ref(a)),
    computed here from the two agents' logits and the actions drawn with the same RNG state; it enters the loss as
    (1 - f) beta_ref k3."""
    cfg = Config.model_validate({
        "data": {"image_size": 64, "train_size": 16, "val_size": 8},
        "model": {"encoder": "clip_vit_tiny", "decoder": "tconv3"},
        "method": {"name": "clip_rl", "loss": {"kl_reference": "init", "beta_ref": 0.5}},
    })
    torch.manual_seed(0)
    model = build_method(cfg, num_classes=8, ignore_index=255)
    with torch.no_grad():
        model.agent[-1].bias.add_(torch.tensor([1.0, -0.5, 0.2]))
    model.train()
    model.on_epoch_start(1, 4)
    x = torch.randn(4, 3, 64, 64, generator=G(1))
    y = torch.randint(0, 8, (4, 64, 64), generator=G(2))
    seen = {}
    hooks = [model.agent.register_forward_hook(lambda m, i, o: seen.__setitem__("pi", o.detach().clone())),
             model.ref_agent.register_forward_hook(lambda m, i, o: seen.__setitem__("ref", o.detach().clone()))]
    torch.manual_seed(7)
    out = model(x, y)
    for h in hooks:
        h.remove()
    torch.manual_seed(7)
    a = Categorical(logits=seen["pi"]).sample()
    lp = torch.log_softmax(seen["pi"], 1).gather(1, a[:, None])[:, 0]
    lr = torch.log_softmax(seen["ref"], 1).gather(1, a[:, None])[:, 0]
    k3 = (torch.exp(lr - lp) - (lr - lp) - 1).mean()
    assert float(k3) > 1e-3
    assert float(out["rl/kl_ref"]) == pytest.approx(float(k3), rel=1e-5)
    out["loss"].backward()
    assert float(model.grad_stats()["rl/policy_grad_norm"]) > 0
    assert not any(p.grad is not None for p in model.ref_agent.parameters())


def test_latent_rl_ema_reference_is_the_old_policy():
    """kl_reference ema: pi_ref is pi_old (Eq. 19), no extra copy; k3 is 0 while they agree and grows once pi moves."""
    _, model = latent_rl(loss={"kl_reference": "ema", "ratio_level": "element"})
    assert model.ref_policy is None
    x = torch.randn(4, 3, 32, 32, generator=G(1))
    y = torch.randint(0, 8, (4, 32, 32), generator=G(2))
    assert float(model(x, y)["rl/kl_ref"]) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        model.policy.fc_mu.bias.add_(0.3)
    assert float(model(x, y)["rl/kl_ref"]) > 1e-3
