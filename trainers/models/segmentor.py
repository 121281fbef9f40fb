"""Segmentor = encoder -> latent z -> decoder -> logits (paper 002, Eq. 1)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainers.registry import DECODERS, ENCODERS


class Segmentor(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> z (B, d, h, w)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decoder input (B, c, h, w) -> logits (B, K, H, W), bilinearly upsampled to `size`."""
        return F.interpolate(self.decoder(z), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.shape[-2:])


def build_segmentor(model_cfg, num_classes: int, decoder_in_channels: Callable[[int], int] | None = None) -> Segmentor:
    """`decoder_in_channels(d)`: the decoder's input width given the latent width d, for methods that change
    what the decoder sees (e.g. concat modulation: 2d). Default: d."""
    encoder = ENCODERS.get(model_cfg.encoder)(model_cfg)
    width = decoder_in_channels(encoder.out_channels) if decoder_in_channels else encoder.out_channels
    decoder = DECODERS.get(model_cfg.decoder)(width, num_classes, model_cfg.decoder_channels,
                                              latent_channels=encoder.out_channels)
    return Segmentor(encoder, decoder)
