"""rl/grad_share (trainers.grad_share): the RL terms' gradient on the segmentor's own weights against L_seg's. The
embedded latent_rl default sends RL gradient to the encoder through z unless the state is detached; measuring it
changes nothing a trial reports; a row whose share stays below 1e-3 late in training is flagged inert."""
import math

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, method_step, tiny
from trainers.checkpoint import rng_state
from trainers.config import Config
from trainers.data import build_dataset
from trainers.grad_share import grad_share, unchanged_state
from trainers.loop import fit
from trainers.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one thread, as the loop trains

SHARE_FLOOR = 1e-2   # ten times the table's inert bound (orchestrator.tables.INERT_GRAD_SHARE)


def embedded_default(detach_state: bool) -> Config:
    """trainers/presets/latent_rl.yaml as shipped (model, schedule, method, image size), detach_state set; only
    the first 32 training scenes are built."""
    tree = yaml.safe_load((REPO / "trainers" / "presets" / "latent_rl.yaml").read_text())
    tree["method"]["policy"]["detach_state"] = detach_state
    tree["data"]["train_size"] = 32
    return Config.model_validate(tree)


def embedded_model(cfg: Config):
    data = build_dataset(cfg.data, "train")
    torch.manual_seed(cfg.seed)
    return build_method(cfg, data.num_classes, data.ignore_index).train()


def batches(cfg: Config, n: int):
    """The first n batches of the embedded train set, in order."""
    data = build_dataset(cfg.data, "train")
    bs = cfg.schedule.batch_size
    for i in range(n):
        items = [data[j] for j in range(i * bs, (i + 1) * bs)]
        yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def shares_by_step(cfg: Config, steps: int) -> list[dict[str, float]]:
    """grad_share before each of `steps` training steps (step 1: the untrained model, pi_old == pi)."""
    from trainers.optim import build_optimizer

    model = embedded_model(cfg)
    opt = build_optimizer(cfg.schedule, model)
    out = []
    for images, masks in batches(cfg, steps):
        out.append(grad_share(model, images, masks))
        method_step(model, opt, images, masks)
    return out


def test_embedded_default_sends_rl_gradient_to_the_encoder_from_step_2():
    """Through z (detach_state false) the RL terms reach the encoder: share > SHARE_FLOOR. Step 1: pi_old equals pi,
    so L_KL's gradient is exactly 0, while the PPO term's is not (A = r - b is not 0 per image). From step 2 on
    both terms have one. The RL gradient lands on the encoder only: the action s enters log pi as a constant, so the
    modulation and the decoder get none (grad_norm_rl is the encoder's)."""
    cfg = embedded_default(detach_state=False)
    steps = shares_by_step(cfg, 3)
    assert steps[0]["rl/grad_norm_kl_term"] == 0.0
    assert steps[0]["rl/grad_norm_policy_term"] > 0.0
    for step in steps[1:]:
        assert step["rl/grad_share"] > SHARE_FLOOR, steps
        assert step["rl/grad_norm_kl_term"] > 0.0 and step["rl/grad_norm_policy_term"] > 0.0

    model = embedded_model(cfg)
    images, masks = next(batches(cfg, 1))
    out = model(images, masks)
    rl = out["rl_term/policy"] + out["rl_term/kl"]
    enc = torch.autograd.grad(rl, list(model.segmentor.encoder.parameters()), retain_graph=True, allow_unused=True)
    rest = [p for n, p in model.named_parameters() if n.startswith(("segmentor.decoder.", "modulation."))]
    assert any(g is not None and g.abs().sum() > 0 for g in enc)
    assert all(g is None for g in torch.autograd.grad(rl, rest, allow_unused=True))


def test_detached_state_gives_an_rl_share_of_exactly_zero():
    for step in shares_by_step(embedded_default(detach_state=True), 3):
        assert step["rl/grad_share"] == 0.0 and step["rl/grad_norm_rl"] == 0.0
        assert step["rl/grad_norm_seg"] > 0.0


