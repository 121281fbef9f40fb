"""Does the reward matter (issue 27)? The spurious-reward controls (`method.reward.control`,
trainers.rl.control_rewards) and learning tests: on a tiny seeded problem each RL method's RL terms alone raise its own
reward, and a random reward (`control: random`) raises it less.

Each learning test states its margin and fails when the reward is replaced by a control on purpose: run with
`control: random` in place of the real reward, the "rises by the margin" assertion fails (checked by hand on seeds
0-2: clip_rl's random-reward rises are +0.37, -0.20, +0.27 of the gap against a margin of 0.4, seg_r1's +0.01, -0.03,
-0.06 against 0.5). latent_rl's test is an expected failure: its RL terms alone lower its reward here (see its mark).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from trainers.config import Config
from trainers.data import build_dataset
from trainers.methods import build_method
from trainers.optim import build_optimizer
from trainers.rl import CONTROLS, RewardControl, control_rewards, iou_reward, reward_stats

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one thread, as the loop trains

SEEDS = (0, 1, 2)
PRESETS = Path(__file__).resolve().parents[1] / "trainers" / "presets"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rise(rewards: list[float], first: int = 5, last: int = 10) -> float:
    """Mean reward of the last `last` steps minus that of the first `first`."""
    return sum(rewards[-last:]) / last - sum(rewards[:first]) / first


def train(model, opt, x, y, steps: int, key: str = "reward") -> list[float]:
    """`steps` training steps on one fixed batch as trainers.loop takes them; the step outputs' `key` per step."""
    out = []
    for _ in range(steps):
        o = model(x, y)
        opt.zero_grad()
        o["loss"].backward()
        opt.step()
        model.after_optimizer_step()
        out.append(float(o[key]))
    return out


def first_batch(cfg, n: int):
    data = build_dataset(cfg.data, "train")
    return torch.stack([data[i][0] for i in range(n)]), torch.stack([data[i][1] for i in range(n)])


# --------------------------------------------------------------------------------------------- control_rewards

def test_none_returns_the_reward_and_inverted_negates_it():
    r = torch.rand(6, generator=gen(0))
    assert control_rewards(r, "none") is r
    torch.testing.assert_close(control_rewards(r, "inverted"), -r, rtol=0, atol=0)


