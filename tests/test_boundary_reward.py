"""r^Boundary (paper 002, Eq. 15) as the class-wise BF score: DAVIS seg2bmap boundaries, a tolerance disk, ignore
bands; and how weighted_reward and latent_rl treat an image without a boundary term. Expected values come from a
loop reference in plain numpy written from the definition (trainers/rl/boundary.py's docstring), not from the code."""
import math

import numpy as np
import pytest
import torch

from trainers.rl import boundary_f1, segmentation_rewards, weighted_reward

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731

FORWARD = ((0, 1), (1, 0), (1, 1))                 # DAVIS seg2bmap: right, bottom, bottom-right
EIGHT = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]


def seg2bmap_ref(m, domain):
    """DAVIS seg2bmap of the bool map m (H, W), pairs with both pixels in `domain` only."""
    h, w = m.shape
    out = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            for di, dj in FORWARD:
                a, b = i + di, j + dj
                if a < h and b < w and domain[i, j] and domain[a, b] and m[i, j] != m[a, b]:
                    out[i, j] = True
    return out


def dilate_disk_ref(m, r):
    """Union over skimage's disk(r): every pixel within Euclidean distance r."""
    h, w = m.shape
    out = np.zeros((h, w), bool)
    for i, j in zip(*np.nonzero(m)):
        for a in range(max(0, i - r), min(h, i + r + 1)):
            for b in range(max(0, j - r), min(w, j + r + 1)):
                if (a - i) ** 2 + (b - j) ** 2 <= r * r:
                    out[a, b] = True
    return out


def touches(m):
    """Pixels with an 8-neighbour in m."""
    h, w = m.shape
    out = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            out[i, j] = any(0 <= i + a < h and 0 <= j + b < w and m[i + a, j + b] for a, b in EIGHT)
    return out


def bfs(seeds, within, steps):
    """Pixels of `within` at most `steps` 8-connected moves (inside `within`) from the seeds in `within`."""
    h, w = within.shape
    reached = seeds & within
    frontier = list(zip(*np.nonzero(reached)))
    for _ in range(steps):
        nxt = []
        for i, j in frontier:
            for a, b in EIGHT:
                p, q = i + a, j + b
                if 0 <= p < h and 0 <= q < w and within[p, q] and not reached[p, q]:
                    reached[p, q] = True
                    nxt.append((p, q))
        frontier = nxt
    return reached


