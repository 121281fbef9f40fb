"""Encoders f_enc: image (B, 3, H, W) -> latent z (B, d, h, w) (paper 002, Eq. 1).

Each builder takes the ModelConfig and returns a module with an `out_channels` attribute.
Architectures from timm are built by timm's own names; weights are a separate concern
(`model.pretrained`: None for random init, a local checkpoint path, or a timm tag when online).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from trainers.registry import ENCODERS


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyCNN(nn.Module):
    """A small random-init encoder with output stride 8 (like the D8 ResNets), sized for 2-core CPUs."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        a, b, c = widths
        self.body = nn.Sequential(
            conv_bn_relu(3, a, stride=2), conv_bn_relu(a, a),
            conv_bn_relu(a, b, stride=2), conv_bn_relu(b, b),
            conv_bn_relu(b, c, stride=2), conv_bn_relu(c, c, dilation=2),
        )
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@ENCODERS.register("tiny_cnn")
def tiny_cnn(cfg) -> nn.Module:
    enc = TinyCNN()
    if cfg.pretrained:
        enc.load_state_dict(_read_state_dict(cfg.pretrained))
    return enc


class TimmFeatures(nn.Module):
    """The last feature map of a timm backbone built with `features_only=True`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.out_channels = net.feature_info.channels()[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


def _timm_d8(arch: str):
    def build(cfg) -> nn.Module:
        import timm

        kwargs = dict(features_only=True, output_stride=8, out_indices=(-1,))
        if cfg.pretrained is None:
            return TimmFeatures(timm.create_model(arch, pretrained=False, **kwargs))
        if os.path.exists(cfg.pretrained):
            # timm's own loader (filters the classifier, adapts to features_only)
            net = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cfg.pretrained}, **kwargs)
            return TimmFeatures(net)
        # a timm pretrained tag, e.g. "a1_in1k": needs the network
        return TimmFeatures(timm.create_model(f"{arch}.{cfg.pretrained}", pretrained=True, **kwargs))
    return build


# FCN-R50-D8 (paper 002's FCN rows; SSSegmentation/mmseg "D8": dilated last stages, output stride 8)
ENCODERS.register("resnet50_d8", _timm_d8("resnet50"))
ENCODERS.register("resnet18_d8", _timm_d8("resnet18"))


def _read_state_dict(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.pretrained: no checkpoint file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
