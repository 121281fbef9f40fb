"""CLIP-RL (paper 000, "architecture"): a frozen open_clip ViT encoder and the transposed-conv decoder.

Encoders (registered in ENCODERS; open_clip is imported inside the builders, so registering stays cheap):
  clip_vit_b16   open_clip "ViT-B-16" vision tower at 224 px: patch tokens of blocks 3, 6, 9, 12
                 (indices [2, 5, 8, 11]), each (B, 768, 14, 14), concatenated -> (B, 3072, 14, 14).
  clip_vit_tiny  the embedded default: "rlseg-ViT-Ti-8" (open_clip_configs/rlseg-ViT-Ti-8.json; 64 px, patch 8,
                 width 128, 4 layers) registered with open_clip.add_model_config; blocks [1, 3] -> (B, 256, 8, 8).
`model.pretrained`: None -> random init; an existing file -> open_clip's own loader
(`open_clip.create_model(name, pretrained=<path>)`, a full CLIP state dict as `torch.save(clip.state_dict())`
writes it); any other string -> an open_clip pretrained tag such as "openai" (needs the network; ViT-B-16 only).

Decoders (registered in DECODERS): the builder signature is fixed by the segmentor
(`(in_channels, num_classes, channels, latent_channels=...)`) and carries no patch size, so the number of
x2 transposed-conv stages is chosen by name:
  tconv   4 stages (x16: 14 -> 28 -> 56 -> 112 -> 224, patch 16, the paper's ViT-B-16 decoder)
  tconv3  3 stages (x8: 8 -> 16 -> 32 -> 64, patch 8, for clip_vit_tiny)
Pair them so that decoder `.scale` == encoder `.patch_size`; otherwise the segmentor's final bilinear resize
silently hides the mismatch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from trainers.registry import DECODERS, ENCODERS

CONFIG_DIR = Path(__file__).parent / "open_clip_configs"
TINY_MODEL = "rlseg-ViT-Ti-8"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".npy", ".ckpt")


def evenly_spaced_blocks(layers: int, n: int) -> list[int]:
    """n block indices spread over `layers` blocks, ending at the last: (12, 4) -> [2, 5, 8, 11]; (4, 2) -> [1, 3]."""
    if not 1 <= n <= layers:
        raise ValueError(f"cannot take {n} blocks out of {layers}")
    return [(k + 1) * layers // n - 1 for k in range(n)]


def tokens_to_grid(tokens: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """ViT tokens (B, P + H*W, C) -> (B, C, H, W): the P prefix (CLS) tokens are dropped and patch token i
    lands at grid (i // W, i % W) (row-major, the order of the patch-embedding conv's flatten)."""
    H, W = grid_size
    B, L, C = tokens.shape
    if L != num_prefix_tokens + H * W:
        raise ValueError(f"{L} tokens do not make {num_prefix_tokens} prefix + a {H}x{W} grid")
    return tokens[:, num_prefix_tokens:].reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()


class FrozenClipViT(nn.Module):
    """An open_clip VisionTransformer, frozen, returning the patch tokens of `blocks` fused along channels.
    `frozen = True` keeps it out of training checkpoints (SegMethod.checkpoint_state): it is rebuilt from config.

    Frozen three ways: every parameter has requires_grad False; the tower stays in eval mode whatever the
    parent's .train() says; forward runs under torch.no_grad() (no graph through the tower, so the latent z
    is a leaf and no gradient can ever reach the tower).

    Inputs arrive normalised with the dataset's mean/std (ImageNet-like) and are NOT re-normalised with
    CLIP's own mean/std (which differs slightly): kept simple on purpose.
    """

    frozen = True

    def __init__(self, visual: nn.Module, blocks: Sequence[int], name: str = "clip_vit",
                 normalize_intermediates: bool = True):
        super().__init__()
        layers = len(visual.transformer.resblocks)
        blocks = [int(b) for b in blocks]
        if not blocks or any(not 0 <= b < layers for b in blocks) or blocks != sorted(set(blocks)):
            raise ValueError(f"{name}: blocks {blocks} must be increasing indices in [0, {layers})")
        # the pooled/projected image embedding is never used: drop the projection (and blocks past the last one)
        visual.prune_intermediate_layers(blocks, prune_norm=not normalize_intermediates, prune_head=True)
        self.tower = visual
        self.tower.requires_grad_(False)
        self.tower.eval()
        self.name = name
        self.blocks = blocks
        # normalize_intermediates=True: open_clip applies the tower's final LayerNorm (ln_post) to EVERY
        # returned intermediate (VisionTransformer.forward_intermediates), so all fused blocks get the same
        # treatment, the last block equals CLIP's own `output_tokens`, and blocks with very different residual
        # stream magnitudes are brought to one scale before the decoder's 1x1 fusion conv.
        self.normalize_intermediates = normalize_intermediates
        self.width = int(visual.transformer.width)
        self.image_size = tuple(int(s) for s in visual.image_size)
        self.patch_size = int(visual.patch_size[0])
        self.grid_size = tuple(int(g) for g in visual.grid_size)
        self.out_channels = self.width * len(blocks)

    def train(self, mode: bool = True) -> "FrozenClipViT":
        super().train(mode)
        self.tower.eval()           # frozen: dropout / patch dropout never switch on
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(
                f"{self.name} takes {h}x{w} images (its positional embedding fixes the size), got "
                f"{x.shape[-2]}x{x.shape[-1]}; set data.image_size: {h}")
        with torch.no_grad():
            out = self.tower.forward_intermediates(
                x, indices=self.blocks, stop_early=True, normalize_intermediates=self.normalize_intermediates,
                intermediates_only=True, output_fmt="NLC")   # NLC: patch tokens only, CLS already split off
            grids = [tokens_to_grid(t, self.grid_size, num_prefix_tokens=0) for t in out["image_intermediates"]]
        return torch.cat(grids, dim=1)


def register_tiny_config() -> None:
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR / f"{TINY_MODEL}.json")


