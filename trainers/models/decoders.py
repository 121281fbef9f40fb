"""Decoders f_dec: latent (B, c, h, w) -> logits (B, K, h, w); the segmentor upsamples to the input size."""
from __future__ import annotations

from torch import nn

from trainers.models.encoders import conv_bn_relu
from trainers.registry import DECODERS


class FCNHead(nn.Module):
    """FCN head as in mmseg/SSSegmentation FCN-D8: num_convs 3x3 Conv-BN-ReLU, dropout 0.1, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int | None = None, num_convs: int = 2,
                 latent_channels: int | None = None):
        super().__init__()
        # width from the encoder's latent (mmseg FCN-R50: 512 for 2048), not from what a method feeds in, so a
        # method that widens the input (concat / mha modulation: 2d) keeps the same head
        d = latent_channels or in_channels
        channels = channels or (512 if d >= 1024 else d)
        layers, c = [], in_channels
        for _ in range(num_convs):
            layers.append(conv_bn_relu(c, channels))
            c = channels
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, z):
        return self.classifier(self.dropout(self.convs(z)))


@DECODERS.register("fcn")
def fcn(in_channels: int, num_classes: int, channels: int | None = None,
        latent_channels: int | None = None) -> nn.Module:
    return FCNHead(in_channels, num_classes, channels, latent_channels=latent_channels)
