"""promptable_pretrain: train a promptable segmenter (trainers/models/promptable.py) on foreground data with random
prompts, as SAM is trained (Kirillov et al. 2023, Sec. 3 "Training": a box from the mask with noise, points drawn
inside / outside the object). Its final checkpoint is the frozen segmenter that `seg_r1` prompts.

    boxes  = bbox(gt) + N(0, jitter * side) per coordinate          (SAM: noise of 10% of the box side)
    points = K_i ~ U{0..max_points} points per image, each positive (a foreground pixel) or negative (background)
             with probability 1/2; unused slots are SAM's padding (label -1); with probability 1 - box_prob no box
             (then at least one point)
    loss   = bce * BCE + dice * Dice on the mask logits                (SAM: focal 20 : dice 1; BCE here, small model)

Evaluation prompts with the ground-truth box (an oracle prompt: the segmenter's ceiling for `seg_r1`) and reports
the COD metrics (val/S_measure, val/IoU, ...; trainers.sod_metrics).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trainers.config import MethodConfig, Strict
from trainers.methods import register_method
from trainers.methods.base import SegMethod
from trainers.models.promptable import PROMPTABLE, build_promptable
from trainers.registry import load_all
from trainers.sod_metrics import foreground_metrics


class SegmenterConfig(Strict):
    name: str = "promptable_tiny"     # a PROMPTABLE registry name: promptable_tiny | sam2.1_hiera_{tiny,...,large}
    checkpoint: str | None = None     # local weights; seg_r1 with promptable_tiny and null: obtained (trainers.methods.segmenter_cache)
    dim: int = Field(32, ge=8)        # promptable_tiny widths
    depth: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    mlp: int = Field(64, ge=1)

    def model_post_init(self, _ctx) -> None:
        load_all()
        PROMPTABLE.get(self.name)     # unknown names list the known ones


class PromptSampling(Strict):
    box_prob: float = Field(0.9, ge=0, le=1)
    max_points: int = Field(4, ge=0)
    box_jitter: float = Field(0.1, ge=0)     # std of the corner noise, a fraction of the box side (SAM: 0.1)


class PretrainLoss(Strict):
    bce: float = Field(1.0, ge=0)
    dice: float = Field(1.0, ge=0)


class PromptablePretrainConfig(MethodConfig):
    name: Literal["promptable_pretrain"] = "promptable_pretrain"
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    prompts: PromptSampling = Field(default_factory=PromptSampling)
    loss: PretrainLoss = Field(default_factory=PretrainLoss)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (N, 4) x1, y1, x2, y2 in [0, 1] (pixel edges) of binary masks (N, H, W); an empty mask gives the
    whole image."""
    n, h, w = masks.shape
    m = masks.bool()
    rows, cols = m.any(2), m.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = torch.tensor(10 ** 6, device=masks.device)
    y1 = torch.where(rows, ar_h, big).amin(1)
    y2 = torch.where(rows, ar_h, -big).amax(1) + 1
    x1 = torch.where(cols, ar_w, big).amin(1)
    x2 = torch.where(cols, ar_w, -big).amax(1) + 1
    box = torch.stack([x1 / w, y1 / h, x2 / w, y2 / h], 1).float()
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)
    return torch.where(m.flatten(1).any(1)[:, None], box, whole)


