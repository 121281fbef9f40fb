"""supervised: the baseline rows (FCN, SETR, the CLIP decoder alone): minimise L_seg = CE (+ Dice)."""
from __future__ import annotations

from typing import Literal

import torch

from trainers.config import MethodConfig
from trainers.methods import register_method
from trainers.methods.base import SegMethod


class SupervisedConfig(MethodConfig):
    name: Literal["supervised"] = "supervised"


@register_method("supervised", SupervisedConfig)
class Supervised(SegMethod):
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.segmentor(images)
        out = self.seg_loss(logits, masks)
        out["loss"] = out["loss_seg"]
        return out
