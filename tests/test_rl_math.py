"""RL maths of paper 002 (Eq. 3-19) and GRPO against hand-computed or independently computed values."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from trainers.rl import (Baseline, GaussianLatentPolicy, ema_update, gaussian_kl, gaussian_log_prob,
                         gaussian_log_prob_moments, gaussian_log_ratio_moments, group_advantages, ppo_clip_loss, ppo_stats, sample_moments,
                         segmentation_rewards, weighted_reward)

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


# ---------------------------------------------------------------- Gaussian log-prob and KL (Eq. 5, 12)

def test_log_prob_matches_torch_normal():
    b, d, h, w = 3, 5, 4, 6
    mu, ls = torch.randn(b, d, generator=G(0)), torch.randn(b, d, generator=G(1)) * 0.5
    s = torch.randn(b, d, h, w, generator=G(2)) * 2
    expect = Normal(mu[..., None, None], ls.exp()[..., None, None]).log_prob(s).sum((1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(s, mu, ls), expect)


def test_log_prob_closed_form_small_case():
    # d = 2, h = 1, w = 2; channel 0: mu 0, sigma 1; channel 1: mu 1, sigma e^0.5
    mu = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    ls = torch.tensor([[0.0, 0.5]], dtype=torch.float64)
    s = torch.tensor([[[[1.0, -2.0]], [[1.0, 3.0]]]], dtype=torch.float64)
    c = -0.5 * math.log(2 * math.pi)
    expect = (c - 0.5 * 1.0) + (c - 0.5 * 4.0) \
        + (c - 0.5 - 0.5 * 0.0 / math.e) + (c - 0.5 - 0.5 * 4.0 / math.e)
    assert gaussian_log_prob(s, mu, ls).item() == pytest.approx(expect, abs=1e-12)


def test_kl_closed_form_and_torch():
    b, d, spatial = 4, 6, 12
    mp, mq = torch.randn(b, d, generator=G(3)), torch.randn(b, d, generator=G(4))
    lp, lq = torch.randn(b, d, generator=G(5)) * 0.3, torch.randn(b, d, generator=G(6)) * 0.3
    sp, sq = lp.exp(), lq.exp()
    per_dim = torch.log(sq / sp) + (sp ** 2 + (mp - mq) ** 2) / (2 * sq ** 2) - 0.5
    kl = gaussian_kl(mp, lp, mq, lq, spatial=spatial)
    torch.testing.assert_close(kl, spatial * per_dim.sum(1))
    torch.testing.assert_close(kl, spatial * kl_divergence(Normal(mp, sp), Normal(mq, sq)).sum(1))
    torch.testing.assert_close(gaussian_kl(mp, lp, mq, lq, spatial=(3, 4)), kl)
    assert kl.shape == (b,) and (kl > 0).all()


def test_kl_zero_for_same_and_asymmetric():
    mu, ls = torch.randn(2, 3, generator=G(7)), torch.randn(2, 3, generator=G(8))
    torch.testing.assert_close(gaussian_kl(mu, ls, mu, ls, spatial=16), torch.zeros(2))
    # 1-D: p = N(0, 1), q = N(1, 2^2): KL(p||q) = log 2 + (1 + 1) / 8 - 1/2; KL(q||p) = -log 2 + (4 + 1) / 2 - 1/2
    z, one = torch.zeros(1, 1), torch.ones(1, 1)
    l2 = torch.full((1, 1), math.log(2.0))
    assert gaussian_kl(z, z, one, l2).item() == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)
    assert gaussian_kl(one, l2, z, z).item() == pytest.approx(-math.log(2) + 2.5 - 0.5, rel=1e-6)


# ---------------------------------------------------------------- sampling (Eq. 11)

def test_sample_shape_reparameterised_and_seeded():
    mu = torch.tensor([[0.5, -1.0]], requires_grad=True)
    ls = torch.tensor([[0.0, -0.5]], requires_grad=True)
    s = GaussianLatentPolicy.sample(mu, ls, spatial=(3, 5), generator=G(0))
    assert s.shape == (1, 2, 3, 5)
    s.sum().backward()
    assert mu.grad is not None and ls.grad is not None
    torch.testing.assert_close(mu.grad, torch.full((1, 2), 15.0))    # ds/dmu = 1 at each of 15 positions
    assert ls.grad.abs().sum() > 0
    s1 = GaussianLatentPolicy.sample(mu.detach(), ls.detach(), (3, 5), generator=G(42))
    s2 = GaussianLatentPolicy.sample(mu.detach(), ls.detach(), (3, 5), generator=G(42))
    assert torch.equal(s1, s2)


def test_sample_empirical_moments():
    mu = torch.tensor([[2.0, -1.0, 0.0]])
    ls = torch.tensor([[math.log(0.5), 0.0, math.log(3.0)]])
    s = GaussianLatentPolicy.sample(mu, ls, spatial=(200, 200), generator=G(1))
    torch.testing.assert_close(s.mean((0, 2, 3)), mu[0], atol=0.03, rtol=0)
    torch.testing.assert_close(s.std((0, 2, 3)), ls[0].exp(), atol=0.03, rtol=0)


# ---------------------------------------------------------------- policy network (Eq. 7-10)

@pytest.mark.parametrize("hw,pool", [((8, 8), (4, 4)), ((5, 7), (1, 1)), ((2, 3), (2, 3)), ((9, 4), (4, 2))])
def test_policy_shapes(hw, pool):
    d = 6
    pi = GaussianLatentPolicy(d, blocks=2, pool=pool)
    assert pi.fc_mu.in_features == pool[0] * pool[1] * d and pi.fc_logsigma.out_features == d
    assert len(pi.conv_proj) == 2
    mu, ls = pi(torch.randn(3, d, *hw, generator=G(0)))
    assert mu.shape == (3, d) and ls.shape == (3, d)
    assert pi.sample(mu, ls, spatial=hw).shape == (3, d, *hw)


def test_policy_default_blocks_is_four():
    assert len(GaussianLatentPolicy(4).conv_proj) == 4


@pytest.mark.parametrize("c", [4.0, 1.0])
def test_log_sigma_bounded(c):
    torch.manual_seed(0)
    pi = GaussianLatentPolicy(8, blocks=2, pool=(2, 2), log_sigma_bound=c).eval()   # eval: BN does not rescale
    _, ls = pi(torch.randn(4, 8, 6, 6, generator=G(1)) * 1e6)
    assert ls.abs().max() <= c
    assert ls.abs().max() > 0.99 * c          # saturated, so the bound is what holds it


def test_log_sigma_unbounded_can_exceed_four():
    torch.manual_seed(0)
    pi = GaussianLatentPolicy(8, blocks=2, pool=(2, 2), log_sigma_bound=None).eval()
    _, ls = pi(torch.randn(4, 8, 6, 6, generator=G(1)) * 1e6)
    assert ls.abs().max() > 4


# ---------------------------------------------------------------- PPO (Eq. 4)

def test_ppo_clip_hand_values_and_gradients():
    rho = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -3.0], dtype=torch.float64)
    # min(rho A, clip(rho) A) by hand: 1.2, -1.5, 0.5, -0.8, 2.2, -2.7
    per = torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2, 2.7], dtype=torch.float64)
    for i in range(len(rho)):
        logp = torch.log(rho[i:i + 1]).requires_grad_()
        loss = ppo_clip_loss(logp, torch.zeros(1, dtype=torch.float64), adv[i:i + 1], eps=0.2)
        assert loss.item() == pytest.approx(per[i].item(), abs=1e-12)
    logp = torch.log(rho).requires_grad_()
    logp_old = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    loss = ppo_clip_loss(logp, logp_old, adv, eps=0.2)
    assert loss.item() == pytest.approx(per.mean().item(), abs=1e-12)
    loss.backward()
    # clipped-and-active samples (0: rho 1.5 A>0, 3: rho 0.5 A<0) get no gradient; others d/dlogp = -rho A / B
    expect = torch.tensor([0.0, 1.5, -0.5, 0.0, -2.2, 2.7], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, expect)
    assert logp_old.grad is None      # logp_old is a constant


def test_ppo_stats_known_case():
    rho = torch.tensor([1.0, 1.5, 0.5, 1.1])
    st = ppo_stats(torch.log(rho), torch.zeros(4), eps=0.2)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    k3 = [(r - 1) - math.log(r) for r in (1.0, 1.5, 0.5, 1.1)]
    assert st["approx_kl"].item() == pytest.approx(sum(k3) / 4, rel=1e-5)
    assert isinstance(st["approx_kl"], torch.Tensor) and st["approx_kl"].dim() == 0


# ---------------------------------------------------------------- baselines and advantages (Eq. 16-18, GRPO)

def test_ema_baseline_hand_sequence():
    bl = Baseline("ema", tau=0.5)
    batches = [torch.tensor([0.0, 2.0]), torch.tensor([2.0, 4.0]), torch.tensor([1.0, 3.0])]   # means 1, 3, 2
    expect_b = [1.0, 0.5 * 1.0 + 0.5 * 3.0, 0.5 * 2.0 + 0.5 * 2.0]                              # 1, 2, 2
    for r, b in zip(batches, expect_b):
        adv = bl.advantages(r)
        assert bl.value.item() == pytest.approx(b)
        torch.testing.assert_close(adv, r - b)
    assert not bl.value.requires_grad and bl.value.dim() == 0


def test_ema_baseline_first_call_and_no_grad():
    bl = Baseline("ema", tau=0.9)
    r = torch.tensor([0.2, 0.4, 0.9], requires_grad=True)
    adv = bl.advantages(r)
    torch.testing.assert_close(adv, (r - r.mean()).detach())
    assert not adv.requires_grad and not bl.b.requires_grad
    adv = bl.advantages(torch.tensor([1.5, 1.5, 1.5]))
    b2 = 0.9 * 0.5 + 0.1 * 1.5
    assert bl.value.item() == pytest.approx(b2)
    torch.testing.assert_close(adv, torch.full((3,), 1.5 - b2))


def test_none_batch_mean_and_clamp():
    r = torch.tensor([0.0, 1.0, 5.0])
    torch.testing.assert_close(Baseline("none").advantages(r), r)
    torch.testing.assert_close(Baseline("batch_mean").advantages(r), r - 2.0)
    torch.testing.assert_close(Baseline("batch_mean", clip=(-1.0, 1.5)).advantages(r), torch.tensor([-1.0, -1.0, 1.5]))
    torch.testing.assert_close(Baseline("none", clip=(-1.0, 1.5)).advantages(r), torch.tensor([0.0, 1.0, 1.5]))
    torch.testing.assert_close(Baseline("ema", clip=(-0.5, 0.5)).advantages(r), torch.tensor([-0.5, -0.5, 0.5]))
    torch.testing.assert_close(Baseline("none", clip=(None, 1.5)).advantages(r), torch.tensor([0.0, 1.0, 1.5]))
    torch.testing.assert_close(Baseline("none", clip=(None, None)).advantages(r), r)


def test_baseline_state_dict_round_trip():
    bl = Baseline("ema", tau=0.5)
    bl.advantages(torch.tensor([1.0]))
    bl.advantages(torch.tensor([3.0]))                      # b = 2
    fresh = Baseline("ema", tau=0.5)
    fresh.load_state_dict(bl.state_dict())
    assert fresh.value.item() == 2.0 and bool(fresh.initialised)
    fresh.advantages(torch.tensor([4.0]))                   # continues: 0.5 * 2 + 0.5 * 4, not re-initialised to 4
    assert fresh.value.item() == 3.0
    assert set(bl.state_dict()) == {"b", "initialised"}


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="ema"):
        Baseline("ppo")


def test_group_advantages_known_group():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    std = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)           # unbiased: 1.2910
    assert std == pytest.approx(1.2910, abs=1e-4)
    expect = [(x - 2.5) / (std + 1e-4) for x in (1.0, 2.0, 3.0, 4.0)]
    adv = group_advantages(r)
    assert adv[0].tolist() == pytest.approx(expect, abs=1e-12)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]                   # constant group: zeros, no NaN
    torch.testing.assert_close(Baseline("group").advantages(r), adv)
    torch.testing.assert_close(Baseline("group", clip=(-1.0, 1.0)).advantages(r), adv.clamp(-1, 1))


# ---------------------------------------------------------------- EMA old policy (Eq. 19)

def _net():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(4, 2))


@pytest.mark.parametrize("eta", [0.99, 0.5, 1.0, 0.0])
def test_ema_update_exact(eta):
    torch.manual_seed(0)
    src, tgt = _net(), _net().requires_grad_(False)
    with torch.no_grad():
        src[1].running_mean.normal_()
        src[1].running_var.uniform_(0.5, 2.0)
        src[1].num_batches_tracked.fill_(7)
    before = copy.deepcopy(tgt.state_dict())
    ema_update(tgt, src, eta)
    for name, v in tgt.state_dict().items():
        s, t0 = src.state_dict()[name], before[name]
        if v.is_floating_point():
            assert torch.equal(v, eta * t0 + (1 - eta) * s), name
        else:
            assert torch.equal(v, s), name
        if eta == 1.0 and v.is_floating_point():
            assert torch.equal(v, t0)
        if eta == 0.0:
            assert torch.equal(v, s)
    assert all(not p.requires_grad and p.grad is None for p in tgt.parameters())
    assert all(p.requires_grad for p in src.parameters())


def test_ema_update_refuses_trainable_target():
    with pytest.raises(ValueError):
        ema_update(_net(), _net(), 0.9)


# ---------------------------------------------------------------- rewards (Eq. 15)

def onehot_logits(labels, k, scale=20.0):
    """(B, H, W) labels -> (B, K, H, W) logits of `scale` on the label, 0 elsewhere."""
    return F.one_hot(labels.clamp(0, k - 1), k).permute(0, 3, 1, 2).double() * scale


def stripes(split, size=8):
    """Label 0 in columns < split, 1 from column split on."""
    lab = torch.zeros(1, size, size, dtype=torch.long)
    lab[..., split:] = 1
    return lab


def square(r0, c0, n=3, size=8, cls=1):
    lab = torch.zeros(1, size, size, dtype=torch.long)
    lab[0, r0:r0 + n, c0:c0 + n] = cls
    return lab


# r^Boundary's loop reference (the class-wise BF score) and the VOC ring live with the boundary tests
from test_boundary_reward import ref_boundary_f1, ringed_object  # noqa: E402


def test_rewards_perfect_prediction():
    gt = square(2, 3, n=4)
    out = segmentation_rewards(onehot_logits(gt, 3), gt, num_classes=3)
    assert out["iou"].item() == 1.0 and out["dice"].item() == 1.0 and out["boundary"].item() == 1.0
    assert out["ce"].item() == pytest.approx(math.exp(-math.log(1 + 2 * math.exp(-20))), abs=1e-6)   # float32
    assert all(v.dtype == torch.float32 for v in out.values())
    assert all(v.shape == (1,) and not v.requires_grad for v in out.values())


def test_rewards_disjoint_prediction():
    gt = square(2, 3, n=4)
    pred = 1 - gt                                           # every pixel wrong
    out = segmentation_rewards(onehot_logits(pred, 2), gt, num_classes=2)
    assert out["iou"].item() == 0.0 and out["dice"].item() == 0.0
    assert out["ce"].item() == pytest.approx(math.exp(-(20 + math.log(1 + math.exp(-20)))), rel=1e-5)


def test_rewards_stripe_shift_by_hand():
    gt, pred = stripes(4), stripes(6)
    out = segmentation_rewards(onehot_logits(pred, 2), gt, num_classes=2)
    # class 0: |G| 32, |P| 48, inter 32; class 1: |G| 32, |P| 16, inter 16
    assert out["iou"].item() == pytest.approx((32 / 48 + 16 / 32) / 2)
    assert out["dice"].item() == pytest.approx((64 / 80 + 32 / 48) / 2)
    # seg2bmap: gt boundary = column 3, pred boundary = column 5 (both classes); 2 px apart, tolerance 1 -> F = 0
    assert out["boundary"].item() == 0.0
    assert out["ce"].item() == pytest.approx(math.exp(-(16 * 20 + 64 * math.log(1 + math.exp(-20))) / 64), rel=1e-5)


def test_rewards_square_shifts():
    gt = square(2, 2, n=3)
    one = square(3, 2, n=3)                                  # shifted down by one pixel
    two = square(2, 4, n=3)                                  # shifted right by two pixels
    r1 = segmentation_rewards(onehot_logits(one, 2), gt, num_classes=2)
    assert r1["boundary"].item() == 1.0 and r1["iou"].item() < 1.0
    r2 = segmentation_rewards(onehot_logits(two, 2), gt, num_classes=2)
    ref = ref_boundary_f1(two[0].tolist(), gt[0].tolist())
    assert 0.0 < ref < 1.0
    assert r2["boundary"].item() == pytest.approx(ref, abs=1e-6)


def test_rewards_random_maps_match_loop_reference():
    k = 3
    gt = torch.randint(0, k, (4, 7, 9), generator=G(0))
    gt[gt == 2] = torch.where(torch.rand(int((gt == 2).sum()), generator=G(1)) < 0.3, 255, 2)
    gt[0] = 255                                               # an image with no valid pixel
    logits = torch.randn(4, k, 7, 9, generator=G(2), dtype=torch.float64)
    out = segmentation_rewards(logits, gt, num_classes=k)
    pred = logits.argmax(1)
    for i in range(1, 4):
        assert out["boundary"][i].item() == pytest.approx(ref_boundary_f1(pred[i].tolist(), gt[i].tolist(), k),
                                                          abs=1e-6)
    assert out["iou"][0].item() == 0.0 and out["dice"][0].item() == 0.0 and out["ce"][0].item() == 0.0
    assert math.isnan(out["boundary"][0].item())             # no valid pixel: no boundary term


def test_rewards_ignore_pixels_outside_bands_never_count():
    """Ignore pixels that separate nothing (specks inside one class) leave every reward as it is, whatever is
    predicted on them; iou, dice and ce never read the prediction on any ignore pixel."""
    gt = square(1, 1, n=5)
    gt[0, 3, 3] = gt[0, 7, 0] = gt[0, 0, 7] = 255            # inside the square, and in background corners
    logits = torch.randn(1, 2, 8, 8, generator=G(3), dtype=torch.float64)
    other = logits.clone()
    ign = (gt == 255).unsqueeze(1).expand_as(other)
    other[ign] = torch.randn(int(ign.sum()), generator=G(4), dtype=torch.float64) * 50
    a = segmentation_rewards(logits, gt, num_classes=2)
    b = segmentation_rewards(other, gt, num_classes=2)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    perfect = onehot_logits(gt, 2)
    perfect[ign] = torch.randn(int(ign.sum()), generator=G(5), dtype=torch.float64) * 50
    out = segmentation_rewards(perfect, gt, num_classes=2)
    assert out["iou"].item() == 1.0 and out["dice"].item() == 1.0 and out["boundary"].item() == 1.0
    # in a band (row 0 between class 0 above and nothing: the image edge) nothing changes either; a band that
    # separates classes is judged (test_boundary_*), but iou / dice / ce still ignore it
    ringed = ringed_object()
    noisy = onehot_logits(ringed.clamp_max(4), 5)
    band = (ringed == 255).unsqueeze(1).expand_as(noisy)
    noisy2 = noisy.clone()
    noisy2[band] = torch.randn(int(band.sum()), generator=G(6), dtype=torch.float64) * 50
    r1, r2 = segmentation_rewards(noisy, ringed, 5), segmentation_rewards(noisy2, ringed, 5)
    for key in ("iou", "dice", "ce"):
        assert torch.equal(r1[key], r2[key]), key


# the ringed-object (VOC band) and tolerance / band-width tests: tests/test_boundary_reward.py


def test_rewards_batch_has_no_cross_talk():
    gt = torch.cat([stripes(4), square(1, 1, n=5, cls=2)])
    pred = torch.cat([stripes(5), square(2, 1, n=4, cls=1)])
    logits = onehot_logits(pred, 3) + torch.randn(2, 3, 8, 8, generator=G(6), dtype=torch.float64)
    both = segmentation_rewards(logits, gt, num_classes=3)
    for i in range(2):
        alone = segmentation_rewards(logits[i:i + 1], gt[i:i + 1], num_classes=3)
        for key in both:
            torch.testing.assert_close(both[key][i:i + 1], alone[key])


def test_weighted_reward():
    r = {"iou": torch.tensor([0.5, 1.0]), "dice": torch.tensor([0.2, 0.4]),
         "ce": torch.tensor([0.9, 0.1]), "boundary": torch.tensor([1.0, 0.0])}
    torch.testing.assert_close(weighted_reward(r, {"iou": 1, "dice": 1, "ce": 1, "boundary": 1}),
                               torch.tensor([2.6, 1.5]))
    torch.testing.assert_close(weighted_reward(r, {"iou": 2.0, "dice": 0.0, "ce": 0.5, "boundary": 0}),
                               torch.tensor([1.45, 2.05]))
    torch.testing.assert_close(weighted_reward({"iou": r["iou"]}, {"iou": 1.0, "dice": 0.0}), r["iou"])


def test_log_prob_elements_sum_to_eq12():
    g = torch.Generator().manual_seed(0)
    mu, ls = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    s = torch.randn(3, 5, 4, 2, generator=g)
    terms = gaussian_log_prob(s, mu, ls, reduce=False)
    assert terms.shape == (3, 5, 4, 2)
    torch.testing.assert_close(terms.flatten(1).sum(1), gaussian_log_prob(s, mu, ls))
    expect = torch.distributions.Normal(mu[:, :, None, None], ls.exp()[:, :, None, None]).log_prob(s)
    torch.testing.assert_close(terms, expect)


def test_iou_reward_equals_the_iou_term():
    from trainers.rl import iou_reward

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 9, 7, generator=g)
    target = torch.randint(0, 4, (5, 9, 7), generator=g)
    target[0, :3] = 255
    target[4] = 255                                   # no valid pixel: 0 like the composite
    torch.testing.assert_close(iou_reward(logits, target, 4), segmentation_rewards(logits, target, 4)["iou"])


# ---------------------------------------------------------------- fast paths pinned to the straightforward forms

def straightforward_rewards(logits, target, k, ignore=255):
    """Eq. 15 written plainly, one image and one class at a time: argmax, set IoU / Dice, F.cross_entropy, and the
    loop reference of the BF score (r^Boundary)."""
    out = {key: [] for key in ("iou", "dice", "ce", "boundary")}
    pool = lambda x: F.max_pool2d(x[None, None].double(), 3, 1, 1)[0, 0]          # noqa: E731
    for i in range(logits.shape[0]):
        valid = target[i] != ignore
        pred = logits[i].argmax(0)
        ious, dices = [], []
        for c in range(k):
            p, g = (pred == c) & valid, (target[i] == c) & valid
            union = int((p | g).sum())
            if union:
                inter = int((p & g).sum())
                ious.append(inter / union)
                dices.append(2 * inter / int(p.sum() + g.sum()))
        has_valid = bool(valid.any())
        out["iou"].append(sum(ious) / len(ious) if has_valid else 0.0)
        out["dice"].append(sum(dices) / len(dices) if has_valid else 0.0)
        ce = F.cross_entropy(logits[i:i + 1].double(), target[i:i + 1], ignore_index=ignore)
        out["ce"].append(math.exp(-ce.item()) if has_valid else 0.0)
        out["boundary"].append(ref_boundary_f1(pred.tolist(), target[i].tolist(), k, ignore))
    return {key: torch.tensor(v, dtype=torch.float32) for key, v in out.items()}


@pytest.mark.parametrize("k", [2, 5, 21])
def test_rewards_equal_the_straightforward_form(k):
    """Blobby random maps (i.i.d. labels would make every pixel a boundary pixel) with exact ties in the logits,
    scattered ignore pixels, an ignore band and an image with no valid pixel; also with the per-pixel CE passed in
    (as latent_rl does) instead of computed."""
    g = G(10 + k)
    b, h, w = 6, 13, 17
    logits = F.interpolate(torch.randn(b, k, 4, 5, generator=g) * 3, size=(h, w), mode="bilinear")
    logits[:, 1, 5:9] = logits[:, 0, 5:9]                    # exact ties in a band
    target = F.interpolate(torch.randint(0, k, (b, 1, 3, 4), generator=g).float(), size=(h, w))[:, 0].long()
    target[torch.rand(b, h, w, generator=g) < 0.01] = 255
    target[1, 4:6] = 255
    target[2] = 255
    target[3] = 0                                             # no target boundary
    expect = straightforward_rewards(logits, target, k)
    partial = expect["boundary"][[0, 1, 4, 5]]
    assert 0 < partial.min() and partial.max() < 0.98                    # boundaries that match only in part
    pixel_ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    for out in (segmentation_rewards(logits, target, k), segmentation_rewards(logits, target, k, pixel_ce=pixel_ce)):
        for key in expect:
            torch.testing.assert_close(out[key], expect[key], rtol=0, atol=1e-6, equal_nan=key == "boundary", msg=key)


def test_argmax_takes_the_first_maximal_class():
    from trainers.rl.rewards import _argmax_classes

    g = G(20)
    for k in (1, 3, 8, 300):                                    # 300 > 256: the wider rank dtype
        logits = torch.randint(-2, 3, (2, k, 6, 7), generator=g).float()     # many exact ties
        assert torch.equal(_argmax_classes(logits), logits.argmax(1)), k


def test_log_prob_from_moments_equals_eq12_values_and_gradients():
    """The image-level log-density from the sample's moments about its own mean equals Eq. 12 summed element by
    element, for phi (at the centre) and for another policy (phi_old), with far-from-zero means and small sigmas."""
    g = G(30)
    b, d, h, w = 3, 6, 5, 4
    for mu_scale, ls_shift in ((1.0, 0.0), (50.0, -4.0), (0.1, 3.0)):
        mu = (torch.randn(b, d, generator=g, dtype=torch.float64) * mu_scale).requires_grad_()
        ls = (torch.randn(b, d, generator=g, dtype=torch.float64) * 0.3 + ls_shift).requires_grad_()
        s = GaussianLatentPolicy.sample(mu.detach(), ls.detach(), (h, w), generator=g)
        mu_o = mu.detach() + 0.1 * torch.randn(b, d, generator=g, dtype=torch.float64)
        ls_o = ls.detach() - 0.2
        moments = sample_moments(s, center=mu)
        assert moments.count == h * w
        for m_, l_ in ((mu, ls), (mu_o, ls_o)):
            fast = gaussian_log_prob_moments(moments, m_, l_)
            slow = gaussian_log_prob(s, m_, l_)
            torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-9)
        grads = [torch.autograd.grad(f(mu, ls).sum(), (mu, ls))
                 for f in (lambda a, c: gaussian_log_prob_moments(moments, a, c), lambda a, c: gaussian_log_prob(s, a, c))]
        for fast, slow in zip(*grads):
            torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-9)


def test_image_log_ratio_at_paper_shapes_matches_a_float64_elementwise_reference():
    """Eq. 4's image-level log rho at the paper's latent (d = 2048, 64 x 64, float32 as trained): random (mu, sigma)
    for phi, phi_old a small step away, s drawn from phi. Reference: Eq. 12 element by element in float64 for both
    policies, then their difference. The difference of two float32 image sums (each ~1e7 in size) was off by
    ~0.1-0.3 here; the channel-wise float64 form must agree to 1e-3 absolute (float32 rounding of s and of its
    moments is what is left), and its gradient must be that of log pi_phi."""
    g = G(60)
    b, d, h, w = 2, 2048, 64, 64
    mu = torch.randn(b, d, generator=g)
    ls = 0.5 * torch.randn(b, d, generator=g) - 1.0
    mu_o = mu + 1e-3 * torch.randn(b, d, generator=g)
    ls_o = ls + 1e-3 * torch.randn(b, d, generator=g)
    s = GaussianLatentPolicy.sample(mu, ls, (h, w), generator=g)
    mu_v, ls_v = mu.clone().requires_grad_(), ls.clone().requires_grad_()
    fast = gaussian_log_ratio_moments(sample_moments(s, center=mu), mu_v, ls_v, mu_o, ls_o)
    s64 = s.double()
    ref = gaussian_log_prob(s64, mu.double(), ls.double()) - gaussian_log_prob(s64, mu_o.double(), ls_o.double())
    assert ref.abs().min() > 1.0                  # a log rho far from 0, as at paper shapes after one step
    assert (fast.double() - ref).abs().max() <= 1e-3, (fast, ref)
    grads = torch.autograd.grad(fast.sum(), (mu_v, ls_v))
    mu64, ls64 = mu.double().requires_grad_(), ls.double().requires_grad_()
    slow = torch.autograd.grad(gaussian_log_prob(s64, mu64, ls64).sum(), (mu64, ls64))
    for fast_g, slow_g in zip(grads, slow):
        torch.testing.assert_close(fast_g.double(), slow_g, rtol=1e-4, atol=1e-2)


def test_gaussian_kl_near_equal_policies_matches_float64_closed_form():
    """Eq. 5 for two policies 1e-4 apart at the paper's d and h*w: no 1 - 1 cancellation in float32."""
    g = G(61)
    mu_p, ls_p = torch.randn(2, 2048, generator=g), 0.5 * torch.randn(2, 2048, generator=g)
    mu_q, ls_q = mu_p + 1e-4 * torch.randn(2, 2048, generator=g), ls_p + 1e-4 * torch.randn(2, 2048, generator=g)
    p = Normal(mu_p.double(), ls_p.double().exp())
    q = Normal(mu_q.double(), ls_q.double().exp())
    ref = 4096 * kl_divergence(p, q).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu_p, ls_p, mu_q, ls_q, spatial=(64, 64)).double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("hw,pool", [((8, 8), (4, 4)), ((6, 9), (3, 3)), ((7, 5), (4, 2)), ((5, 5), (1, 1))])