def sample_pixels(weights: torch.Tensor, k: int) -> torch.Tensor:
    """k pixel centres (N, k, 2) as x, y in [0, 1], drawn with replacement in proportion to weights (N, H, W); a row
    of zeros draws uniformly."""
    n, h, w = weights.shape
    flat = weights.flatten(1).float()
    flat = torch.where(flat.sum(1, keepdim=True) > 0, flat, torch.ones_like(flat))
    idx = torch.multinomial(flat, k, replacement=True)
    return torch.stack([(idx % w + 0.5) / w, (idx // w + 0.5) / h], -1)


def random_prompts(masks: torch.Tensor, cfg: PromptSampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM-style random prompts for binary masks (N, H, W): boxes (N, 4) (all-zero where absent), points (N, K, 2),
    labels (N, K) in {-1, 0, 1}, K = max_points; plus has_box (N,) bool. Vectorised (no per-image loop)."""
    n = masks.shape[0]
    dev = masks.device
    box = mask_boxes(masks)
    side = torch.cat([box[:, 2:] - box[:, :2]] * 2, 1)
    box = (box + torch.randn_like(box) * cfg.box_jitter * side).clamp(0, 1)
    k = cfg.max_points
    has_box = torch.rand(n, device=dev) < cfg.box_prob
    count = torch.randint(0, k + 1, (n,), device=dev) if k else torch.zeros(n, dtype=torch.long, device=dev)
    count = torch.where(~has_box & (count == 0), torch.ones_like(count), count) if k else count
    positive = torch.rand(n, k, device=dev) < 0.5
    fg = sample_pixels(masks, k)
    bg = sample_pixels(1 - masks, k)
    points = torch.where(positive[..., None], fg, bg)
    labels = torch.where(torch.arange(k, device=dev) < count[:, None], positive.long(), torch.full_like(count[:, None], -1))
    return box, points, labels, has_box


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


class ForegroundMethod(SegMethod):
    """Base of the promptable methods: no encoder-decoder Segmentor (SegMethod builds one from cfg.model; here the
    promptable segmenter takes its place), the COD metrics as validation (evaluate_own, called by
    trainers.evaluation.evaluate)."""
    VAL_METRICS = ("val/S_measure", "val/wF", "val/E_measure", "val/MAE", "val/IoU", "val/mIoU")

    def __init__(self, cfg, num_classes: int, ignore_index: int):
        nn.Module.__init__(self)
        if num_classes != 2:
            raise ValueError(f"data.name: {cfg.data.name} has {num_classes} classes; promptable methods segment one "
                             "foreground (synthetic_cod, synthetic_sod, cod10k, camo, duts)")
        self.cfg, self.num_classes, self.ignore_index = cfg.method, num_classes, ignore_index

    def predict_masks(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Binary masks (B, H, W) for validation, and extra per-image metrics (B,) to average."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate_own(self, loader, rt, eval_cfg=None, accel=None) -> dict[str, float]:
        """Means over the validation set (all ranks) of the COD metrics of predict_masks; val/mIoU is the
        foreground / background mean IoU in percent (the other tables' metric)."""
        self.eval()
        sums, names = None, None
        for images, masks in loader:
            images, masks = images.to(rt.device), masks.to(rt.device)
            pred, extra = self.predict_masks(images, masks)
            per_image = {**foreground_metrics(pred.double(), masks == 1), **{k: v.double() for k, v in extra.items()}}
            bg_iou = foreground_metrics((~pred.bool()).double(), masks != 1)["IoU"]
            per_image["mIoU"] = 50 * (per_image["IoU"] + bg_iou)
            names = sorted(per_image)
            batch = torch.stack([per_image[k].sum() for k in names] + [torch.tensor(float(len(images)), dtype=torch.float64, device=rt.device)])
            sums = batch if sums is None else sums + batch
        sums = rt.all_reduce_sum(sums).tolist()
        return {f"val/{k}": v / sums[-1] for k, v in zip(names, sums)}


@register_method("promptable_pretrain", PromptablePretrainConfig)
class PromptablePretrain(ForegroundMethod):
    def __init__(self, cfg, num_classes: int, ignore_index: int):
        super().__init__(cfg, num_classes, ignore_index)
        if cfg.method.segmenter.name != "promptable_tiny":
            raise ValueError("method.segmenter.name: promptable_pretrain trains promptable_tiny; SAM 2 comes trained")
        self.segmenter = build_promptable(cfg.method.segmenter)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.cfg
        target = (masks == 1).float()
        boxes, points, labels, has_box = random_prompts(target, m.prompts)
        emb = self.segmenter.embed_image(images)
        logits = self.segmenter.decode(emb, boxes, points, labels, masks.shape[-2:], box_valid=has_box)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = dice_loss(logits, target)
        return {"loss": m.loss.bce * bce + m.loss.dice * dice, "loss_bce": bce.detach(), "loss_dice": dice.detach()}

    def predict_masks(self, images, masks):
        box = mask_boxes(masks == 1)
        logits = self.segmenter.decode(self.segmenter.embed_image(images), box, None, None, masks.shape[-2:])
        return logits > 0, {}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) logits prompted with the whole-image box (no ground truth at hand here)."""
        whole = images.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(images.shape[0], 4)
        fg = self.segmenter.decode(self.segmenter.embed_image(images), whole, None, None, images.shape[-2:])
        return torch.stack([-fg, fg], 1)
