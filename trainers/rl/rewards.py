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


def _neighbours(x: torch.Tensor, pad_mode: str) -> list[torch.Tensor]:
    """The 9 shifted views of a (B, H, W) map over its 3x3 neighbourhood (border padded by `pad_mode`).
    Shifted views + elementwise ops: several times faster on CPU than max_pool2d, identical results."""
    h, w = x.shape[-2:]
    p = F.pad(x.unsqueeze(1), (1, 1, 1, 1), mode=pad_mode).squeeze(1)
    return [p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def _boundary(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """labels (B, H, W) float, valid (B, H, W) bool -> boundary map (B, H, W) bool.

    Morphological gradient: a pixel is boundary when its 3x3 neighbourhood holds another label (max != min).
    Replicate padding, so the image border creates no boundary. Boundary pixels on invalid pixels are dropped.
    """
    out = torch.zeros_like(valid)
    for n in _neighbours(labels, "replicate"):
        out |= n != labels
    return out & valid


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """1-pixel tolerance: 3x3 dilation of a (B, H, W) bool map."""
    out = torch.zeros_like(mask)
    for n in _neighbours(mask.to(torch.uint8), "constant"):
        out |= n.bool()
    return out


def _valid(target: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid pixel map, target with invalid pixels set to 0)."""
    target = target.long()
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    return valid, target.masked_fill(~valid, 0)


def _overlap(pred: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image IoU and Dice, each the mean over the classes present in prediction or target -> (B,), (B,)."""
    b = pred.shape[0]
    # Per-image, per-class counts by scatter_add on offsets b*K + class (valid pixels weigh 1, others 0).
    offset = (torch.arange(b, device=tgt.device) * k).view(b, 1, 1)
    w = valid.long().flatten()

    def counts(cls: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(b * k, dtype=torch.long, device=tgt.device)
        return out.scatter_add_(0, (offset + cls).flatten(), weight).view(b, k).float()

    inter = counts(tgt, w * (pred == tgt).long().flatten())
    area_p = counts(pred, w)
    area_g = counts(tgt, w)
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
    return _overlap(logits.max(1).indices, tgt, valid, logits.shape[1])[0]


@torch.no_grad()
def segmentation_rewards(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                         ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """logits (B, K, H, W), target (B, H, W) int64 -> dict(iou, dice, ce, boundary), each (B,) float32 in [0, 1].

    Prediction = argmax of the logits. iou / dice: mean over the classes present in the prediction or the target
    of that image; ce: exp(-mean pixel cross-entropy) (r^CE, the "inverse" of CE); boundary: boundary F1 with a
    1-pixel tolerance. No gradient: these are rewards, not losses.
    """
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    valid, tgt = _valid(target, num_classes, ignore_index)
    pred = logits.max(1).indices                 # = argmax(1); argmax over dim 1 is ~8x slower on CPU
    n_valid = valid.flatten(1).sum(1)                                      # (B,)
    iou, dice = _overlap(pred, tgt, valid, logits.shape[1])

    # r^CE = exp(-mean CE over the valid pixels).
    ce_pix = F.cross_entropy(logits.float(), tgt, reduction="none") * valid
    ce = torch.where(n_valid > 0, torch.exp(-ce_pix.flatten(1).sum(1) / n_valid.clamp_min(1)), 0.0)

    # Boundary F1 (DAVIS f_measure style) with a 1-px tolerance; ignore pixels relabelled to a sentinel (-1).
    pred_b = _boundary(pred.float().masked_fill(~valid, -1.0), valid)
    gt_b = _boundary(tgt.float().masked_fill(~valid, -1.0), valid)
    n_pb = pred_b.flatten(1).sum(1).float()
    n_gb = gt_b.flatten(1).sum(1).float()
    precision = (pred_b & _dilate(gt_b)).flatten(1).sum(1) / n_pb.clamp_min(1)
    recall = (gt_b & _dilate(pred_b)).flatten(1).sum(1) / n_gb.clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    empty_p, empty_g = n_pb == 0, n_gb == 0
    boundary = torch.where(empty_p & empty_g, 1.0, torch.where(empty_p | empty_g, 0.0, f1))

    return {"iou": iou, "dice": dice, "ce": ce, "boundary": boundary}


def weighted_reward(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Eq. 15: r = sum_k lambda_k r_k over the keys whose weight is non-zero -> (B,)."""
    terms = [float(wt) * rewards[name] for name, wt in weights.items() if wt != 0]
    if not terms:
        return torch.zeros_like(next(iter(rewards.values())))
    return torch.stack(terms).sum(0)
