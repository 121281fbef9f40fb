"""Foreground-map metrics of the COD / SOD literature, batched: S-measure, weighted F-measure, mean E-measure, MAE,
and binary IoU. Every function takes pred (N, H, W) in [0, 1] and a binary gt (N, H, W) and returns (N,) per image.

The reference is pysodmetrics (PyPI `pysodmetrics`, `py_sod_metrics.sod_metrics`: Smeasure, WeightedFmeasure,
Emeasure, MAE), itself a port of the authors' MATLAB code; tests/test_sod_metrics.py checks each against it on
random maps. As there, a prediction is min-max normalised per image first (MATLAB's mapminmax(im2double(pred)),
`normalize_pred`), which leaves a binary mask unchanged; and the ground truth is binary *once*: the loaders turn
0/255 PNGs into 0/1 masks and nothing binarises again (the Seg-R1 release thresholds an already-binary 0/1 mask at
128, which empties every ground truth: papers/README).

S-measure is torch and differentiable-free (no_grad), cheap enough for the GRPO reward on (B*G, H, W) binary masks.
Weighted F needs a Euclidean distance transform with nearest-feature indices (MATLAB bwdist), which torch lacks:
scipy.ndimage on the CPU, for evaluation only.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

EPS = float(np.spacing(1))     # pysodmetrics' EPS (MATLAB eps)


def normalize_pred(pred: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1] where the map is not constant (pysodmetrics prepare_data, MATLAB mapminmax)."""
    lo = pred.amin((-2, -1), keepdim=True)
    hi = pred.amax((-2, -1), keepdim=True)
    return torch.where(hi > lo, (pred - lo) / (hi - lo).clamp_min(EPS), pred)


