"""Optimizer and per-step learning-rate schedule from `schedule.*`."""
from __future__ import annotations

import math

import torch


def build_optimizer(sched, model: torch.nn.Module) -> torch.optim.Optimizer:
    """One parameter group per learning-rate scale the method asks for (SegMethod.lr_scales)."""
    groups = [{"params": params, "lr": sched.lr * scale} for params, scale in model.param_groups() if params]
    if sched.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=sched.lr, momentum=sched.momentum, weight_decay=sched.weight_decay)
    cls = torch.optim.AdamW if sched.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=sched.lr, weight_decay=sched.weight_decay)


def build_lr_schedule(sched, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step factor: constant; poly (1 - t/T)^p (mmseg/SSSegmentation); cosine to 0."""
    def factor(step: int) -> float:
        t = min(step / max(total_steps, 1), 1.0)
        if sched.lr_schedule == "poly":
            return (1 - t) ** sched.poly_power
        if sched.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