def test_grad_share_leaves_buffers_extra_state_rng_and_grads_as_they_were():
    """A bare train-mode forward moves BatchNorm statistics, the EMA baseline, the reward control's step count and
    the RNG (so this test can fail); grad_share puts all of them back and fills no .grad."""
    cfg = Config.model_validate(tiny(method={"name": "latent_rl", "policy": {"pool": [2, 2]},
                                             "reward": {"control": "random"}}))
    torch.manual_seed(0)
    model = build_method(cfg, 8, 255).train()
    images, masks = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4, 32, 32))

    def snapshot():
        return ({k: v.clone() for k, v in model.state_dict().items()}, rng_state(torch.device("cpu"))["torch"])

    before, rng = snapshot()
    with unchanged_state(model, torch.device("cpu")):
        model(images, masks)
        moved, rng_moved = snapshot()
    assert not torch.equal(rng, rng_moved)
    assert [k for k in before if not torch.equal(before[k], moved[k])], "the forward changed nothing"
    assert "rl/grad_share" in grad_share(model, images, masks)
    after, rng_after = snapshot()
    assert all(torch.equal(before[k], after[k]) for k in before) and torch.equal(rng, rng_after)
    assert all(p.grad is None for p in model.parameters())


CLIP_TINY = {"model": {"encoder": "clip_vit_tiny", "decoder": "tconv3"}, "data": {"image_size": 64, "train_size": 16}}


@pytest.mark.parametrize("method, over", [
    ({"name": "latent_rl", "policy": {"pool": [2, 2], "detach_state": False}, "reward": {"control": "shuffled"}}, {}),
    ({"name": "clip_rl"}, CLIP_TINY),
], ids=["latent_rl", "clip_rl"])
def test_measuring_changes_nothing_the_trial_reports(monkeypatch, method, over):
    """Two epochs with and without the measurement: every other metric and the final weights, buffers and
    optimizer state are bitwise equal."""
    import trainers.loop

    cfg = tiny(method=method, **over)
    measured = []
    final_on = fit(cfg, lambda m, s: measured.append(s))
    monkeypatch.setattr(trainers.loop, "grad_share", lambda *a, **k: {})
    plain = []
    final_off = fit(cfg, lambda m, s: plain.append(s))

    assert math.isfinite(final_on["rl/grad_share"]) and "rl/grad_share" not in final_off
    skip = ("rl/grad_", "time/", "train/images_per_s")
    assert {k: v for k, v in final_on.items() if not k.startswith(skip)} == \
        {k: v for k, v in final_off.items() if not k.startswith(skip)}
    on, off = measured[-1], plain[-1]
    assert on["model"].keys() == off["model"].keys()
    assert all(torch.equal(on["model"][k], off["model"][k]) for k in on["model"])
    assert torch.equal(on["rng"]["torch"], off["rng"]["torch"])
    assert all(torch.equal(a, b) for a, b in zip(on["optimizer"]["state"][0].values(),
                                                  off["optimizer"]["state"][0].values()))


def test_regimes_without_l_seg_or_without_rl_terms():
    """rl_only: no L_seg, so no share, the norms only; sft_then_rl's SFT phase: no RL term, no figures; supervised:
    no policy, no figures."""
    images, masks = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4, 32, 32))

    def model(**method):
        torch.manual_seed(0)
        return build_method(Config.model_validate(tiny(method=method)), 8, 255).train()

    rl_only = grad_share(model(name="latent_rl", policy={"pool": [2, 2]}, regime="rl_only"), images, masks)
    assert "rl/grad_share" not in rl_only and rl_only["rl/grad_norm_seg"] == 0.0 and rl_only["rl/grad_norm_rl"] > 0
    sft = model(name="latent_rl", policy={"pool": [2, 2]}, regime="sft_then_rl")
    sft.on_epoch_start(0, 2)
    assert grad_share(sft, images, masks) == {}
    assert grad_share(model(name="supervised"), images, masks) == {}


def test_clip_rl_rl_term_never_reaches_its_decoder_or_residual():
    """CLIP-RL's REINFORCE term trains the agent alone (A carries no gradient, pi reads the frozen tower's GAP(z)):
    over the decoder and the residual net its share is exactly 0. Curriculum f = 1 (epoch 0): no RL term, no figures."""
    cfg = Config.model_validate(tiny(method={"name": "clip_rl"}, **CLIP_TINY))
    torch.manual_seed(0)
    model = build_method(cfg, 8, 255).train()
    images, masks = torch.randn(4, 3, 64, 64), torch.randint(0, 8, (4, 64, 64))
    assert grad_share(model, images, masks) == {}
    model.on_epoch_start(1, 4)
    share = grad_share(model, images, masks)
    assert share["rl/grad_share"] == 0.0 and share["rl/grad_norm_policy_term"] == 0.0
    assert share["rl/grad_norm_seg"] > 0.0
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} - {"agent"}
    assert names == {"segmentor", "residual"}


