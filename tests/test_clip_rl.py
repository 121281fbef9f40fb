"""clip_rl method: action sets, frozen encoder, curriculum mixing, reward = IoU(O) - IoU(s_L), every baseline."""
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
        "data": {"image_size": 64, "train_size": 16, "val_size": 8},
        "model": {"encoder": "clip_vit_tiny", "decoder": "tconv3"},
        "method": {"name": "clip_rl", **method},
    })
    torch.manual_seed(0)
    return build_method(cfg, num_classes=8, ignore_index=255)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, 8, (n, 64, 64), generator=g)


def train_steps(model, n=3, epoch=1, epochs=4):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model.on_epoch_start(epoch, epochs)
    x, y = batch()
    for _ in range(n):
        out = method_step(model, opt, x, y)
    return out


@pytest.mark.parametrize("actions, expect", [
    ({"step": 0.1, "count": 3}, [-0.1, 0.0, 0.1]),
    ({"step": 0.05, "count": 3}, [-0.05, 0.0, 0.05]),
    ({"step": 0.1, "count": 5}, [-0.2, -0.1, 0.0, 0.1, 0.2]),
    ({"step": 0.1, "count": 7}, [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]),
    ({"values": [0.0, 0.5, 1.0]}, [0.0, 0.5, 1.0]),
])
def test_action_sets(actions, expect):
    model = make(actions=actions)
    assert model.actions.tolist() == pytest.approx(expect)
    assert model.agent[-1].out_features == len(expect)


def test_repeated_actions_are_rejected():
    with pytest.raises(ValueError, match="values must be distinct"):
        Config.model_validate({"method": {"name": "clip_rl", "actions": {"values": [0.1, 0.1]}}})


def test_encoder_frozen_decoder_agent_residual_train():
    model = make()
    before = copy.deepcopy(model.state_dict())
    out = train_steps(model)
    enc = model.segmentor.encoder
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters())
    for k, v in model.state_dict().items():
        if k.startswith("segmentor.encoder."):
            assert torch.equal(v, before[k]), k
    for prefix in ("segmentor.decoder.", "residual.", "agent."):
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()
                   if k.startswith(prefix) and v.is_floating_point()), prefix
    assert torch.isfinite(out["loss"]) and {"loss_rl", "reward", "alpha", "entropy"} <= set(out)


@pytest.mark.parametrize("kind", ["none", "batch_mean", "ema", "group"])
def test_every_baseline_kind_takes_a_finite_step(kind):
    model = make(baseline={"kind": kind, "group_size": 2})
    out = train_steps(model, n=2)
    assert all(torch.isfinite(v).all() for v in out.values()), out
    assert model.predict(batch()[0]).shape == (4, 8, 64, 64)


def test_reward_is_iou_gain_and_zero_without_a_residual():
    model = make(baseline={"kind": "none"})
    with torch.no_grad():   # r = 0: O = s_L for every action, so IoU(O) - IoU(s_L) = 0 and A = 0
        model.residual[-1].weight.zero_()
        model.residual[-1].bias.zero_()
    model.on_epoch_start(2, 4)
    out = model(*batch())
    assert out["reward"] == 0 and out["advantage"] == 0
    torch.testing.assert_close(out["loss_seg_O"], out["loss_seg_sL"])


def test_curriculum_mixes_the_losses():
    model = make()
    x, y = batch()
    model.on_epoch_start(0, 4)                 # f = 1: the decoder alone
    torch.manual_seed(5)
    out = model(x, y)
    assert out["curriculum_f"] == 1.0 and "loss_rl" not in out
    torch.testing.assert_close(out["loss"], out["loss_seg_sL"])
    model.on_epoch_start(2, 4)                 # f = (1 - 2/4)^2 = 0.25
    torch.manual_seed(5)
    out = model(x, y)
    rl = model.cfg.rl.lambda_rl
    assert out["curriculum_f"] == pytest.approx(0.25)
    # loss_rl is reported detached; rebuild the total from its parts
    expect = 0.25 * out["loss_seg_sL"] + 0.75 * (out["loss_seg_O"] + rl * out["loss_rl"])
    torch.testing.assert_close(out["loss"], expect)