def test_shuffled_permutes_every_sample_across_groups():
    """(B, G) rewards: a permutation of all B*G values, so a group's rewards come from other images' samples."""
    r = torch.arange(200, dtype=torch.float32).view(50, 4)        # group b holds 4b .. 4b+3
    out = control_rewards(r, "shuffled", gen(1))
    assert out.shape == r.shape
    assert torch.equal(out.flatten().sort().values, r.flatten())
    assert ((out // 4) != torch.arange(50)[:, None]).float().mean() > 0.9   # nearly every value left its group
    assert torch.equal(out, control_rewards(r, "shuffled", gen(1)))          # deterministic per seed
    assert not torch.equal(out, control_rewards(r, "shuffled", gen(2)))


def test_random_has_the_batch_mean_and_std():
    r = torch.rand(20000, generator=gen(0)) * 3 - 1                 # continuous, in [-1, 2]
    out = control_rewards(r, "random", gen(1))
    assert float(out.mean()) == pytest.approx(float(r.mean()), abs=0.03)
    assert float(out.std()) == pytest.approx(float(r.std()), rel=0.03)
    assert len(out.unique()) > 1000                                 # Gaussian, not Bernoulli
    assert torch.equal(out, control_rewards(r, "random", gen(1)))
    assert not torch.equal(out, control_rewards(r, "random", gen(2)))
    const = torch.full((5,), 0.25)
    torch.testing.assert_close(control_rewards(const, "random", gen(0)), const)   # std 0: the mean itself


def test_random_is_bernoulli_at_the_batch_mean_for_0_1_rewards():
    r = (torch.rand(20000, generator=gen(0)) < 0.3).float()
    out = control_rewards(r, "random", gen(1))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert float(out.mean()) == pytest.approx(float(r.mean()), abs=0.015)
    assert (out != r).float().mean() > 0.3                          # independent draws, not r


def test_random_takes_given_statistics():
    r = torch.zeros(20000)
    out = control_rewards(r, "random", gen(0), stats=torch.tensor([5.0, 2.0, 0.0]))
    assert float(out.mean()) == pytest.approx(5.0, abs=0.05) and float(out.std()) == pytest.approx(2.0, rel=0.03)
    # (mean, population std, all 0/1)
    torch.testing.assert_close(reward_stats(torch.tensor([0.0, 1.0, 1.0, 1.0])),
                               torch.tensor([0.75, (0.75 * 0.25) ** 0.5, 1.0]))
    torch.testing.assert_close(reward_stats(torch.tensor([0.0, 0.5])), torch.tensor([0.25, 0.25, 0.0]))


def test_unknown_control_is_an_error():
    with pytest.raises(ValueError, match="unknown reward control 'rand'"):
        control_rewards(torch.zeros(2), "rand")
    with pytest.raises(ValueError, match="unknown reward control"):
        RewardControl("rand", 0)


def test_reward_control_draws_with_the_previous_batch_statistics():
    """random draws with the previous step's batch mean and std (the first step: its own), so its draws carry no
    trace of the current batch's rewards."""
    c = RewardControl("random", seed=0)
    first = torch.full((4000,), 10.0) + torch.randn(4000, generator=gen(0))
    out1 = c(first)
    assert float(out1.mean()) == pytest.approx(10.0, abs=0.1)
    out2 = c(torch.zeros(4000))                                   # drawn with the first batch's statistics
    assert float(out2.mean()) == pytest.approx(10.0, abs=0.1) and float(out2.std()) == pytest.approx(1.0, rel=0.05)


def test_reward_control_is_deterministic_per_seed_and_resumes_exactly():
    batches = [torch.rand(8, generator=gen(i)) for i in range(5)]
    for control in CONTROLS[1:]:
        whole = RewardControl(control, seed=3)
        expect = [whole(b) for b in batches]
        first = RewardControl(control, seed=3)
        for b in batches[:2]:
            first(b)
        resumed = RewardControl(control, seed=3)
        resumed.load_state_dict(first.state_dict())               # step count (extra state) and statistics
        for b, e in zip(batches[2:], expect[2:]):
            assert torch.equal(resumed(b), e), control
        other = RewardControl(control, seed=4)
        if control != "inverted":
            assert not all(torch.equal(other(b), e) for b, e in zip(batches, expect)), control


# ------------------------------------------------------------------------------------------- the methods' key

def latent_rl_cfg(seed: int = 0, control: str = "none", **method) -> Config:
    return Config.model_validate({
        "seed": seed, "data": {"image_size": 32, "train_size": 8, "val_size": 4},
        "method": {"name": "latent_rl", "policy": {"pool": [2, 2]}, "reward": {"control": control}, **method}})


def clip_rl_cfg(seed: int = 0, control: str = "none", **method) -> Config:
    return Config.model_validate({
        "seed": seed, "data": {"image_size": 64, "train_size": 8, "val_size": 4},
        "model": {"encoder": "clip_vit_tiny", "decoder": "tconv3"},
        "method": {"name": "clip_rl", "reward": {"control": control}, **method}})


from conftest import SEG_TINY as SEG  # noqa: E402  (seg_checkpoint: conftest)


def seg_r1_cfg(checkpoint: str, seed: int = 0, control: str = "none") -> Config:
    return Config.model_validate({
        "seed": seed,
        "method": {"name": "seg_r1", "segmenter": {**SEG, "checkpoint": checkpoint},
                   "policy": {"bins": 8, "hidden": 16, "points": 1}, "reward": {"control": control}},
        "data": {"name": "synthetic_cod", "image_size": 32, "train_size": 4, "val_size": 4},
        "schedule": {"epochs": 1, "batch_size": 4, "lr": 0.01, "weight_decay": 0.0}})


@pytest.mark.parametrize("method", ["latent_rl", "clip_rl", "seg_r1"])
def test_config_key_refuses_nonsense(method):
    cfg = Config.model_validate({"method": {"name": method, "reward": {"control": "shuffled"}}})
    assert cfg.method.reward.control == "shuffled"
    assert Config.model_validate({"method": {"name": method}}).method.reward.control == "none"
    with pytest.raises(ValidationError, match=r"method\.reward\.control"):
        Config.model_validate({"method": {"name": method, "reward": {"control": "rand"}}})


def _first_step(model, x, y, record):
    """One training step with the global RNG at 0: its outputs, what `record` captured, the RNG state after."""
    torch.manual_seed(0)
    out = model(x, y)
    out["loss"].backward()
    return out, record, torch.get_rng_state()


CATEGORICAL_SAMPLE = torch.distributions.Categorical.sample


def _step_one(build, method: str, control: str, monkeypatch):
    model = build(control).train()
    seen = []
    if method == "latent_rl":
        sample = model.policy.sample
        model.policy.sample = lambda *a, **k: seen.append(sample(*a, **k)) or seen[-1]
    elif method == "seg_r1":
        act = model.policy.act
        model.policy.act = lambda *a, **k: seen.append(act(*a, **k)) or seen[-1]
    else:
        monkeypatch.setattr(torch.distributions.Categorical, "sample",
                            lambda self, *a, **k: seen.append(CATEGORICAL_SAMPLE(self, *a, **k)) or seen[-1])
    return model, seen


@pytest.mark.parametrize("method", ["latent_rl", "clip_rl", "seg_r1"])
def test_control_leaves_the_policys_sampling_and_the_real_reward_alone(method, monkeypatch, seg_checkpoint):
    """Step 1 with control none and random: the same sampled actions, the same global RNG state after it (the
    control draws from its own generator), the same real reward logged; rl/reward_used only with the control, and
    the method's state_dict carries the control's state only then."""
    def build(control):
        cfg = {"latent_rl": lambda: latent_rl_cfg(control=control), "clip_rl": lambda: clip_rl_cfg(control=control),
               "seg_r1": lambda: seg_r1_cfg(seg_checkpoint, control=control)}[method]()
        torch.manual_seed(0)
        return build_method(cfg, 2 if method == "seg_r1" else 8, 255)

    if method == "seg_r1":
        x, y = first_batch(seg_r1_cfg(seg_checkpoint), 3)
    else:
        size = 64 if method == "clip_rl" else 32
        x, y = torch.randn(4, 3, size, size, generator=gen(1)), torch.randint(0, 8, (4, size, size), generator=gen(1))
    runs = {}
    for control in ("none", "random"):
        model, seen = _step_one(build, method, control, monkeypatch)
        if method == "clip_rl":
            model.on_epoch_start(1, 4)                          # 0 < f < 1: the agent acts
        runs[control] = (model, *_first_step(model, x, y, seen))
    (m0, out0, seen0, rng0), (m1, out1, seen1, rng1) = runs["none"], runs["random"]
    assert seen0 and len(seen0) == len(seen1)
    for a, b in zip(seen0, seen1):
        assert torch.equal(a, b)
    assert torch.equal(rng0, rng1)
    key = "rl/reward" if method == "seg_r1" else "reward"
    assert torch.equal(out0[key], out1[key])
    assert "rl/reward_used" not in out0 and "rl/reward_used" in out1
    assert not any(k.startswith("reward_control.") for k in m0.state_dict())
    assert {"reward_control._extra_state", "reward_control.last_stats"} <= set(m1.checkpoint_state())


def test_method_checkpoint_resumes_the_controls_stream():
    """latent_rl with control random: a model restored from its checkpoint after step 2 draws at step 3 what the
    uninterrupted one draws."""
    def make():
        torch.manual_seed(0)
        return build_method(latent_rl_cfg(control="random"), 8, 255).train()

    x, y = torch.randn(4, 3, 32, 32, generator=gen(1)), torch.randint(0, 8, (4, 32, 32), generator=gen(1))
    whole = make()
    for _ in range(2):
        whole(x, y)
    resumed = make()
    resumed.load_checkpoint_state(whole.checkpoint_state())
    assert resumed.reward_control.steps == 2
    r = torch.rand(8, generator=gen(3))
    assert torch.equal(resumed.reward_control(r), whole.reward_control(r))


def test_fit_with_a_control_resumes_exactly():
    """trainers.loop.fit with control random: resumed from the epoch-1 checkpoint (as a file holds it), epoch 2's
    metrics equal the uninterrupted run's; the real reward and the controlled one are both logged."""
    import io

    from conftest import tiny
    from trainers.loop import fit

    cfg = tiny(method={"name": "latent_rl", "policy": {"pool": [2, 2]}, "reward": {"control": "random"}},
               data={"train_size": 16, "val_size": 8})
    reports = []

    def keep(metrics, state):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        reports.append(torch.load(buf, weights_only=False))

    final = fit(cfg, keep)
    assert "rl/reward_used" in final and "train/reward" in final and final["rl/reward_used"] != final["train/reward"]
    resumed = fit(cfg, lambda m, s: None, state=reports[0])
    timing = ("time/", "train/images_per_s")
    assert {k: v for k, v in resumed.items() if not k.startswith(timing)} == \
        {k: v for k, v in final.items() if not k.startswith(timing)}


# ------------------------------------------------------------------------------------------------ learning tests

CLIP_STEPS, CLIP_MARGIN = 40, 0.4


def clip_rl_run(seed: int, control: str) -> tuple[list[float], float]:
    """clip_rl as its preset trains it (actions {-0.1, 0, +0.1}, EMA baseline tau 0.9 clamped to [-1, 1], Adam lr
    1e-3) with L_seg off: curriculum f = 0 and rl.seg_loss_refined 0 leave L = lambda_RL L_RL, which trains the agent
    alone (the tower is frozen; the decoder and residual get no gradient, so their output on the fixed batch is
    computed once). Returns the per-step rewards and the gap between the best action's and the uniform policy's
    expected reward on this batch (computed exactly from the frozen heads)."""
    cfg = clip_rl_cfg(seed, control, rl={"seg_loss_refined": 0.0},
                      baseline={"kind": "ema", "tau": 0.9, "a_min": -1.0, "a_max": 1.0})
    torch.manual_seed(seed)
    model = build_method(cfg, 8, 255).train()
    x, y = first_batch(cfg, 8)
    model.on_epoch_start(4, 4)                                      # quadratic curriculum at e = E: f = 0
    assert model.f == 0.0
    with torch.no_grad():
        heads = model.heads(x)
    model.heads = lambda images: heads
    _, s_l, r = heads
    arms = torch.stack([iou_reward(s_l + v * r, y, 8) - iou_reward(s_l, y, 8) for v in model.actions.tolist()], 1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return train(model, opt, x, y, CLIP_STEPS), float(arms.max(1).values.mean() - arms.mean())


def test_clip_rl_reinforce_alone_raises_its_reward():
    """IoU(O) - IoU(s_L) is deterministic per (image, action) here: a contextual bandit. Over 3 seeds the mean reward
    of the last 10 of 40 steps exceeds that of the first 5 by at least 40% of the gap between the best action and the
    uniform policy (measured: 74%, 113%, 83%), and by more than with `control: random` (measured: +37%, -20%, +27%;
    shuffled +34%, +93%, +8%: with an EMA baseline it keeps the batch-mean reward; inverted -69%, -48%, -78%)."""
    for seed in SEEDS:
        real, gap = clip_rl_run(seed, "none")
        spurious, _ = clip_rl_run(seed, "random")
        assert gap > 0
        assert rise(real) >= CLIP_MARGIN * gap, (seed, rise(real), gap)
        assert rise(real) > rise(spurious), (seed, rise(real), rise(spurious))


SEG_R1_STEPS, SEG_R1_MARGIN = 40, 0.5


def seg_r1_run(checkpoint: str, seed: int, control: str) -> list[float]:
    """seg_r1 (GRPO, G = 4, unclipped token-mean objective, k3 to the initial policy) on one fixed batch of 4 images:
    the policy is the only trained module (the segmenter is frozen) and there is no L_seg."""
    cfg = seg_r1_cfg(checkpoint, seed, control)
    torch.manual_seed(seed)
    model = build_method(cfg, 2, 255).train()
    x, y = first_batch(cfg, 4)
    return train(model, build_optimizer(cfg.schedule, model), x, y, SEG_R1_STEPS, key="rl/reward")


def test_seg_r1_grpo_alone_raises_its_reward(seg_checkpoint):
    """Seg-R1's reward valid (0.7 IoU + 0.3 S) + valid (format) in [0, 2]: over 3 seeds the mean of the last 10 of 40
    steps exceeds the first 5's by at least 0.5 (measured +0.93, +0.92, +0.90; most of it the format term, the
    segmenter being random-init), and by more than with `control: random` (measured +0.01, -0.03, -0.06; shuffled
    -0.05, -0.00, -0.01; inverted -0.20, -0.12, -0.18)."""
    for seed in SEEDS:
        real = seg_r1_run(seg_checkpoint, seed, "none")
        spurious = seg_r1_run(seg_checkpoint, seed, "random")
        assert rise(real) >= SEG_R1_MARGIN, (seed, rise(real))
        assert rise(real) > rise(spurious), (seed, rise(real), rise(spurious))


LATENT_STEPS, LATENT_MARGIN = 40, 0.05


def latent_rl_run(seed: int, control: str) -> list[float]:
    """latent_rl as the embedded preset configures it, trained through z (policy.detach_state false), with L_seg off
    (regime rl_only: L = lambda_P L_Policy + lambda_KL L_KL, over the policy and, through z, the encoder), on one
    fixed batch of 8 synthetic 32 px images."""
    preset = yaml.safe_load((PRESETS / "latent_rl.yaml").read_text())
    method = preset["method"]
    method["policy"] = {**method.get("policy", {}), "detach_state": False}
    method["regime"] = "rl_only"
    method["reward"] = {**method.get("reward", {}), "control": control}
    cfg = Config.model_validate({"seed": seed, "model": preset.get("model", {}), "method": method,
                                 "data": {"image_size": 32, "train_size": 8, "val_size": 4},
                                 "schedule": {**preset.get("schedule", {}), "batch_size": 8}})
    torch.manual_seed(seed)
    model = build_method(cfg, 8, 255).train()
    x, y = first_batch(cfg, 8)
    return train(model, build_optimizer(cfg.schedule, model), x, y, LATENT_STEPS)


@pytest.mark.xfail(strict=True, reason=(
    "issue 27 finding: latent_rl's RL terms alone do not raise its reward on a tiny problem. With the default MHA "
    "modulation the action s barely moves the prediction (the best s found by gradient descent on L_seg changes "
    "the reward by < 0.03 at init; after SFT the learned alpha shrinks 0.1 -> 0.04), and through z the RL gradient "
    "changes the encoder the decoder reads, so the reward drifts or falls (every PPO setting tried). Strict: when "
    "the default learns, this fails and the marker goes."))
def test_latent_rl_ppo_alone_raises_its_reward():
    """Sum of the four reward terms (Eq. 15, in [0, 4]): over 3 seeds the mean of the last 10 of 40 steps exceeds the
    first 5's by at least 0.05, and by more than with `control: random`. Measured with the preset of this commit:
    real -0.034, -0.005, -0.022; random -0.098, +0.007, -0.004."""
    for seed in SEEDS:
        real = latent_rl_run(seed, "none")
        assert rise(real) >= LATENT_MARGIN, (seed, rise(real))
        spurious = latent_rl_run(seed, "random")
        assert rise(real) > rise(spurious), (seed, rise(real), rise(spurious))
