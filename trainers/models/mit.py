"""SegFormer (Xie et al., 2021): the Mix Transformer (MiT) encoder and its all-MLP head, as in paper 002's Table 2
rows "Segformer MiT-B1 / MiT-B3" (trained with SSSegmentation's configs/segformer/segformer_mitb{1,3}_*.py).

MixVisionTransformer follows NVlabs/SegFormer mmseg/models/backbones/mix_transformer.py module for module, so the
official ImageNet checkpoints (mit_b1.pth, ...) load by their own key names (`patch_embed1.proj.weight`,
`block1.0.attn.q.weight`, `block1.0.mlp.dwconv.dwconv.weight`, `norm1.weight`, ...; their ImageNet classifier
`head.*` is dropped): `model.pretrained` is a local file, or `ssseg` for SSSegmentation's copy (downloads).

Where the latent z sits. latent_rl acts on ONE map z (B, d, h, w) between encoder and decoder; MiT gives a pyramid of
four (strides 4, 8, 16, 32). The SegFormer head is what makes the pyramid one map: each stage goes through its own
1x1 Conv-BN-ReLU to E channels ("linear_c1..c4"; SSSegmentation's `convs`), is bilinearly resized to stage 1's grid
and the four are concatenated; a fuse layer and a classifier follow. z is that concatenation:
    z = cat_i up(conv_i(stage_i))          (B, 4E, H/4, W/4)     encoder `mit_*` = MiT + the per-stage projections
    logits = cls(drop(fuse(z)))            (B, K, H/4, W/4)      decoder `segformer_head` = fuse Conv-BN-ReLU, dropout
                                                                 0.1, 1x1 classifier
Why there: (1) without RL the segmentor computes exactly SSSegmentation's Segformer (same modules, same order), so
the supervised rows stay the published model; (2) z holds every scale at the head's full resolution H/4, so the
policy observes, and the modulation perturbs, all four stages' evidence (z at stage 4 alone would leave the
shallower stages unmodulated and need a second input to the decoder); (3) like FCN's z (the backbone's output,
followed by the head's convs), z is followed by a trained non-linear layer (fuse) before the classifier, so the
modulated channels are mixed again. The per-stage projections are head parameters (SSSegmentation's `convs`, lr x10):
the encoder names them in `head_prefixes` for trainers.optim. Cost: z is 4E = 1024 wide at H/4 (128 x 128 at 512 px).

E (`model.decoder_channels`, default 256) is SSSegmentation's feats_channels: 256 for MiT-B1 AND MiT-B3 in its VOC,
ADE20K and Cityscapes configs (the paper's numbers are those runs: B3 VOC 81.98); NVlabs' own B2-B5 head uses 768
(set model.decoder_channels=768 for that).

Encoders: mit_b0, mit_b1, mit_b3 (NVlabs sizes) and, for the embedded rows, mit_tiny (16-32-80-128 wide, one block
per stage, E = 32: z (B, 128, 12, 12) at 48 px; stands in for B1) and mit_tiny_deep (three blocks in stage 3, where
B3 adds its depth; stands in for B3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.models.encoders import load_weights, read_weights
from trainers.registry import DECODERS, ENCODERS

# NVlabs mix_transformer.py mit_b0 ... mit_b5: heads (1, 2, 5, 8), sr_ratios (8, 4, 2, 1), mlp_ratio 4, qkv_bias,
# LayerNorm eps 1e-6; SSSegmentation: drop_path_rate 0.1. `embed`: the head's E when model.decoder_channels is unset.
MIT_ARCHS = {
    "mit_b0": dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), embed=256),
    "mit_b1": dict(dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), embed=256),
    "mit_b3": dict(dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), embed=256),
    "mit_tiny": dict(dims=(16, 32, 80, 128), depths=(1, 1, 1, 1), embed=32),
    "mit_tiny_deep": dict(dims=(16, 32, 80, 128), depths=(1, 1, 3, 1), embed=32),   # B3's extra depth at stage 3
}


def _init_weights(m: nn.Module) -> None:
    """NVlabs' _init_weights: trunc-normal linears, unit LayerNorms, He-normal (fan-out) convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DWConv(nn.Module):
    """3x3 depth-wise conv on the token grid: MiT's positional information (Mix-FFN, no positional embedding)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).view(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class EfficientAttention(nn.Module):
    """Multi-head attention whose keys/values come from the grid reduced by sr_ratio (a strided conv + LayerNorm):
    cost N * N / sr^2 instead of N^2 (SegFormer Sec. 3.1, "Efficient Self-Attention")."""

    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).view(b, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)          # softmax(q k^T / sqrt(c / heads)) v, as NVlabs
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int, drop_path: float, mlp_ratio: int = 4):
        super().__init__()
        from timm.layers import DropPath

        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientAttention(dim, heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class OverlapPatchEmbed(nn.Module):
    """Overlapping patches: a conv with kernel > stride (7/4 for stage 1, 3/2 after), then LayerNorm."""

    def __init__(self, cin: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class MixVisionTransformer(nn.Module):
    """(B, 3, H, W) -> four maps (B, dims[i], H / 2^(i+2), W / 2^(i+2)), i = 0..3. Attribute names = NVlabs'."""

    def __init__(self, dims, depths, heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), drop_path_rate: float = 0.1):
        super().__init__()
        self.dims = tuple(dims)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()    # stochastic depth decay rule
        cin, cur = 3, 0
        for i in range(4):
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(cin, dims[i], kernel, stride))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(dims[i], heads[i], sr_ratios[i], rates[cur + j]) for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=1e-6))
            cin, cur = dims[i], cur + depths[i]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            outs.append(x)
        return outs


