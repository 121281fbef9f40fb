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

eval.datasets adds other evaluation sets (cross-domain, paper 002 Table 4), scored the same way after their labels are
mapped into the trial's classes by name (build_eval_sets, evaluate_sets): val/<label>/mIoU and the rest.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from trainers.accel import loader_kwargs
from trainers.config import EvalConfig
from trainers.data import build_dataset
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


def build_val_loader(val_set, cfg, rt: Runtime, data_cfg=None) -> DataLoader:
    """This rank's shard of the validation set; one image per batch where images keep their own sizes.
    data_cfg: the set's data config (default cfg.data; an eval.datasets set has its own)."""
    data_cfg = data_cfg or cfg.data
    bs = 1 if data_cfg.val_resize is not None else (cfg.eval.batch_size or cfg.schedule.batch_size)
    return DataLoader(val_set, batch_size=bs, sampler=ShardSampler(len(val_set), rt.rank, rt.world_size),
                      **loader_kwargs(data_cfg, rt.device))


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
    return confusion_metrics(confusion(model, loader, len(class_names), rt, eval_cfg, accel), class_names)


@torch.no_grad()
def confusion(model, loader, num_classes: int, rt: Runtime, eval_cfg, accel=None,
              label_map: torch.Tensor | None = None) -> ConfusionMatrix:
    """The confusion matrix of the model's predictions over a whole evaluation set (all ranks, all-reduced).
    label_map: (L,) int64, the set's label id -> the trial's class id (or ignore), for sets in another label space."""
    model.eval()
    cm = ConfusionMatrix(num_classes, model.ignore_index, device=rt.device)
    lut = label_map.to(rt.device) if label_map is not None else None
    for images, masks in loader:
        images = accel.inputs(images) if accel else images.to(rt.device, non_blocking=True)
        masks = masks.to(rt.device, non_blocking=True)
        if lut is not None:
            masks = lut[masks.long()]
        with accel.autocast() if accel else contextlib.nullcontext():
            logits = predict_logits(model, images, masks.shape[-2:], eval_cfg)
        cm.update(logits.max(1).indices, masks)
    rt.all_reduce_sum(cm.mat)
    return cm


def confusion_metrics(cm: ConfusionMatrix, class_names: list[str]) -> dict[str, float]:
    """val/mIoU (mean over the classes present in prediction or target), val/pixel_acc, val/IoU/<class>, percent."""
    iou = cm.iou().tolist()
    out = {"val/mIoU": 100 * cm.miou(), "val/pixel_acc": 100 * cm.pixel_acc()}
    out.update({f"val/IoU/{name}": 100 * v for name, v in zip(class_names, iou)})
    return out


# --------------------------------------------------------------------------- extra evaluation sets (eval.datasets)
# Cross-domain evaluation (paper 002 Table 4: FCN trained on Cityscapes, scored on Dark Zurich val and Nighttime
# Driving test; trained on LIP, scored on CIHP): the trial's model, the trial's eval protocol, another dataset whose
# labels are mapped into the trial's classes by name.


@dataclass
class EvalSet:
    """One set of eval.datasets, ready to score: this rank's shard of it, and its labels in the trial's classes."""
    label: str
    loader: DataLoader
    label_map: torch.Tensor     # (L,) int64: the set's label id -> the trial's class id, or the trial's ignore index
    shared: list[int]           # the trial classes some class of the set maps onto: the ones its mIoU averages


def class_mapping(set_classes: list[str], trial_classes: list[str], class_map: dict[str, str], ignore_index: int,
                  set_ignore_index: int, where: str) -> tuple[torch.Tensor, list[int]]:
    """Map an evaluation set's labels into the trial's label space by class name: each of its classes goes to the
    trial class of the same name (or of class_map[its name]); a class with no counterpart, and the set's own ignore
    label, become the trial's ignore index (scored nowhere, as the classes a source domain never had in SYNTHIA ->
    Cityscapes' 16-class protocol). Returns (label_map (L,) int64, the shared trial class ids)."""
    unknown = [n for n in class_map if n not in set_classes]
    if unknown:
        raise ValueError(f"{where}.class_map: {unknown[0]!r} is not a class of this set (its classes: "
                         f"{', '.join(set_classes)})")
    stray = [n for n in class_map.values() if n not in trial_classes]
    if stray:
        raise ValueError(f"{where}.class_map: {stray[0]!r} is not a class of the trial (its classes: "
                         f"{', '.join(trial_classes)})")
    trial_index = {name: k for k, name in enumerate(trial_classes)}
    label_map = torch.full((max(256, len(set_classes), set_ignore_index + 1),), ignore_index, dtype=torch.int64)
    for j, name in enumerate(set_classes):
        k = trial_index.get(class_map.get(name, name))
        if k is not None:
            label_map[j] = k
    shared = sorted(set(label_map[:len(set_classes)].tolist()) - {ignore_index})
    if not shared:
        raise ValueError(f"{where}: no class in common with the trial's ({', '.join(trial_classes)}); its classes: "
                         f"{', '.join(set_classes)}; map them with {where}.class_map: {{its name: trial's name}}")
    return label_map, shared


def build_eval_sets(cfg, trial_classes, ignore_index: int, rt: Runtime) -> list[EvalSet]:
    """The sets of cfg.eval.datasets (trainers.config.EvalSetConfig), each built from its data config (its keys over
    the trial's data), its "val" split, sharded over the ranks as the trial's own val set."""
    sets = []
    for label, spec in cfg.eval.datasets.items():
        data_cfg = cfg.eval_set_data(label)
        dataset = build_dataset(data_cfg, "val")
        label_map, shared = class_mapping(list(dataset.classes), list(trial_classes), spec.class_map, ignore_index,
                                          dataset.ignore_index, f"eval.datasets.{label}")
        loader = rt.prepare_loader(build_val_loader(dataset, cfg, rt, data_cfg))
        sets.append(EvalSet(label, loader, label_map, shared))
    return sets


def evaluate_sets(model, sets: list[EvalSet], class_names: list[str], rt: Runtime, eval_cfg,
                  accel=None) -> dict[str, float]:
    """val/<label>/mIoU (mean over the shared classes present in prediction or target), val/<label>/pixel_acc and
    val/<label>/IoU/<class> of the shared classes, percent; one confusion matrix per set, all-reduced."""
    out: dict[str, float] = {}
    for s in sets:
        cm = confusion(model, s.loader, len(class_names), rt, eval_cfg, accel, s.label_map)
        iou = cm.iou()[s.shared]
        out[f"val/{s.label}/mIoU"] = 100 * float(iou.nanmean())
        out[f"val/{s.label}/pixel_acc"] = 100 * cm.pixel_acc()
        out.update({f"val/{s.label}/IoU/{class_names[k]}": 100 * v for k, v in zip(s.shared, iou.tolist())})
    return out