def _create_clip(model_name: str, pretrained: str | None, allow_tags: bool):
    import open_clip

    if pretrained is None:   # on the default device (the dry run builds on "meta": open_clip would move it to cpu)
        return open_clip.create_model(model_name, pretrained=None, device=torch.get_default_device())
    if os.path.isfile(pretrained):
        return open_clip.create_model(model_name, pretrained=pretrained)   # open_clip's local-file loader
    if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"model.pretrained: no checkpoint file at {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(model_name) if allow_tags else []
    if pretrained not in tags:
        raise ValueError(f"model.pretrained: {pretrained!r} is neither a local checkpoint file nor an open_clip "
                         f"tag for {model_name} (known: {', '.join(tags) or 'none'})")
    return open_clip.create_model(model_name, pretrained=pretrained)       # downloads: needs the network


def build_clip_encoder(model_name: str, pretrained: str | None, num_blocks: int, name: str,
                       allow_tags: bool = True) -> FrozenClipViT:
    clip = _create_clip(model_name, pretrained, allow_tags)
    visual = clip.visual
    blocks = evenly_spaced_blocks(len(visual.transformer.resblocks), num_blocks)
    return FrozenClipViT(visual, blocks, name=name)      # the text tower goes with `clip`


@ENCODERS.register("clip_vit_b16")
def clip_vit_b16(cfg) -> nn.Module:
    return build_clip_encoder("ViT-B-16", cfg.pretrained, num_blocks=4, name="clip_vit_b16")


@ENCODERS.register("clip_vit_tiny")
def clip_vit_tiny(cfg) -> nn.Module:
    register_tiny_config()
    return build_clip_encoder(TINY_MODEL, cfg.pretrained, num_blocks=2, name="clip_vit_tiny", allow_tags=False)


class TConvDecoder(nn.Module):
    """CLIP-RL decoder: 1x1 fusion Conv-BN-ReLU (in -> C) over the concatenated block tokens, then `stages`
    ConvTranspose2d(k2, s2)-BN-ReLU stages (each x2, widths C/2, C/4, ... floored at 32), then a 1x1 classifier.

    forward(z) == classifier(features(z)); `features` is what a residual head (clip_rl) builds on.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int | None = None, stages: int = 4,
                 min_channels: int = 32):
        super().__init__()
        c = channels or 256
        self.fuse = nn.Sequential(nn.Conv2d(in_channels, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        ups = []
        for _ in range(stages):
            nxt = max(c // 2, min_channels)
            ups.append(nn.Sequential(nn.ConvTranspose2d(c, nxt, 2, stride=2, bias=False),
                                     nn.BatchNorm2d(nxt), nn.ReLU(inplace=True)))
            c = nxt
        self.up = nn.Sequential(*ups)
        self.stages = stages
        self.scale = 2 ** stages          # output size / token grid size
        self.out_channels = c             # width of features(z)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """(B, in, h, w) -> (B, out_channels, h * scale, w * scale): the last stage, before the classifier."""
        return self.up(self.fuse(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(z))


@DECODERS.register("tconv")
def tconv(in_channels: int, num_classes: int, channels: int | None = None,
          latent_channels: int | None = None) -> nn.Module:
    """4 stages (x16): for patch-16 encoders (clip_vit_b16). latent_channels is unused (the fusion conv sizes
    itself from in_channels)."""
    return TConvDecoder(in_channels, num_classes, channels, stages=4)


@DECODERS.register("tconv3")
def tconv3(in_channels: int, num_classes: int, channels: int | None = None,
           latent_channels: int | None = None) -> nn.Module:
    """3 stages (x8): for patch-8 encoders (clip_vit_tiny)."""
    return TConvDecoder(in_channels, num_classes, channels, stages=3)