def test_decoder_only_and_no_agent_rows():
    only = make(curriculum={"shape": "constant"}, rl={"enabled": False})
    x, _ = batch()
    assert only.agent is None
    z, s_l, r = only.heads(x)
    torch.testing.assert_close(only.predict(x), s_l)            # the residual is never trained: not used
    no_agent = make(rl={"enabled": False})
    z, s_l, r = no_agent.eval().heads(x)
    torch.testing.assert_close(no_agent.predict(x), s_l + r)
    out = train_steps(no_agent)
    assert "loss_seg_O" in out and "loss_rl" not in out


def test_clip_rl_needs_a_decoder_with_features():
    with pytest.raises(ValueError, match="needs a decoder with features"):
        build_method(Config.model_validate({"model": {"decoder": "fcn"}, "method": {"name": "clip_rl"}}), 8, 255)


def test_decoder_scale_must_match_the_patch():
    with pytest.raises(ValueError, match=r"upsamples x16 but model.encoder='clip_vit_tiny' has patch 8"):
        build_method(Config.model_validate({"model": {"encoder": "clip_vit_tiny", "decoder": "tconv"},
                                            "method": {"name": "clip_rl"}}), 8, 255)


def test_checkpoints_leave_out_the_frozen_tower_and_resume():
    model = make()
    train_steps(model, n=1)
    state = model.checkpoint_state()
    assert state and not any(k.startswith("segmentor.encoder.") for k in state)
    assert any(k.startswith("segmentor.decoder.") for k in state) and "baseline.b" in state
    fresh = make()                     # same seed: the tower is rebuilt identically from config
    fresh.load_checkpoint_state(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    del state["residual.1.weight"]
    with pytest.raises(RuntimeError, match="missing.*residual.1.weight"):
        fresh.load_checkpoint_state(state)


# --------------------------------------------------------------------------- the RL signal, computed independently

VALUES = [0.0, 1.0, 3.0]   # residual scales large enough that the argmax, and so the IoU, moves


def rl_model(probs=(0.2, 0.3, 0.5), **method):
    """A clip_rl model whose agent prefers the actions as `probs` says (its last layer's bias), still depending on
    the image through its weights, with a wide advantage clamp so the clamp never hides an advantage."""
    method.setdefault("baseline", {"kind": "none"})
    method["baseline"] = {"a_min": -1e9, "a_max": 1e9, **method["baseline"]}
    model = make(actions={"values": VALUES}, **method)
    with torch.no_grad():
        model.agent[-1].bias.copy_(torch.tensor(probs).log())
    return model


def forward_seeded(model, x, y, seed):
    """model(x, y) with the global RNG at `seed`; returns its output, the agent's logits (B, A) and hidden
    features (B, hidden) as the forward computed them."""
    seen = {}
    hooks = [model.agent.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o.detach().clone())),
             model.agent[0].register_forward_hook(lambda m, i, o: seen.__setitem__("pre", o.detach().clone()))]
    try:
        torch.manual_seed(seed)
        out = model(x, y)
    finally:
        for h in hooks:
            h.remove()
    return out, seen["logits"], seen["pre"].relu()


def drawn_actions(logits, seed, g):
    """The (B, G) action indices a categorical policy with these logits draws with the global RNG at `seed`: the
    method's only random draw in a training step of a frozen (dropout-free) tower."""
    torch.manual_seed(seed)
    return torch.distributions.Categorical(logits=logits).sample((g,)).T


def iou_gain(model, x, y, actions):
    """IoU(O) - IoU(s_L) per (image, sample) with O = s_L + alpha r, from numpy IoU (tests/reference.py)."""
    with torch.no_grad():
        _, s_l, r = model.heads(x)
    base = image_iou(s_l, y)
    gains = [[image_iou(s_l[b:b + 1] + VALUES[a] * r[b:b + 1], y[b:b + 1])[0] - base[b] for a in row.tolist()]
             for b, row in enumerate(actions)]
    return torch.tensor(gains, dtype=torch.float64)


