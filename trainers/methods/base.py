"""What every method shares: a segmentor, L_seg, predict, and no-op hooks."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from trainers.losses import segmentation_loss
from trainers.models import build_segmentor


class SegMethod(nn.Module):
    def __init__(self, cfg, num_classes: int, ignore_index: int, decoder_in_channels: Callable[[int], int] | None = None):
        super().__init__()
        self.cfg = cfg.method
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.segmentor = build_segmentor(cfg.model, num_classes, decoder_in_channels)

    def seg_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        return segmentation_loss(logits, masks, self.cfg.seg_loss, self.ignore_index)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmentor(images)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by submodule name (e.g. {"policy": 0.1}); the rest trains at schedule.lr."""
        return {}

    def param_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """Trainable parameters split by lr_scales(), for the optimizer."""
        scales = self.lr_scales()
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                scale = scales.get(name.split(".", 1)[0], 1.0)
                groups.setdefault(scale, []).append(p)
        return [(params, scale) for scale, params in groups.items()]

    def _frozen_prefixes(self) -> tuple[str, ...]:
        """Submodules marked `frozen = True` (e.g. the CLIP tower): rebuilt from config, never trained."""
        return tuple(f"{name}." for name, mod in self.named_modules() if name and getattr(mod, "frozen", False))

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """state_dict without frozen submodules (a ViT-B/16 tower would add ~340 MB to every epoch checkpoint)."""
        frozen = self._frozen_prefixes()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of checkpoint_state: every key but the frozen submodules' must be present."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        frozen = self._frozen_prefixes()
        missing = [k for k in missing if not k.startswith(frozen)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """epoch is 0-based."""

    def after_optimizer_step(self) -> None:
        """Called once per step after optimizer.step() (EMA updates live here)."""
