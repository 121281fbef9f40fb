"""Validation as SSSegmentation evaluates (its test.py and BaseSegmentor.inference / auginference):

    for each image, at each scale of eval.scales (and its horizontal flip with eval.flip):
        logits = the model on the (rescaled) image, whole or by sliding windows (eval.mode)
        resample the logits bilinearly to the mask's size        the original image size with data.val_resize
    argmax of the mean logits -> one confusion matrix over the whole validation set, summed over ranks
    mIoU, per-class IoU and pixel accuracy from that one matrix

With data.val_resize the dataset hands over the resized image and the mask as stored on disk (sizes vary, so the
loader takes one image per batch, as SSSegmentation's test loader does); without it, the dataset's own val
transform (image and mask at the same size) and the resample is a no-op. One difference from SSSegmentation: our
methods' predict already upsamples the 1/8 logits to the input size, so the logits reach the original size in
two bilinear steps instead of one.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from trainers.accel import loader_kwargs
from trainers.config import EvalConfig
from trainers.metrics import ConfusionMatrix
from trainers.runtime import Runtime


class ShardSampler(Sampler[int]):
    """Evaluation shard: every rank-th index, no padding (confusion matrices are summed over ranks)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_val_loader(val_set, cfg, rt: Runtime) -> DataLoader:
    """This rank's shard of the validation set; one image per batch where images keep their own sizes."""
    bs = 1 if cfg.data.val_resize is not None else (cfg.eval.batch_size or cfg.schedule.batch_size)
    return DataLoader(val_set, batch_size=bs, sampler=ShardSampler(len(val_set), rt.rank, rt.world_size),
                      **loader_kwargs(cfg.data, rt.device))


def slide_logits(model, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Sliding-window inference (SSSegmentation forward mode 'slide', for Cityscapes-size images): windows of
    `crop` every `stride`, the last window of a row / column flush with the border; each window's logits are
    summed into place and divided by how many windows saw the pixel. (B, 3, H, W) -> (B, K, H, W) fp32."""
    b, _, h, w = images.shape
    (ch, cw), (sh, sw) = crop, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    total = count = None
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = model.predict(images[:, :, y1:y2, x1:x2]).float()
            if total is None:
                total = logits.new_zeros(b, logits.shape[1], h, w)
                count = logits.new_zeros(1, 1, h, w)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def predict_logits(model, images: torch.Tensor, size: tuple[int, int], eval_cfg) -> torch.Tensor:
    """Mean logits (B, K, *size) over eval.scales x (flip), each resampled to `size` (SSSegmentation auginference:
    images rescaled by the scale factor, bilinear, align_corners False; flipped logits flipped back)."""
    total, n = None, 0
    for scale in eval_cfg.scales:
        x = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        for flip in ((False, True) if eval_cfg.flip else (False,)):
            view = x.flip(-1) if flip else x
            if eval_cfg.mode == "slide":
                logits = slide_logits(model, view, eval_cfg.crop_size, eval_cfg.stride)
            else:
                logits = model.predict(view).float()
            if flip:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != tuple(size):
                logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
            n += 1
    return total / n


@torch.no_grad()
def evaluate(model, loader, class_names: list[str], rt: Runtime, eval_cfg=None, accel=None) -> dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU (percent) over the whole validation set (all ranks): one
    confusion matrix, all-reduced. eval_cfg: trainers.config.EvalConfig (None: whole image, one scale);
    accel: the train step's precision and memory format (trainers.accel.Accel), None for fp32."""
    eval_cfg = eval_cfg or EvalConfig()
    if hasattr(model, "evaluate_own"):     # a method with its own validation metrics (seg_r1: S-measure, wF, ...)
        return model.evaluate_own(loader, rt, eval_cfg, accel)
    model.eval()
    cm = ConfusionMatrix(len(class_names), model.ignore_index, device=rt.device)
    for images, masks in loader:
        images = accel.inputs(images) if accel else images.to(rt.device, non_blocking=True)
        masks = masks.to(rt.device, non_blocking=True)
        with accel.autocast() if accel else contextlib.nullcontext():
            logits = predict_logits(model, images, masks.shape[-2:], eval_cfg)
        cm.update(logits.max(1).indices, masks)
    rt.all_reduce_sum(cm.mat)
    return confusion_metrics(cm, class_names)


def confusion_metrics(cm: ConfusionMatrix, class_names: list[str]) -> dict[str, float]:
    """val/mIoU (mean over the classes present in prediction or target), val/pixel_acc, val/IoU/<class>, percent."""
    iou = cm.iou().tolist()
    out = {"val/mIoU": 100 * cm.miou(), "val/pixel_acc": 100 * cm.pixel_acc()}
    out.update({f"val/IoU/{name}": 100 * v for name, v in zip(class_names, iou)})
    return out