def test_policy_pool_equals_adaptive_average_pool(hw, pool):
    pi = GaussianLatentPolicy(4, blocks=1, pool=pool)
    x = torch.randn(2, 4, *hw, generator=G(40), requires_grad=True)
    fast = pi.pooled(x)
    slow = F.adaptive_avg_pool2d(x, pool)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-7)
    gy = torch.randn(slow.shape, generator=G(41))
    torch.testing.assert_close(torch.autograd.grad(fast, x, gy)[0], torch.autograd.grad(slow, x, gy)[0])


def test_ema_update_moves_every_float_tensor_exactly_and_copies_counters():
    """ema_update on a policy (16 parameters, BN running stats and counters) equals the per-tensor formula."""
    torch.manual_seed(0)
    src = GaussianLatentPolicy(4, blocks=2, pool=(2, 2))
    src(torch.randn(3, 4, 4, 4, generator=G(50)))               # moves BN running stats and counters
    tgt = GaussianLatentPolicy(4, blocks=2, pool=(2, 2)).requires_grad_(False)
    before = copy.deepcopy(tgt.state_dict())
    ema_update(tgt, src, 0.7)
    for name, v in tgt.state_dict().items():
        s = src.state_dict()[name]
        expect = 0.7 * before[name] + 0.3 * s if v.is_floating_point() else s
        assert torch.equal(v, expect), name
