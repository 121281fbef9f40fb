"""Optimizer and per-step learning-rate schedule from `schedule.*`, with SSSegmentation's parameter rules and warm-up.

Parameter groups (SSSegmentation `params_rules`, ssseg/modules/models/optimizers/paramsconstructor.py): every trainable
parameter gets lr = schedule.lr * its method's lr_scale (SegMethod.lr_scales) * a role multiplier, where the role is
  backbone  the encoder, less the submodules it names in `head_prefixes`      x schedule.backbone_lr_mult
  head      the decoder, the aux head and the encoder's `head_prefixes` parts   x schedule.head_lr_mult
  other     the method's own modules (latent_rl's policy and modulation)       x 1
and weight decay schedule.weight_decay, or schedule.norm_weight_decay for the backbone's normalisation layers.
SegFormer (configs/_base_/segmentors/segformer.py): 'norm' wd 0, 'convs' / 'decoder' lr x10 -> norm_weight_decay 0,
head_lr_mult 10. SETR (configs/_base_/segmentors/setr.py): 'backbone_net' lr x0.1 -> backbone_lr_mult 0.1.

Schedule factor per step t of T (SSSegmentation PolyScheduler + BaseScheduler.getwarmuplr):
  base(t)  = m + (1 - m) * shape(t / T),  shape: poly (1 - x)^p | cosine (1 + cos(pi x)) / 2 | constant 1,
             m = schedule.min_lr_ratio (SSSegmentation's min_lr / lr)
  warm(t)  = 1 - (1 - t / W) (1 - warmup_ratio) for t <= W = warmup_iters (linear warm-up), else 1
  lr_g(t)  = lr_g * warm(t) * base(t)
With the defaults (m = 0, W = 0, multipliers 1, no norm rule) the groups and factors are the plain ones.
"""
from __future__ import annotations

import math

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _roles(model: nn.Module) -> tuple[set[int], set[int], set[int]]:
    """ids of the head, backbone and backbone-normalisation parameters of a SegMethod (empty for other modules)."""
    seg = getattr(model, "segmentor", None)
    if seg is None:
        return set(), set(), set()
    enc = seg.encoder
    head_prefixes = tuple(f"{p}." for p in getattr(enc, "head_prefixes", ()))
    head = {id(p) for m in (seg.decoder, seg.aux_head) if m is not None for p in m.parameters()}
    head |= {id(p) for n, p in enc.named_parameters() if n.startswith(head_prefixes)}
    backbone = {id(p) for p in enc.parameters()} - head
    norms = {id(p) for name, m in enc.named_modules() if isinstance(m, _NORMS) and not f"{name}.".startswith(head_prefixes)
             for p in m.parameters(recurse=False)}
    return head, backbone, norms


def parameter_groups(sched, model: nn.Module) -> list[dict]:
    """Optimizer groups [{params, lr, weight_decay}], one per distinct (lr, weight decay), in order of first use."""
    head, backbone, norms = _roles(model)
    groups: dict[tuple[float, float], dict] = {}
    for params, scale in model.param_groups():
        for p in params:
            role = sched.head_lr_mult if id(p) in head else sched.backbone_lr_mult if id(p) in backbone else 1.0
            wd = sched.norm_weight_decay if id(p) in norms and sched.norm_weight_decay is not None else sched.weight_decay
            lr = sched.lr * scale * role
            groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})["params"].append(p)
    return list(groups.values())


def build_optimizer(sched, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(sched, model)
    if sched.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=sched.lr, momentum=sched.momentum, weight_decay=sched.weight_decay)
    cls = torch.optim.AdamW if sched.optimizer == "adamw" else torch.optim.Adam   # betas (0.9, 0.999): SSSegmentation's
    # the fused kernel: one pass over all tensors (CPU: 1.2 vs 5.3 ms per step for latent_rl's 50 tensors, ~11% of
    # its embedded step); the same update up to float rounding. CPU and CUDA only.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return cls(groups, lr=sched.lr, weight_decay=sched.weight_decay, fused=fused)


def lr_factor(sched, step: int, total_steps: int) -> float:
    """warm(t) * base(t) of the module docstring, for step t (0-based count of optimizer steps taken)."""
    t = min(step / max(total_steps, 1), 1.0)
    if sched.lr_schedule == "poly":
        shape = (1 - t) ** sched.poly_power
    elif sched.lr_schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * t))
    else:
        shape = 1.0
    m = sched.min_lr_ratio
    factor = m + (1 - m) * shape if m else shape
    if step <= sched.warmup_iters and sched.warmup_iters:
        factor *= 1 - (1 - step / sched.warmup_iters) * (1 - sched.warmup_ratio)
    return factor


def build_lr_schedule(sched, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(sched, step, total_steps))
