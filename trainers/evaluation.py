"""Validation: one confusion matrix over the whole validation set, summed over ranks."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler

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


@torch.no_grad()
def evaluate(model, loader, class_names: list[str], rt: Runtime) -> dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU (percent) over the whole validation set (all ranks)."""
    model.eval()
    cm = ConfusionMatrix(len(class_names), model.ignore_index, device=rt.device)
    for images, masks in loader:
        logits = model.predict(images.to(rt.device, non_blocking=True))
        cm.update(logits.max(1).indices, masks.to(rt.device, non_blocking=True))
    rt.all_reduce_sum(cm.mat)
    iou = cm.iou().tolist()
    out = {"val/mIoU": 100 * cm.miou(), "val/pixel_acc": 100 * cm.pixel_acc()}
    out.update({f"val/IoU/{name}": 100 * v for name, v in zip(class_names, iou)})
    return out
