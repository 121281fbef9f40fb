"""Segmentation losses: L_seg of paper 002 Eq. 2 (CE), optionally + soft Dice (CLIP-RL uses CE + Dice)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0) -> torch.Tensor:
    """Multi-class soft Dice, 1 - mean_k (2 sum p g + s) / (sum p + sum g + s), over the batch's valid pixels.

    logits (B, K, H, W), target (B, H, W) int64 with `ignore_index` pixels excluded.
    """
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)                         # (B, 1, H, W)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(target.masked_fill(~valid.squeeze(1), 0), num_classes).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, cfg, ignore_index: int = 255,
                      pixel_ce: bool = False) -> dict[str, torch.Tensor]:
    """L_seg = cfg.ce * CE + cfg.dice * Dice; returns the total and its terms (for logging). CE is the mean over
    the batch's valid pixels, or with cfg.ce_reduction "image_sum" Eq. 2's sum over each image's pixels, averaged
    over the images.
    pixel_ce: also return the per-pixel CE (B, H, W) as "pixel_ce" (0 on ignore pixels), for a caller that needs
    both (latent_rl's r^CE)."""
    if pixel_ce or cfg.ce_reduction == "image_sum":
        per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
        count = target.shape[0] if cfg.ce_reduction == "image_sum" else (target != ignore_index).sum()
        ce = per_pixel.sum() / count
    else:
        ce = F.cross_entropy(logits, target, ignore_index=ignore_index)
    out = {"loss_seg": cfg.ce * ce, "loss_ce": ce.detach()}
    if pixel_ce:
        out["pixel_ce"] = per_pixel
    if cfg.dice > 0:
        dice = dice_loss(logits, target, ignore_index)
        out["loss_seg"] = out["loss_seg"] + cfg.dice * dice
        out["loss_dice"] = dice.detach()
    return out