def conv1x1_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegFormerEncoder(nn.Module):
    """MiT + the SegFormer head's per-stage projections: (B, 3, H, W) -> z (B, 4E, H/4, W/4) (see the module
    docstring for why z sits here). `head_prefixes`: the submodules that are head parameters (trainers.optim)."""

    head_prefixes = ("convs",)

    def __init__(self, backbone: MixVisionTransformer, embed: int):
        super().__init__()
        self.backbone = backbone
        self.convs = nn.ModuleList(conv1x1_bn_relu(c, embed) for c in backbone.dims)   # SSSegmentation `convs`
        self.out_channels = 4 * embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.backbone(x)
        size = stages[0].shape[-2:]
        return torch.cat([F.interpolate(conv(s), size=size, mode="bilinear", align_corners=False)
                          for conv, s in zip(self.convs, stages)], dim=1)


# `model.pretrained: ssseg`: the ImageNet weights SSSegmentation's MiT loads (its DEFAULT_MODEL_URLS, NVlabs' layout)
SSSEG_URLS = {arch: f"https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_segformer/{arch}.pth"
              for arch in ("mit_b0", "mit_b1", "mit_b3")}


def load_mit_weights(backbone: MixVisionTransformer, path: str, arch: str) -> None:
    """Official MiT ImageNet weights (NVlabs mit_b*.pth layout) from a local file, or `ssseg` (SSSegmentation's copy,
    downloaded: needs the network); their classifier head.* dropped. Any other missing or unexpected key is an error."""
    state = read_weights(path, arch, SSSEG_URLS, "ssseg", f"NVlabs' {arch}.pth layout")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_weights(backbone, state, path, arch, "NVlabs' layout")


def _mit(arch: str):
    def build(cfg) -> nn.Module:
        spec = MIT_ARCHS[arch]
        backbone = MixVisionTransformer(spec["dims"], spec["depths"])
        if cfg.pretrained:
            load_mit_weights(backbone, cfg.pretrained, arch)
        return SegFormerEncoder(backbone, cfg.decoder_channels or spec["embed"])
    return build


for _arch in MIT_ARCHS:
    ENCODERS.register(_arch, _mit(_arch))


class SegFormerHead(nn.Module):
    """The rest of SegFormer's all-MLP head (SSSegmentation's `decoder`): fuse 1x1 Conv-BN-ReLU (in -> E), dropout
    0.1, 1x1 classifier. in = 4E (z), or 8E when latent_rl's concat / mha modulation doubles the latent."""

    def __init__(self, in_channels: int, num_classes: int, embed: int, dropout: float = 0.1):
        super().__init__()
        self.fuse = conv1x1_bn_relu(in_channels, embed)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed, num_classes, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.fuse(z)))


@DECODERS.register("segformer_head")
def segformer_head(in_channels: int, num_classes: int, channels: int | None = None,
                   latent_channels: int | None = None) -> nn.Module:
    """Pair with a mit_* encoder: E = model.decoder_channels, else a quarter of the latent width (the encoder's 4E)."""
    embed = channels or (latent_channels or in_channels) // 4
    return SegFormerHead(in_channels, num_classes, embed)