def mae(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image (Perazzi et al. 2012)."""
    return (pred - gt.to(pred.dtype)).abs().mean((-2, -1))


def binary_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """|P & G| / |P | G| of binary masks per image; both empty -> 1 (a correct empty prediction)."""
    p, g = pred.bool(), gt.bool()
    inter = (p & g).flatten(1).sum(1).to(torch.float32)
    union = (p | g).flatten(1).sum(1).to(torch.float32)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _masked_mean_std(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, unbiased std (0 for one element) and count of x over mask m, per image; x, m (N, H, W)."""
    n = m.flatten(1).sum(1).to(x.dtype)
    mean = (x * m).flatten(1).sum(1) / n.clamp_min(1)
    var = (((x - mean[:, None, None]) ** 2) * m).flatten(1).sum(1) / (n - 1).clamp_min(1)
    return mean, torch.where(n > 1, var.sqrt(), torch.zeros_like(var)), n


def _object_score(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Fan et al. 2017 object-aware similarity: 2 mean / (mean^2 + 1 + std) on the foreground of pred and on the
    background of 1 - pred, weighted by the foreground share."""
    fg = gt.to(pred.dtype)
    mu_f, sd_f, _ = _masked_mean_std(pred, fg)
    mu_b, sd_b, _ = _masked_mean_std(1 - pred, 1 - fg)
    share = fg.flatten(1).mean(1)
    s_f = 2 * mu_f / (mu_f ** 2 + 1 + sd_f + EPS)
    s_b = 2 * mu_b / (mu_b ** 2 + 1 + sd_b + EPS)
    return s_f * share + s_b * (1 - share)


def _region_score(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Fan et al. 2017 region-aware similarity: the image split into four at the foreground centroid (rounded half
    to even, plus one as in MATLAB's 1:X), an SSIM per quadrant weighted by its area."""
    n, h, w = gt.shape
    dt = pred.dtype
    fg = gt.to(dt)
    count = fg.flatten(1).sum(1)
    rows = torch.arange(h, device=pred.device, dtype=dt)
    cols = torch.arange(w, device=pred.device, dtype=dt)
    cy = torch.where(count > 0, (fg.sum(2) * rows).sum(1) / count.clamp_min(1), torch.full_like(count, h / 2))
    cx = torch.where(count > 0, (fg.sum(1) * cols).sum(1) / count.clamp_min(1), torch.full_like(count, w / 2))
    cy, cx = torch.round(cy) + 1, torch.round(cx) + 1          # torch.round and np.round both round half to even
    top = rows[None, :, None] < cy[:, None, None]              # (N, H, 1)
    left = cols[None, None, :] < cx[:, None, None]             # (N, 1, W)
    total = torch.zeros(n, dtype=dt, device=pred.device)
    for q in (top & left, top & ~left, ~top & left, ~top & ~left):
        q = q.expand(n, h, w).to(dt)
        size = q.flatten(1).sum(1)
        x = (pred * q).flatten(1).sum(1) / size.clamp_min(1)
        y = (fg * q).flatten(1).sum(1) / size.clamp_min(1)
        dx, dy = (pred - x[:, None, None]) * q, (fg - y[:, None, None]) * q
        denom = size - 1 + EPS
        sx, sy = (dx * dx).flatten(1).sum(1) / denom, (dy * dy).flatten(1).sum(1) / denom
        sxy = (dx * dy).flatten(1).sum(1) / denom
        a = 4 * x * y * sxy
        b = (x ** 2 + y ** 2) * (sx + sy)
        ssim = torch.where(a != 0, a / (b + EPS), torch.where(b == 0, torch.ones_like(a), torch.zeros_like(a)))
        total = total + torch.where(size > 0, ssim * size / (h * w), torch.zeros_like(ssim))   # empty quadrant: 0
    return total


@torch.no_grad()
def s_measure(pred: torch.Tensor, gt: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Structure measure (Fan et al. ICCV 2017), alpha 0.5: gt all 0 -> 1 - mean(pred); gt all 1 -> mean(pred);
    else max(0, alpha * object + (1 - alpha) * region). pred (N, H, W) in [0, 1] (already normalised), gt binary."""
    share = gt.to(pred.dtype).flatten(1).mean(1)
    mean_pred = pred.flatten(1).mean(1)
    mixed = (alpha * _object_score(pred, gt) + (1 - alpha) * _region_score(pred, gt)).clamp_min(0)
    return torch.where(share == 0, 1 - mean_pred, torch.where(share == 1, mean_pred, mixed))


@torch.no_grad()
def e_measure_curve(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Enhanced-alignment measure (Fan et al. IJCAI 2018) at the 256 thresholds 255 .. 0 of the uint8 map
    (pysodmetrics Emeasure.cal_em_with_cumsumhistogram), (N, 256); its mean over thresholds is the "mean E-measure"
    of the COD tables. pred in [0, 1] (float64 for the reference's truncation to uint8), gt binary."""
    n, h, w = gt.shape
    size = h * w
    g = gt.bool().flatten(1)
    bins = (pred.to(torch.float64) * 255).to(torch.uint8).flatten(1).long()   # astype(uint8): truncation
    offset = torch.arange(n, device=pred.device)[:, None] * 256
    hist_fg = torch.bincount((bins + offset)[g], minlength=n * 256).view(n, 256).to(torch.float64)
    hist_bg = torch.bincount((bins + offset)[~g], minlength=n * 256).view(n, 256).to(torch.float64)
    tp = hist_fg.flip(1).cumsum(1)                  # predicted fg and gt fg, thresholds 255 .. 0
    fp = hist_bg.flip(1).cumsum(1)
    pred_fg = tp + fp
    pred_bg = size - pred_fg
    gt_fg = g.sum(1, dtype=torch.float64)[:, None].expand_as(tp)
    fn = gt_fg - tp
    tn = pred_bg - fn
    mp, mg = pred_fg / size, gt_fg / size           # means of the binarised prediction and of the gt
    parts = ((tp, 1 - mp, 1 - mg), (fp, 1 - mp, -mg), (fn, -mp, 1 - mg), (tn, -mp, -mg))
    enhanced = sum(count * ((2 * a * b / (a * a + b * b + EPS) + 1) ** 2 / 4) for count, a, b in parts)
    enhanced = torch.where(gt_fg == 0, pred_bg, torch.where(gt_fg == size, pred_fg, enhanced))
    return enhanced / (size - 1 + EPS)


def _matlab_gauss2d(shape: tuple[int, int] = (7, 7), sigma: float = 5.0) -> np.ndarray:
    """fspecial('gaussian', shape, sigma), normalised."""
    m, n = [(s - 1) / 2 for s in shape]
    y, x = np.ogrid[-m:m + 1, -n:n + 1]
    k = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    k[k < np.finfo(k.dtype).eps * k.max()] = 0
    return k / k.sum()


_GAUSS = _matlab_gauss2d()


def weighted_f(pred: torch.Tensor, gt: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Weighted F-measure (Margolin et al. CVPR 2014), as pysodmetrics WeightedFmeasure: errors of background
    pixels taken at their nearest foreground pixel (bwdist indices), smoothed by a 7x7 sigma-5 Gaussian, weighted by
    2 - exp(log(0.5) / 5 * distance) off the object; an empty gt scores 0. (N,) float64, on pred's device.
    The distance transform runs once over the stack, the batch axis spaced far apart so no pixel's nearest
    foreground pixel lies in another image."""
    p = pred.detach().to("cpu", torch.float64).numpy()
    g = gt.detach().to("cpu").numpy().astype(bool)
    n, h, w = g.shape
    dist, (idx_n, idx_y, idx_x) = ndimage.distance_transform_edt(~g, sampling=(4.0 * (h + w), 1.0, 1.0),
                                                                 return_indices=True)
    err = np.abs(p - g)
    err_t = np.where(g, err, err[idx_n, idx_y, idx_x])
    ea = ndimage.convolve(err_t, _GAUSS[None], mode="constant", cval=0.0)
    min_e = np.where(g & (ea < err), ea, err)
    weight = np.where(g, 1.0, 2 - np.exp(np.log(0.5) / 5 * dist))
    ew = min_e * weight
    n_fg = g.reshape(n, -1).sum(1)
    ew_fg = np.where(g, ew, 0.0).reshape(n, -1).sum(1)
    tpw = n_fg - ew_fg
    fpw = np.where(g, 0.0, ew).reshape(n, -1).sum(1)
    recall = 1 - ew_fg / np.maximum(n_fg, 1)
    precision = tpw / (tpw + fpw + EPS)
    q = (1 + beta) * recall * precision / (recall + beta * precision + EPS)   # the reference's (1 + beta), not beta^2
    return torch.from_numpy(np.where(n_fg > 0, q, 0.0)).to(pred.device)


@torch.no_grad()
def foreground_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of a COD / SOD table per image, (N,) float64 each: S_measure, wF, E_measure (mean E), MAE and
    IoU (of pred >= 0.5). pred (N, H, W) in [0, 1] as the model gives it (normalised here), gt binary (N, H, W)."""
    p = normalize_pred(pred.to(torch.float64))
    g = gt.bool()
    return {"S_measure": s_measure(p, g), "wF": weighted_f(p, g), "E_measure": e_measure_curve(p, g).mean(1),
            "MAE": mae(p, g), "IoU": binary_iou(p >= 0.5, g).to(torch.float64)}
