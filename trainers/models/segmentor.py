"""Segmentor = encoder -> latent z -> decoder -> logits (paper 002, Eq. 1), with SSSegmentation's optional
auxiliary FCN head on the encoder's stage 3 (training only)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainers.registry import DECODERS, ENCODERS


class Segmentor(nn.Module):
    """`aux_head` (or None): a decoder on stage 3 of the encoder (`encoder.forward_stages`). In training mode
    `encode` also runs it and keeps its logits (B, K, h, w) for `pop_aux_logits`, so that a method's forward
    needs no change: SegMethod adds the auxiliary loss after it (SegMethod.add_aux_loss). In eval mode the aux
    head never runs."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, aux_head: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.aux_head = aux_head
        self._aux_logits: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> z (B, d, h, w)."""
        if self.aux_head is None or not self.training:
            return self.encoder(x)
        stage3, z = self.encoder.forward_stages(x)[-2:]
        self._aux_logits = self.aux_head(stage3)
        return z

    def pop_aux_logits(self) -> torch.Tensor | None:
        """The aux head's logits of the last training-mode encode (None if none), handed over once."""
        out, self._aux_logits = self._aux_logits, None
        return out

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decoder input (B, c, h, w) -> logits (B, K, H, W), bilinearly upsampled to `size`. The logits are fp32
        whatever autocast computed the decoder in (schedule.precision): L_seg, the rewards and the argmax read
        them, and a bf16 upsample to 512 x 512 would round every logit to 3 significant digits."""
        return F.interpolate(self.decoder(z).float(), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.shape[-2:])


def build_segmentor(model_cfg, num_classes: int, decoder_in_channels: Callable[[int], int] | None = None) -> Segmentor:
    """`decoder_in_channels(d)`: the decoder's input width given the latent width d, for methods that change
    what the decoder sees (e.g. concat modulation: 2d). Default: d."""
    encoder = ENCODERS.get(model_cfg.encoder)(model_cfg)
    width = decoder_in_channels(encoder.out_channels) if decoder_in_channels else encoder.out_channels
    decoder = DECODERS.get(model_cfg.decoder)(width, num_classes, model_cfg.decoder_channels,
                                              latent_channels=encoder.out_channels)
    aux_head = None
    if model_cfg.aux_head.enabled:
        if not hasattr(encoder, "forward_stages"):
            raise ValueError(f"model.aux_head: encoder {model_cfg.encoder!r} has no stage-3 features for an auxiliary "
                             "head (the ResNet encoders have: resnet50c_d8, resnet50_d8, resnet18_d8)")
        from trainers.models.decoders import FCNHead
        # SSSegmentation's auxiliary decoder: one 3x3 Conv-BN-ReLU (1024 -> 512), dropout 0.1, 1x1 classifier
        aux_head = FCNHead(encoder.aux_channels, num_classes, model_cfg.aux_head.channels, num_convs=1)
    return Segmentor(encoder, decoder, aux_head)
