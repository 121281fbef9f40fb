"""Per-image segmentation rewards of paper 002 (Reward Design, Eq. 15), batched on the device.

Every reward is computed for each image of the batch at once: no Python loop over images or classes and no
host sync. Pixels whose target is `ignore_index` (or outside [0, num_classes)) never count:
  * iou / dice / ce use the valid pixels only; an image with no valid pixel gets 0 for all three;
  * boundary: ignore pixels are relabelled to one sentinel label in BOTH the prediction and the target before
    the boundary maps are taken, and boundary pixels lying on ignore pixels are then dropped. So a valid pixel
    touching an ignore band is a boundary pixel of both maps (in VOC the 255 band outlines the objects), the
    prediction on ignore pixels cannot change any reward, and a perfect prediction scores 1. An image with no
    valid pixel has two empty boundary maps and so gets boundary 1 (the DAVIS convention below).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


def _argmax_classes(logits: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 of (B, K, H, W) logits -> (B, H, W) int64, the first maximal class on ties (as
    torch.argmax; a pixel with a NaN logit gets the last class). Through amax and a compare: torch.max(1).indices
    and argmax(1) are 3x and 40x slower on CPU."""
    k = logits.shape[1]
    is_max = logits == logits.amax(1, keepdim=True)
    # weight class c by k-1-c, so the largest weight among the maxima marks the first of them
    rank = torch.arange(k - 1, -1, -1, device=logits.device, dtype=torch.uint8 if k <= 256 else torch.int32)
    return (k - 1) - (is_max * rank.view(1, k, 1, 1)).amax(1).long()


# The 4 neighbour offsets (dy, dx) of the 3x3 neighbourhood up to symmetry: right, down, down-right, down-left.
_PAIRS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _boundary(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """labels (N, H, W) integer, valid (N, H, W) bool -> boundary map (N, H, W) bool.

    Morphological gradient: a pixel is boundary when one of its in-image 8-neighbours holds another label (the
    3x3 max != min; the image border creates no boundary). Each neighbouring pair is compared once and marks
    both of its pixels. Boundary pixels on invalid pixels are dropped.
    """
    h, w = labels.shape[-2:]
    out = torch.zeros_like(valid)
    for dy, dx in _PAIRS:
        x0, x1 = max(0, -dx), w - max(0, dx)          # columns of the first pixel of each pair
        first = (slice(None), slice(0, h - dy), slice(x0, x1))
        second = (slice(None), slice(dy, h), slice(x0 + dx, x1 + dx))
        differ = labels[first] != labels[second]
        out[first] |= differ
        out[second] |= differ
    return out & valid


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """1-pixel tolerance: 3x3 dilation of a (N, H, W) bool map, as a row pass then a column pass."""
    rows = mask.clone()
    rows[..., 1:] |= mask[..., :-1]
    rows[..., :-1] |= mask[..., 1:]
    out = rows.clone()
    out[..., 1:, :] |= rows[..., :-1, :]
    out[..., :-1, :] |= rows[..., 1:, :]
    return out


def _valid(target: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid pixel map, target with invalid pixels set to 0)."""
    target = target.long()
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    return valid, target.masked_fill(~valid, 0)


def _overlap(pred: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image IoU and Dice, each the mean over the classes present in prediction or target -> (B,), (B,)."""
    b = pred.shape[0]
    # Per-image confusion counts in one scatter_add on bins (image, target class, predicted class); valid pixels
    # weigh 1, the others 0. B * K^2 bins: 360k for ADE20K's 150 classes at batch 16.
    bins = (torch.arange(b, device=tgt.device).view(b, 1, 1) * k + tgt) * k + pred
    conf = torch.zeros(b * k * k, dtype=torch.long, device=tgt.device)
    conf = conf.scatter_add_(0, bins.flatten(), valid.flatten().long()).view(b, k, k).float()
    inter = conf.diagonal(dim1=1, dim2=2)
    area_g, area_p = conf.sum(2), conf.sum(1)
    union = area_p + area_g - inter
    present = union > 0
    n_present = present.sum(1).clamp_min(1)
    iou = torch.where(present, inter / union.clamp_min(1), 0.0).sum(1) / n_present
    dice = torch.where(present, 2 * inter / (area_p + area_g).clamp_min(1), 0.0).sum(1) / n_present
    has_valid = valid.flatten(1).any(1)
    return torch.where(has_valid, iou, 0.0), torch.where(has_valid, dice, 0.0)


@torch.no_grad()
def iou_reward(logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """r^IoU alone (as segmentation_rewards(...)["iou"], without the other terms' work) -> (B,)."""
    valid, tgt = _valid(target, num_classes, ignore_index)
    return _overlap(_argmax_classes(logits), tgt, valid, logits.shape[1])[0]


@torch.no_grad()
def segmentation_rewards(logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
                         pixel_ce: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """logits (B, K, H, W), target (B, H, W) int64 -> dict(iou, dice, ce, boundary), each (B,) float32 in [0, 1].

    Prediction = argmax of the logits. iou / dice: mean over the classes present in the prediction or the target
    of that image; ce: exp(-mean pixel cross-entropy) (r^CE, the "inverse" of CE); boundary: boundary F1 with a
    1-pixel tolerance. No gradient: these are rewards, not losses.
    pixel_ce: the per-pixel cross-entropy (B, H, W) of these logits against target, when the caller has it
    already (L_seg with reduction="none"); its values on invalid pixels are not read. None: computed here.
    """
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    valid, tgt = _valid(target, num_classes, ignore_index)
    pred = _argmax_classes(logits)
    n_valid = valid.flatten(1).sum(1)                                      # (B,)
    iou, dice = _overlap(pred, tgt, valid, logits.shape[1])

    # r^CE = exp(-mean CE over the valid pixels).
    if pixel_ce is None:
        pixel_ce = F.cross_entropy(logits.float(), tgt, reduction="none")
    ce_sum = torch.where(valid, pixel_ce.detach().float(), 0.0).flatten(1).sum(1)
    ce = torch.where(n_valid > 0, torch.exp(-ce_sum / n_valid.clamp_min(1)), 0.0)

    # Boundary F1 (DAVIS f_measure style) with a 1-px tolerance; ignore pixels relabelled to a sentinel (-1).
    # Prediction and target in one stacked pass: rows [:B] are the prediction's, rows [B:] the target's.
    b = pred.shape[0]
    valid2 = torch.cat([valid, valid])
    edges = _boundary(torch.cat([pred, tgt]).masked_fill_(~valid2, -1), valid2)     # (2B, H, W)
    n_edges = edges.flatten(1).sum(1)
    # an edge pixel matches when the other map has an edge pixel within 1 px: roll(b) pairs each with the other
    matched = (edges & _dilate(edges).roll(b, 0)).flatten(1).sum(1)
    ratio = matched / n_edges.clamp_min(1)
    precision, recall = ratio[:b], ratio[b:]
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    empty_p, empty_g = n_edges[:b] == 0, n_edges[b:] == 0
    boundary = torch.where(empty_p & empty_g, 1.0, torch.where(empty_p | empty_g, 0.0, f1))

    return {"iou": iou, "dice": dice, "ce": ce, "boundary": boundary}


def weighted_reward(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Eq. 15: r = sum_k lambda_k r_k over the keys whose weight is non-zero -> (B,)."""
    terms = [float(wt) * rewards[name] for name, wt in weights.items() if wt != 0]
    if not terms:
        return torch.zeros_like(next(iter(rewards.values())))
    return torch.stack(terms).sum(0)