def test_reinforce_reward_loss_and_gradient_against_an_independent_computation():
    """reward = IoU(O) - IoU(s_L) (non-zero here), L_RL = -mean(A log pi(a)) with A = r (no baseline), its weight
    (1 - f) lambda_RL in the total loss, and the agent's gradient in closed form: for softmax logits l and taken
    action a, d(-A log pi(a))/dl = -A (onehot(a) - pi)."""
    lam, f = 0.5, 0.25
    model = rl_model(rl={"lambda_rl": lam})
    model.train()
    model.on_epoch_start(2, 4)                 # quadratic curriculum: f = (1 - 2/4)^2
    x, y = batch()
    out, logits, hidden = forward_seeded(model, x, y, seed=11)
    a = drawn_actions(logits, 11, 1)[:, 0]     # (B,)
    reward = iou_gain(model, x, y, a[:, None])[:, 0]
    assert (reward != 0).sum() >= 2, "the test needs images whose IoU the refinement changes"
    assert out["reward"].item() == pytest.approx(reward.mean().item(), abs=1e-6)
    assert out["alpha"].item() == pytest.approx(sum(VALUES[i] for i in a.tolist()) / len(a))

    pi = logits.double().softmax(1)
    logp = pi.log()[torch.arange(len(a)), a]
    loss_rl = -(reward * logp).mean()
    assert out["loss_rl"].item() == pytest.approx(loss_rl.item(), rel=1e-5, abs=1e-7)
    assert out["curriculum_f"].item() == pytest.approx(f)
    total = f * out["loss_seg_sL"] + (1 - f) * (out["loss_seg_O"] + lam * loss_rl)
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)

    model.zero_grad()
    out["loss"].backward()
    # only L_RL reaches the agent (O depends on the action index, not on pi)
    d_logits = -(1 - f) * lam * (reward / len(a))[:, None] * (F.one_hot(a, len(VALUES)).double() - pi)
    last = model.agent[-1]
    assert last.bias.grad is not None, "L_RL does not reach the agent"
    torch.testing.assert_close(last.bias.grad.double(), d_logits.sum(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(last.weight.grad.double(), d_logits.T @ hidden.double(), rtol=1e-4, atol=1e-7)


def eval_logits(model, x):
    seen = {}
    hook = model.agent.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o.detach().clone()))
    try:
        return model.predict(x), seen
    finally:
        hook.remove()


def test_evaluation_takes_the_greedy_action_unless_eval_sample():
    x, _ = batch()
    seed = 3
    for eval_sample in (False, True):
        model = rl_model(probs=(0.3, 0.4, 0.3), eval_sample=eval_sample).eval()
        with torch.no_grad():
            _, s_l, r = model.heads(x)
        torch.manual_seed(seed)
        pred, seen = eval_logits(model, x)
        greedy = seen["logits"].argmax(1)
        sampled = drawn_actions(seen["logits"], seed, 1)[:, 0]
        assert not torch.equal(greedy, sampled), "pick a seed whose sample differs from the greedy action"
        a = sampled if eval_sample else greedy
        expect = s_l + torch.tensor(VALUES)[a][:, None, None, None] * r
        torch.testing.assert_close(pred, expect)


def test_group_baseline_normalises_each_images_own_samples():
    """GRPO: G actions per image; the advantages in L_RL are group_advantages of the (B, G) rewards whose row b
    holds image b's own G samples (samples of one image are not mixed with another's)."""
    g = 3
    model = rl_model(probs=(0.3, 0.3, 0.4), baseline={"kind": "group", "group_size": g})
    model.train()
    model.on_epoch_start(2, 4)
    x, y = batch()
    out, logits, _ = forward_seeded(model, x, y, seed=5)
    a = drawn_actions(logits, 5, g)                                  # (B, G)
    reward = iou_gain(model, x, y, a)                                # (B, G), row b: image b
    adv = group_advantages(reward)
    assert (adv.abs().sum(1) > 0).sum() >= 2, "the test needs images whose G samples differ in reward"
    logp = logits.double().log_softmax(1).gather(1, a)
    assert out["reward"].item() == pytest.approx(reward.mean().item(), abs=1e-6)
    assert out["loss_rl"].item() == pytest.approx(-(adv * logp).mean().item(), rel=1e-4, abs=1e-7)
