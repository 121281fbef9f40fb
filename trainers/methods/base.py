"""What every method shares: a segmentor, L_seg, predict, and no-op hooks."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainers.losses import segmentation_loss
from trainers.models import build_segmentor

# forward-output keys of the RL terms exactly as they enter out["loss"], weights included and not detached
# (latent_rl "rl_term/policy" = lambda_Policy L_Policy, ...): their sum is L_RL of rl/grad_share (trainers.grad_share);
# trainers.loop leaves them out of the step's metrics
RL_TERM = "rl_term/"


class SegMethod(nn.Module):
    # what evaluation reports for a method: None = the segmentation metrics (val/mIoU, val/pixel_acc, val/IoU/<class>,
    # trainers.evaluation); a method with its own evaluate_own names its metrics here (the plan check reads them)
    VAL_METRICS: tuple[str, ...] | None = None
    # why building this method needs files (a frozen model trained elsewhere), or None: the dry run builds it without
    # weights on the meta device (trainers.methods.summary)
    BUILT_FROM_FILES: str | None = None
    # the submodules that are the RL policy (latent_rl's pi_phi, clip_rl's agent), not the segmentor's own weights;
    # () = no policy, and no rl/grad_share
    POLICY_MODULES: tuple[str, ...] = ()

    def __init__(self, cfg, num_classes: int, ignore_index: int, decoder_in_channels: Callable[[int], int] | None = None):
        super().__init__()
        self.cfg = cfg.method
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.segmentor = build_segmentor(cfg.model, num_classes, decoder_in_channels)
        self.aux_weight = cfg.model.aux_head.weight
        if self.segmentor.aux_head is not None:
            # after every method's own forward (inside DDP's forward, so DDP sees the aux head's parameters used)
            self.register_forward_hook(self.add_aux_loss)

    def add_aux_loss(self, module: nn.Module, args: tuple, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SSSegmentation's auxiliary loss: CE of the stage-3 head's logits, upsampled to the mask size, enters
        out["loss"] with weight model.aux_head.weight (0.4). It is part of L_seg, so a phase without L_seg
        (latent_rl's RL-only phases: `seg_phase` False) leaves it out; loss_aux is logged either way."""
        aux = self.segmentor.pop_aux_logits()
        if aux is None:            # eval mode: the aux head did not run
            return out
        masks = args[1]
        aux = F.interpolate(aux.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        loss_aux = F.cross_entropy(aux, masks, ignore_index=self.ignore_index)
        if getattr(self, "seg_phase", True):
            out["loss"] = out["loss"] + self.aux_weight * loss_aux
        out["loss_aux"] = loss_aux.detach()
        return out

    def seg_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        return segmentation_loss(logits, masks, self.cfg.seg_loss, self.ignore_index)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmentor(images)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by submodule name (e.g. {"policy": 0.1}); the rest trains at schedule.lr."""
        return {}

    def segmentor_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters outside POLICY_MODULES (encoder, decoder and whatever else turns an image into
        the prediction): what rl/grad_share is measured over. [] for a method without a policy."""
        if not self.POLICY_MODULES:
            return []
        return [p for name, p in self.named_parameters()
                if p.requires_grad and name.split(".", 1)[0] not in self.POLICY_MODULES]

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

    def grad_stats(self) -> dict[str, torch.Tensor]:
        """Called once per step after backward: gradient diagnostics (0-dim tensors, summed over the epoch like the
        step's outputs), e.g. {"rl/policy_grad_norm": ...}."""
        return {}

    def after_optimizer_step(self) -> None:
        """Called once per step after optimizer.step() (EMA updates live here)."""


def grad_norm(module: nn.Module) -> torch.Tensor:
    """L2 norm of the gradients of `module`'s parameters (those that have one), a 0-dim tensor on their device."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(module.parameters()).device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