def ref_boundary_f1(pred, gt, k=None, ignore=255, tol=1, band=8):
    """One image (2-D lists or arrays) -> r^Boundary, NaN when gt has no valid pixel. Per class c: bands Z_c (ignore
    pixels within `band` moves through ignore pixels of a valid c and of a valid non-c pixel), TB_c = seg2bmap of
    gt == c on valid pairs + valid c pixels touching Z_c, PB_c = seg2bmap of pred == c on judged pairs (valid or in
    a band); precision: PB_c within the disk of TB_c or of Z_c's seg2bmap marks (Z_c and the pixels whose right,
    bottom or bottom-right neighbour is in Z_c); recall: TB_c within the disk of PB_c, or touching a
    pixel of Z_c reached within `band` moves through Z_c from a pixel of Z_c within the disk of PB_c. DAVIS's F
    per class (both maps empty -> 1, one empty -> 0), 0 for a class in one map only; mean over the classes present
    in gt (valid) or pred (judged). tol: pixels, as boundary.tolerance_pixels gives them."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    valid = gt != ignore
    k = k if k is not None else 1 + max(pred.max(), gt[valid].max(initial=0))
    unknown = ~valid
    zones = []
    for c in range(k):
        if band > 0:
            near_c, near_n = touches(valid & (gt == c)) & unknown, touches(valid & (gt != c)) & unknown
            zones.append(bfs(near_c, unknown, band - 1) & bfs(near_n, unknown, band - 1))
        else:
            zones.append(np.zeros_like(valid))
    judged = valid | np.any(zones, axis=0)
    scores = []
    for c in range(k):
        zone = zones[c]
        in_t, in_p = bool((valid & (gt == c)).any()), bool((judged & (pred == c)).any())
        if not (in_t or in_p):
            continue
        tb = seg2bmap_ref(gt == c, valid) | (valid & (gt == c) & touches(zone))
        pb = seg2bmap_ref(pred == c, judged)
        if not pb.any() and not tb.any():
            scores.append(1.0 if in_t and in_p else 0.0)
            continue
        if not pb.any() or not tb.any():
            scores.append(0.0)
            continue
        marks = zone.copy()
        for i, j in zip(*np.nonzero(zone)):
            for di, dj in FORWARD:
                if i - di >= 0 and j - dj >= 0:
                    marks[i - di, j - dj] = True
        near_pred = dilate_disk_ref(pb, tol)
        precision = (pb & dilate_disk_ref(tb | marks, tol)).sum() / pb.sum()
        reached = bfs(near_pred & zone, zone, band)
        recall = (tb & (near_pred | touches(reached))).sum() / tb.sum()
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores)) if valid.any() else math.nan


def onehot_logits(labels, k, scale=20.0):
    return torch.nn.functional.one_hot(labels.clamp_max(k - 1), k).permute(0, 3, 1, 2).double() * scale


def boundary(pred, gt, k, **kw):
    """r^Boundary through segmentation_rewards (argmax of one-hot logits = pred) -> (B,)."""
    return segmentation_rewards(onehot_logits(pred, k), gt, k, **kw)["boundary"]


def square(r0, c0, n=8, size=16, cls=1):
    lab = torch.zeros(1, size, size, dtype=torch.long)
    lab[0, r0:r0 + n, c0:c0 + n] = cls
    return lab


def ringed_object(size=16, cls=3, inner=(6, 10), outer=(4, 12)):
    """(1, size, size): class `cls` in [inner) squared, ringed by a 255 band out to [outer), background 0 outside
    (VOC's object outlines)."""
    lab = torch.zeros(1, size, size, dtype=torch.long)
    lab[0, outer[0]:outer[1], outer[0]:outer[1]] = 255
    lab[0, inner[0]:inner[1], inner[0]:inner[1]] = cls
    return lab


def boxed(lo, hi, size=16, cls=3):
    lab = torch.zeros(1, size, size, dtype=torch.long)
    lab[0, lo:hi, lo:hi] = cls
    return lab


def blobs(b, k, h, w, g):
    """Random piecewise-constant label maps (nearest-upsampled noise): boundaries that match only in part."""
    small = torch.randint(0, k, (b, 1, max(2, h // 3), max(2, w // 3)), generator=g).float()
    return torch.nn.functional.interpolate(small, size=(h, w))[:, 0].long()


# ---------------------------------------------------------------- the BF score on clean maps

def test_square_shifted_two_pixels_is_the_seg2bmap_reference():
    """The issue's case: an 8x8 square shifted 2 px. seg2bmap marks 32 pixels per class; with the 1-px disk 18 of
    them match on each side (P = R = 18/32), so F = 0.5625 for both classes (thick 8-neighbour boundaries: 0.781)."""
    gt, pred = square(4, 4), square(4, 6)
    expect = ref_boundary_f1(pred[0], gt[0], 2)
    assert expect == pytest.approx(18 / 32)
    assert boundary(pred, gt, 2).item() == pytest.approx(expect, abs=1e-6)


def test_uniform_wrong_class_scores_zero():
    """A one-class target predicted wholly as another class: no boundary in either map, but each class is in one
    map only, so 0 (the DAVIS both-empty rule alone would give 1)."""
    gt = torch.zeros(2, 8, 8, dtype=torch.long)
    pred = torch.tensor([1, 2]).view(2, 1, 1).expand(2, 8, 8).clone()
    assert boundary(pred, gt, 3).tolist() == [0.0, 0.0]
    gt[1, :, :3] = 255                                           # with ignore pixels that separate nothing
    assert boundary(pred, gt, 3).tolist() == [0.0, 0.0]
    assert boundary(gt.clamp_max(2), gt, 3).tolist() == [1.0, 1.0]   # the right class: both empty, both present


def test_perfect_prediction_scores_one():
    gt = torch.cat([square(2, 3, n=5, cls=1), square(0, 8, n=8, cls=2), torch.zeros(1, 16, 16, dtype=torch.long)])
    gt[0, 0, :] = 255                                            # an ignore row along the top edge
    gt[1, 5:7, 5:7] = 255                                        # an ignore speck
    pred = gt.clamp_max(2)                                       # what lies under the ignore pixels does not matter
    pred[0, 0, :5] = 2
    assert boundary(pred, gt, 3).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("tol", [1, 2, 3])
def test_tolerance_is_a_disk_of_that_radius(tol):
    """Vertical edges 3 px apart match only at a radius of 3; an edge 1 px off diagonally (distance sqrt 2) needs
    radius 2: the disk, not the (2t + 1)^2 square. tolerance_pixels: DAVIS's pixels, or a fraction of the diagonal."""
    from trainers.rl.boundary import tolerance_pixels

    assert tolerance_pixels(2, 100, 100) == 2 and tolerance_pixels(0.008, 300, 400) == 4   # ceil(0.008 * 500)
    gt, pred = square(0, 0, n=6, size=12), square(0, 0, n=9, size=12)     # edges at columns 5 and 8
    gt[0, 6:], pred[0, 6:] = 0, 0
    assert boundary(pred, gt, 2, boundary_tolerance=tol).item() == pytest.approx(
        ref_boundary_f1(pred[0], gt[0], 2, tol=tol), abs=1e-6)
    stripes_gt = torch.zeros(1, 12, 12, dtype=torch.long)
    stripes_gt[..., 4:] = 1
    stripes_pred = torch.zeros_like(stripes_gt)
    stripes_pred[..., 7:] = 1
    assert boundary(stripes_pred, stripes_gt, 2, boundary_tolerance=tol).item() == (1.0 if tol >= 3 else 0.0)
    one = torch.zeros(1, 8, 8, dtype=torch.long)
    one[0, 3, 3] = 1                                             # seg2bmap: (2, 2), (2, 3), (3, 2), (3, 3)
    diag = torch.zeros_like(one)
    diag[0, 4, 4] = 1                                            # shifted by (1, 1)
    got = boundary(diag, one, 2, boundary_tolerance=tol).item()
    assert got == pytest.approx(ref_boundary_f1(diag[0], one[0], 2, tol=tol), abs=1e-6)
    assert (got == 1.0) == (tol >= 2)


def test_image_border_is_no_boundary():
    """DAVIS: a class region touching the image border has no boundary along it; only the internal edge counts."""
    gt = torch.zeros(1, 8, 8, dtype=torch.long)
    gt[..., 4:] = 1
    pred = gt.clone()
    pred[0, :, 7] = 0                        # a wrong last column: its edge is new, the border adds nothing
    expect = ref_boundary_f1(pred[0], gt[0], 2)
    assert 0 < expect < 1
    assert boundary(pred, gt, 2).item() == pytest.approx(expect, abs=1e-6)


# ---------------------------------------------------------------- ignore pixels

def test_voc_ignore_band_carries_the_outline():
    """VOC's case: an object ringed by a 2 px ignore band. An all-background prediction scores 0; the right object
    scores 1 wherever inside the band its edge lies; the right shape of the wrong class, or an edge well outside
    the band, scores less."""
    gt, k = ringed_object(), 5
    r = lambda pred: boundary(pred, gt, k).item()   # noqa: E731
    assert r(torch.zeros_like(gt)) == 0.0
    for lo, hi in ((6, 10), (5, 11), (4, 12)):                   # edge on the inner rim, mid-band, outer rim
        assert r(boxed(lo, hi)) == 1.0, (lo, hi)
    assert r(boxed(6, 10, cls=2)) < 0.5
    assert r(boxed(1, 15)) == 0.0                                # 2 px outside the band: nothing matches
    for pred in (torch.zeros_like(gt), boxed(5, 11), boxed(6, 10, cls=2), boxed(1, 15), boxed(7, 9), boxed(2, 14)):
        assert r(pred) == pytest.approx(ref_boundary_f1(pred[0], gt[0], k), abs=1e-6)


def test_band_width_limits_the_outline():
    """A 6 px band carries the outline only when boundary_band reaches across it; else no target pixel lies on an
    outline, the object needs only the right class, and a missing object scores 0 for its class."""
    wide, k = ringed_object(size=24, inner=(9, 15), outer=(3, 21)), 5
    r = lambda pred, band: boundary(pred, wide, k, boundary_band=band).item()   # noqa: E731
    assert r(boxed(9, 15, size=24), 8) == 1.0 and r(torch.zeros_like(wide), 8) == 0.0
    assert r(boxed(9, 15, size=24), 2) == 1.0 and r(torch.zeros_like(wide), 2) == 0.5
    for band in (0, 2, 3, 8):
        for pred in (boxed(9, 15, size=24), boxed(6, 18, size=24), torch.zeros_like(wide)):
            assert r(pred, band) == pytest.approx(ref_boundary_f1(pred[0], wide[0], k, band=band), abs=1e-6)


def test_prediction_on_ignore_pixels_outside_bands_never_counts():
    gt = square(1, 1, n=5, size=8)
    gt[0, 3, 3] = gt[0, 7, 0] = gt[0, 0, 7] = 255               # inside the square, and in background corners
    pred = gt.clamp_max(1)
    noisy = pred.clone()
    noisy[gt == 255] = torch.tensor([2, 2, 2])                   # a third class only on ignore pixels
    assert boundary(pred, gt, 3).item() == 1.0 and boundary(noisy, gt, 3).item() == 1.0


def test_all_ignore_image_has_no_boundary_term():
    gt = torch.full((3, 8, 8), 255, dtype=torch.long)
    gt[1] = square(2, 2, n=4, size=8)[0]
    gt[2, 0, 0] = 0                                              # one valid pixel is enough for a term
    for pred in (torch.zeros(3, 8, 8, dtype=torch.long), square(2, 2, n=4, size=8).expand(3, 8, 8)):
        got = boundary(pred, gt, 2)
        assert math.isnan(got[0]) and not got[1:].isnan().any()
    # the prediction on an all-ignore image changes nothing
    assert boundary(torch.randint(0, 2, (1, 8, 8), generator=G(0)), gt[:1], 2).isnan().all()


# ---------------------------------------------------------------- against the reference on random maps

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tol,band", [(1, 8), (2, 3), (0.2, 0), (3, 1)])
def test_random_maps_equal_the_numpy_reference(seed, tol, band):
    """Blobby random maps with ignore specks, an ignore band along some target edges, an all-ignore image and a
    uniform image; several tolerances (0.2: a fraction of the diagonal, as DAVIS) and band widths."""
    from trainers.rl.boundary import tolerance_pixels

    g = G(100 + seed)
    b, h, w, k = 6, 11, 13, 4
    pred, gt = blobs(b, k, h, w, g), blobs(b, k, h, w, g)
    edge = torch.zeros(b, h, w, dtype=torch.bool)
    edge[..., 1:] |= gt[..., 1:] != gt[..., :-1]
    gt[(torch.rand(b, h, w, generator=g) < 0.05) | (edge & (torch.rand(b, 1, 1, generator=g) < 0.5))] = 255
    gt[2] = 255
    gt[3] = 1
    got = boundary_f1(pred, gt.masked_fill(gt == 255, 0), gt != 255, k, tolerance=tol, band=band)
    t = tolerance_pixels(tol, h, w)
    expect = torch.tensor([ref_boundary_f1(pred[i], gt[i], k, tol=t, band=band) for i in range(b)],
                          dtype=torch.float32)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6, equal_nan=True)
    partial = expect[[0, 1, 4, 5]]
    assert ((partial > 0) & (partial < 1)).any()                 # not a trivially 0 / 1 batch


@pytest.mark.parametrize("h,w", [(1, 1), (1, 6), (3, 2), (2, 7)])
def test_tiny_images_with_a_tolerance_larger_than_the_image(h, w):
    g = G(200 + 10 * h + w)
    pred, gt = torch.randint(0, 3, (4, h, w), generator=g), torch.randint(0, 3, (4, h, w), generator=g)
    gt[torch.rand(4, h, w, generator=g) < 0.3] = 255
    got = boundary_f1(pred, gt.masked_fill(gt == 255, 0), gt != 255, 3, tolerance=5, band=2)
    expect = torch.tensor([ref_boundary_f1(pred[i], gt[i], 3, tol=5, band=2) for i in range(4)], dtype=torch.float32)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6, equal_nan=True)


def test_many_classes_use_several_bytes():
    """K > 8 and K > 63: class sets span several bytes; classes 8 and 70 behave as class 0 does."""
    gt, pred = square(4, 4), square(4, 6)
    for k, cls in ((9, 8), (71, 70)):
        got = boundary(pred * cls, gt * cls, k).item()
        assert got == pytest.approx(18 / 32), k


# ---------------------------------------------------------------- weighted_reward and the logged mean

def test_weighted_reward_leaves_out_a_missing_term_and_rescales():
    """An image without a boundary term gets the weighted sum of its other terms times (sum of all weights) /
    (sum of its terms' weights); images with every term get Eq. 15's plain sum."""
    r = {"iou": torch.tensor([0.5, 1.0, 0.2]), "dice": torch.tensor([0.2, 0.4, 0.1]),
         "ce": torch.tensor([0.9, 0.1, 0.3]), "boundary": torch.tensor([1.0, math.nan, math.nan])}
    wts = {"iou": 1.0, "dice": 0.5, "ce": 2.0, "boundary": 1.5}
    got = weighted_reward(r, wts)
    expect = torch.tensor([0.5 + 0.1 + 1.8 + 1.5, (1.0 + 0.2 + 0.2) * 5.0 / 3.5, (0.2 + 0.05 + 0.6) * 5.0 / 3.5])
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(weighted_reward(r, {"iou": 1.0, "boundary": 0.0}), r["iou"])   # weight 0: unread
    assert weighted_reward(r, {"boundary": 1.0}).tolist() == [1.0, 0.0, 0.0]   # no term at all: 0


def test_all_ignore_image_reward_through_segmentation_rewards():
    gt = torch.full((2, 8, 8), 255, dtype=torch.long)
    gt[0] = square(2, 2, n=4, size=8)[0]
    out = segmentation_rewards(onehot_logits(gt.clamp_max(1), 2), gt, 2)
    assert out["boundary"][0] == 1.0 and out["boundary"][1].isnan()
    r = weighted_reward(out, {"iou": 1, "dice": 1, "ce": 1, "boundary": 1})
    assert r[0] == pytest.approx(3 + out["ce"][0].item()) and r[1] == 0.0      # iou = dice = ce = 0 without pixels
    assert torch.isfinite(r).all()


def test_latent_rl_logs_the_boundary_mean_over_images_that_have_one():
    from trainers.config import Config
    from trainers.methods import build_method

    cfg = Config.model_validate({"data": {"image_size": 32, "train_size": 16, "val_size": 8},
                                 "method": {"name": "latent_rl", "policy": {"pool": [2, 2]}}})
    torch.manual_seed(0)
    model = build_method(cfg, num_classes=8, ignore_index=255)
    seen = {}
    decode = model.decode

    def record_decode(z, s, size):
        seen["logits"] = decode(z, s, size)
        return seen["logits"]

    model.decode = record_decode
    x = torch.randn(4, 3, 32, 32, generator=G(1))
    y = torch.randint(0, 8, (4, 32, 32), generator=G(2))
    y[1] = 255
    out = model(x, y)
    per_image = segmentation_rewards(seen["logits"].detach(), y, 8)["boundary"]
    assert per_image[1].isnan() and not per_image[[0, 2, 3]].isnan().any()
    torch.testing.assert_close(out["reward_boundary"], per_image[[0, 2, 3]].mean())
    assert torch.isfinite(out["reward"]) and torch.isfinite(out["loss"])