def test_element_reduction_sum_is_the_mean_times_d_h_w():
    """method.loss.element_reduction sum: L_Policy and L_KL (and the k3 term) sum an image's d*h*w element terms
    (Eq. 12's scale) where mean averages them; the same draw, the same clip decisions."""
    images, masks = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4, 32, 32))

    def build(reduction):
        cfg = Config.model_validate(tiny(method={
            "name": "latent_rl", "policy": {"pool": [2, 2]},
            "loss": {"ratio_level": "element", "element_reduction": reduction, "kl_reference": "init"}}))
        torch.manual_seed(0)
        return build_method(cfg, 8, 255).train()

    def terms(model):
        torch.manual_seed(1)
        return model(images, masks)

    model = build("mean")
    method_step(model, torch.optim.SGD(model.parameters(), lr=0.1), images, masks)   # pi leaves pi_old and pi_ref
    twin = build("sum")
    twin.load_state_dict(model.state_dict())
    n = model.segmentor.encoder.out_channels * 4 * 4      # d * h * w (32 px, output stride 8)
    mean, summed = terms(model), terms(twin)
    assert float(mean["loss_kl"]) > 0 and float(mean["rl/kl_ref"]) > 0
    for key in ("loss_policy", "loss_kl", "rl/kl_ref"):
        assert float(summed[key]) == pytest.approx(n * float(mean[key]), rel=1e-4), key
    assert float(summed["rl/clipfrac"]) == float(mean["rl/clipfrac"])


def test_a_row_whose_rl_share_stays_below_1e_3_late_is_flagged_inert():
    """rl_grad_share_max is the largest rl/grad_share over the last half of each trial's epochs; below 1e-3 the row
    gets the mark and a warning line. A row that is 0 only early, one with a single late epoch above the bound, a
    live row and a supervised row (no share) are not flagged."""
    from orchestrator.tables import SUMMARY_COLUMNS, inert_warnings, render_markdown, summarize

    shares = {"detached": [0.0, 0.0, 0.0, 0.0], "faded": [0.5, 0.2, 1e-4, 0.0], "woke": [0.0, 0.0, 0.3, 0.4],
              "one late": [0.0, 0.0, 2e-3, 0.0], "alive": [0.3, 0.3, 0.3, 0.3]}
    epochs = pd.DataFrame(
        [{"trial_id": f"{row}-{seed}", "row": row, "seed": seed, "epoch": e + 1, "rl/grad_share": v}
         for row, values in shares.items() for seed in (0, 1) for e, v in enumerate(values)]
        + [{"trial_id": f"FCN-{s}", "row": "FCN", "seed": s, "epoch": e, "val/mIoU": 60.0}
           for s in (0, 1) for e in (1, 2, 3, 4)])
    names = ["FCN", *shares]
    trials = pd.DataFrame([{"trial_id": f"{r}-{s}", "row": r, "seed": s, "status": "ok", "val/mIoU": 60.0 + s}
                           for r in names for s in (0, 1)])
    summ = summarize(trials, "val/mIoU", [{"name": n, "paper": None} for n in names], epochs=epochs)
    assert summ.columns.tolist() == SUMMARY_COLUMNS
    assert summ["rl_inert"].tolist() == [False, True, True, False, False, False]
    assert summ["rl_grad_share_max"].iloc[2] == 1e-4 and summ["rl_grad_share_max"].iloc[4] == 2e-3
    assert math.isnan(summ["rl_grad_share_max"].iloc[0])
    md = render_markdown(summ, "val/mIoU")
    assert "| detached †" in md and "| faded †" in md and "| woke †" not in md and "rl/grad_share < 0.001" in md
    warnings = inert_warnings(summ)
    assert [w.split(":")[0] for w in warnings] == ["row 'detached'", "row 'faded'"]
    assert all("rl/grad_share at most" in w and "clipfrac" not in w for w in warnings)
