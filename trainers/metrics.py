"""Confusion-matrix segmentation metrics, accumulated on the device (one bincount per batch, no sync)."""
from __future__ import annotations

import torch


class ConfusionMatrix:
    """Rows = target class, columns = predicted class; pixels equal to `ignore_index` never count."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> "ConfusionMatrix":
        """pred, target: integer tensors of the same shape (e.g. (B, H, W))."""
        k = self.num_classes
        valid = target != self.ignore_index
        idx = target[valid].to(torch.int64) * k + pred[valid].to(torch.int64)
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k).to(self.mat.device)
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU (K,) float64 on the CPU; NaN for a class absent from both prediction and target."""
        m = self.mat.double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        """Mean IoU over the classes present in prediction or target, in [0, 1]."""
        return float(self.iou().nanmean())

    def pixel_acc(self) -> float:
        m = self.mat.double()
        return float(m.diag().sum() / m.sum().clamp_min(1))
