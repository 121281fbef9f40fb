"""Encoders f_enc: image (B, 3, H, W) -> latent z (B, d, h, w) (paper 002, Eq. 1).

Each builder takes the ModelConfig and returns a module with an `out_channels` attribute. An encoder may also
name its stages (`stage_modules()`: the modules whose outputs are its intermediate feature maps, shallow to deep),
which PLOP's Local POD distils (trainers.continual.plop); `encoder_stages` falls back to the encoder itself.
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

    def stage_modules(self) -> list[nn.Module]:
        """The blocks ending each resolution: strides 2, 4 and 8 (the last one's output is z)."""
        return [self.body[1], self.body[3], self.body[5]]


@ENCODERS.register("tiny_cnn")
def tiny_cnn(cfg) -> nn.Module:
    enc = TinyCNN()
    if cfg.pretrained:
        enc.load_state_dict(_read_state_dict(cfg.pretrained))
    return enc


class TimmFeatures(nn.Module):
    """Stages 3 and 4 of a timm backbone built with `features_only=True`: forward returns the last map (the
    latent z); forward_stages both, for the auxiliary head on stage 3 (`aux_channels` wide)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        channels = net.feature_info.channels()
        self.out_channels = channels[-1]
        self.aux_channels = channels[-2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stage 3 (B, aux_channels, H/8, W/8), stage 4 (B, out_channels, H/8, W/8)] at output stride 8."""
        return self.net(x)

    def stage_modules(self) -> list[nn.Module]:
        """The ResNet's four stages layer1..layer4 (PLOP's POD takes the output of each ResNet stage)."""
        return [getattr(self.net, f"layer{i}") for i in range(1, 5) if hasattr(self.net, f"layer{i}")] or [self]


def encoder_stages(encoder: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are `encoder`'s stages: its stage_modules(), else [encoder] (the latent z only)."""
    stages = getattr(encoder, "stage_modules", None)
    return list(stages()) if stages is not None else [encoder]


# timm tags for `model.pretrained` that are not a file: the name online (downloads), e.g. "gluon_in1k"
def _timm_d8(arch: str):
    def build(cfg) -> nn.Module:
        import timm

        # output stride 8 = SSSegmentation's outstride 8: stages 3 and 4 keep stride 1 with dilations 2 and 4, the
        # first block of each dilated stage at half the dilation (its contract_dilation=True; timm's first_dilation)
        kwargs = dict(features_only=True, output_stride=8, out_indices=(3, 4))
        if cfg.pretrained is None:
            return TimmFeatures(timm.create_model(arch, pretrained=False, **kwargs))
        if os.path.exists(cfg.pretrained):
            net = timm.create_model(arch, pretrained=False, **kwargs)
            load_backbone_weights(net, cfg.pretrained, arch)
            return TimmFeatures(net)
        if os.sep in cfg.pretrained or cfg.pretrained.endswith(_CHECKPOINT_SUFFIXES):
            raise FileNotFoundError(f"model.pretrained: no checkpoint file at {cfg.pretrained}")
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(arch) if n.split(".", 1)[0] == arch]
        if cfg.pretrained not in tags:
            raise ValueError(f"model.pretrained: {cfg.pretrained!r} is neither a local checkpoint file nor a timm "
                             f"tag of {arch} (known: {', '.join(tags) or 'none'})")
        # a timm pretrained tag, e.g. resnet50c "gluon_in1k": timm downloads it (needs the network)
        return TimmFeatures(timm.create_model(f"{arch}.{cfg.pretrained}", pretrained=True, **kwargs))
    return build


# FCN-R50-D8 (paper 002's FCN rows). SSSegmentation's fcn_resnet50os8_voc uses ResNet-50 "conv3x3stem" (v1c: the 7x7
# stem conv replaced by three 3x3 convs, 32-32-64 wide), which timm ships as `resnet50c`; `resnet50_d8` keeps the
# torchvision 7x7 stem (timm `resnet50`, e.g. its tv_in1k weights).
ENCODERS.register("resnet50c_d8", _timm_d8("resnet50c"))
ENCODERS.register("resnet50_d8", _timm_d8("resnet50"))
ENCODERS.register("resnet18_d8", _timm_d8("resnet18"))

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# mmseg / SSSegmentation ResNetV1c (open-mmlab resnet50_v1c, SSSegmentation's own ImageNet weights) names the deep
# stem `stem.<i>`; timm's resnet50c names the same layers conv1.<i> and bn1
_MMSEG_V1C_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
                   "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def load_backbone_weights(net: nn.Module, path: str, arch: str) -> None:
    """ImageNet weights from a local file into a timm features_only ResNet: timm's layout (`torch.save(
    timm.create_model(arch).state_dict())`, or a timm .safetensors), or mmseg/SSSegmentation's v1c layout (the
    stem renamed). The classifier (fc.*) is dropped; any other missing or unexpected key is an error."""
    state = _read_state_dict(path)
    state = {next((new + k[len(old):] for old, new in _MMSEG_V1C_STEM.items() if k.startswith(old)), k): v
             for k, v in state.items() if not k.startswith("fc.")}
    load_weights(net, state, path, arch, "timm layout")


def read_weights(path: str, arch: str, urls: dict[str, str], tag: str, layout: str) -> dict:
    """A state dict from `model.pretrained`: a local file, or `tag` (a published copy of `arch`'s weights at
    urls[arch], downloaded: needs the network). A path-like value with no file, or any other value, is an error naming
    the key and the layout expected."""
    if os.path.exists(path):
        return _read_state_dict(path)
    if path == tag and arch in urls:
        return torch.hub.load_state_dict_from_url(urls[arch], map_location="cpu")
    if os.sep in path or path.endswith(_CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"model.pretrained: no checkpoint file at {path}")
    online = f" or {tag!r} (downloads)" if arch in urls else ""
    raise ValueError(f"model.pretrained: {arch} loads a local checkpoint file ({layout}){online}, got {path!r}")


def load_weights(net: nn.Module, state: dict, path: str, arch: str, layout: str) -> None:
    """`state` into `net`; any missing or unexpected key (BatchNorm's num_batches_tracked aside) is an error naming
    model.pretrained and the layout expected."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"model.pretrained: {path} does not hold {arch} weights in {layout} "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")


def _read_state_dict(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.pretrained: no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):        # mmcv / SSSegmentation checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
