"""SETR-Naive (Zheng et al., 2021): a plain ViT encoder and the naive head, as in paper 002's Table 2 rows
"SETR-Naive ViT-Large" (trained with SSSegmentation's configs/setr/setrnaive_vitlarge_{voc,ade20k,cityscapes}.py).

Encoders (timm's VisionTransformer by its own name, built with pretrained=False at the crop size):
  vit_large_p16      timm vit_large_patch16_384 at 512 x 512 (SSSegmentation's jx_vit_large_p16_384, img_size 512;
                     VOC and ADE20K): 24 blocks, width 1024 -> z (B, 1024, 32, 32)
  vit_large_p16_768  the same at 768 x 768 (its Cityscapes config) -> z (B, 1024, 48, 48)
  vit_tiny_p8        the embedded default's size: vit_tiny_patch16_224's width (192, 3 heads) with 4 blocks and
                     patch 8 at 48 x 48 -> z (B, 192, 6, 6) (patch 16 would leave a 3 x 3 latent)
The latent z is the patch tokens of the last block (CLS dropped, reshaped row-major to the patch grid) after a
LayerNorm: SSSegmentation's SETRUP takes the ViT without its final norm and normalises every output it uses with
its own LayerNorm (eps 1e-6, head `norm_layers`), so z has the per-token unit scale the policy's noise is sized
against. Those LayerNorms are head parameters (`head_prefixes`; they train at the head's lr, not the backbone's
0.1x). With model.aux_head, `forward_stages` gives [tokens of block 20 (19 for 0-based), z]: SSSegmentation trains
three auxiliary heads on blocks 10, 15 and 20 (CE x 0.4 each); rlseg's segmentor carries one, on the last of them.

`model.pretrained`: a local file of ImageNet ViT weights in timm's layout (a timm state dict or .safetensors, e.g.
vit_large_patch16_384.augreg_in21k_ft_in1k), or `jx` for the ViT-L weights SSSegmentation uses (jx_vit_large_p16_384,
downloads); timm's own checkpoint filter resizes the positional embedding
(bicubic) to the crop's patch grid, the classifier and final norm are dropped.

Decoders (SSSegmentation's SETRUP.builddecoder, num_classes from the dataset, 256 channels by default, no dropout):
  setr_naive      1 x [1x1 Conv-BN-ReLU, bilinear x4], 1x1 classifier: SETR's naive head (its paper's, and
                  SSSegmentation's Cityscapes config)
  setr_naive_k3   2 x [3x3 Conv-BN-ReLU, bilinear x4], 1x1 classifier: SSSegmentation's VOC and ADE20K configs
                  (num_convs 2, kernel_size 3), the runs behind the paper's VOC 84.5 and ADE20K 48.4
"""
from __future__ import annotations

import torch
from torch import nn

from trainers.models.encoders import load_weights, read_weights
from trainers.registry import DECODERS, ENCODERS

# name -> (timm architecture, timm kwargs, block indices [aux, z] (0-based))
VIT_ARCHS = {
    "vit_large_p16": ("vit_large_patch16_384", dict(img_size=512), (19, 23)),
    "vit_large_p16_768": ("vit_large_patch16_384", dict(img_size=768), (19, 23)),
    "vit_tiny_p8": ("vit_tiny_patch16_224", dict(img_size=48, patch_size=8, depth=4), (2, 3)),
}


# `model.pretrained: jx`: the ImageNet-21k -> 1k ViT-L/16 (384 px) weights SSSegmentation's SETR loads
# (jx_vit_large_p16_384, timm's release of the original JAX weights; timm layout)
JX_URLS = {"vit_large_patch16_384": "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
                                    "jx_vit_large_p16_384-b3be5167.pth"}


class ViTTokens(nn.Module):
    """A timm VisionTransformer (head and final norm pruned) -> z (B, C, H/p, W/p): the patch tokens of the last
    used block, each block output LayerNorm'ed by the head's own norm (see the module docstring)."""

    head_prefixes = ("norms",)

    def __init__(self, net: nn.Module, blocks: tuple[int, ...], name: str):
        super().__init__()
        net.prune_intermediate_layers(list(blocks), prune_norm=True, prune_head=True)
        self.net = net
        self.blocks = list(blocks)
        self.name = name
        self.image_size = tuple(net.patch_embed.img_size)
        self.out_channels = self.aux_channels = net.embed_dim
        self.norms = nn.ModuleList(nn.LayerNorm(net.embed_dim, eps=1e-6) for _ in blocks)   # SSSegmentation norm_layers

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tokens of each of `blocks` ([aux block, z] with model.aux_head, else [z]), each (B, C, H/p, W/p) after
        its LayerNorm."""
        if tuple(x.shape[-2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(f"{self.name} is built for {h}x{w} inputs (its positional embedding fixes the size), got "
                             f"{x.shape[-2]}x{x.shape[-1]}; set data.image_size: {h} (or use the encoder built for it)")
        grids = self.net.forward_intermediates(x, indices=self.blocks, norm=False, stop_early=True,
                                               output_fmt="NCHW", intermediates_only=True)
        return [norm(g.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for norm, g in zip(self.norms, grids)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]


def load_vit_weights(net: nn.Module, path: str, arch: str) -> None:
    """timm-layout ViT weights from a local file into `net` (pruned): positional embedding resized by timm's filter;
    the classifier (head.*) and the final norm (norm.*, SSSegmentation's final_norm False) dropped."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_weights(path, arch, JX_URLS, "jx", f"timm's {arch} layout")
    state = checkpoint_filter_fn(state, net)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm.", "fc_norm."))}
    load_weights(net, state, path, arch, "timm's layout")


def _vit(name: str):
    def build(cfg) -> nn.Module:
        import timm

        arch, kwargs, blocks = VIT_ARCHS[name]
        # the aux block's tokens (and their LayerNorm) only with an aux head: unused parameters would stop DDP
        blocks = blocks if cfg.aux_head.enabled else blocks[-1:]
        # SSSegmentation: drop_path 0, qkv_bias, LayerNorm eps 1e-6 (timm's ViT default), CLS token kept. timm's
        # random init (trunc-normal, ~10 s for ViT-L on a CPU) only when no checkpoint overwrites it.
        init = "skip" if cfg.pretrained else ""
        net = timm.create_model(arch, pretrained=False, num_classes=0, weight_init=init, **kwargs)
        enc = ViTTokens(net, blocks, name)
        if cfg.pretrained:
            load_vit_weights(enc.net, cfg.pretrained, arch)
        return enc
    return build


for _name in VIT_ARCHS:
    ENCODERS.register(_name, _vit(_name))


class SETRNaiveHead(nn.Module):
    """num_convs x [Conv(k)-BN-ReLU, bilinear x4], then a 1x1 classifier (SSSegmentation SETRUP.builddecoder with
    dropout 0). in_channels: the latent width, or twice it under latent_rl's concat / mha modulation."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1, kernel_size: int = 1,
                 scale: int = 4):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)]
            c = channels
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(z))


@DECODERS.register("setr_naive")
def setr_naive(in_channels: int, num_classes: int, channels: int | None = None,
               latent_channels: int | None = None) -> nn.Module:
    return SETRNaiveHead(in_channels, num_classes, channels or 256, num_convs=1, kernel_size=1)


@DECODERS.register("setr_naive_k3")
def setr_naive_k3(in_channels: int, num_classes: int, channels: int | None = None,
                  latent_channels: int | None = None) -> nn.Module:
    return SETRNaiveHead(in_channels, num_classes, channels or 256, num_convs=2, kernel_size=3)
