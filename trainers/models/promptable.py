"""Promptable segmenters (the SAM family's shape) by name: image encoder -> prompt encoder -> mask decoder.

    emb = seg.embed_image(images)                      (B, 3, H, W) -> image embedding, computed once per image
    logits = seg.decode(emb, boxes, points, labels, (H, W))
        boxes  (N, 4) x1, y1, x2, y2 in [0, 1] (image fractions), or None for no box
        points (N, K, 2) x, y in [0, 1]; labels (N, K): 1 foreground, 0 background, -1 padding (SAM's "not a point")
        emb is (N, ...) already (repeat it per prompt); logits (N, H, W), foreground where > 0

`promptable_tiny` is ours: a small random-init model for the embedded default (CPU, seconds per epoch), built like
SAM (Kirillov et al. 2023, segment_anything/modeling): a conv image encoder to stride 4, SAM's prompt encoder (random
Fourier positional encoding of each coordinate plus a learned embedding per kind: negative / positive point, box
top-left / bottom-right corner, not-a-point; a learned no-mask embedding added to the image embedding), and SAM's
mask decoder (a two-way transformer between the prompt tokens plus a mask token and the image tokens, transposed-conv
upscaling, a hypernetwork MLP on the mask token). One mask per prompt (no multimask output, no IoU head). It is
trained with random prompts by the `promptable_pretrain` method (trainers/methods/promptable_pretrain.py).

`sam2.1_hiera_*`: Meta's SAM 2.1 (Seg-R1's segmenter) from a local checkpoint, through the optional `sam2` package
(`pip install sam2`, a CUDA machine; see README "Seg-R1"). Nothing here downloads.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from trainers.registry import Registry

PROMPTABLE: Registry = Registry("promptable segmenter")


class Attention(nn.Module):
    """SAM's attention with an optional downsampled inner width (mask_decoder's cross attention uses 1/2)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h = q.shape[0], self.heads
        q, k, v = (t.view(b, t.shape[1], h, -1).transpose(1, 2) for t in (self.q(q), self.k(k), self.v(v)))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """SAM TwoWayAttentionBlock: tokens self-attention, tokens -> image, MLP, image -> tokens (post-norm)."""

    def __init__(self, dim: int, heads: int, mlp: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn, self.t2i, self.i2t = Attention(dim, heads), Attention(dim, heads, 2), Attention(dim, heads, 2)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.ReLU(), nn.Linear(mlp, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.skip_first_pe = skip_first_pe

    def forward(self, tok, img, tok_pe, img_pe):
        if self.skip_first_pe:
            tok = self.self_attn(tok, tok, tok)
        else:
            q = tok + tok_pe
            tok = tok + self.self_attn(q, q, tok)
        tok = self.norms[0](tok)
        tok = self.norms[1](tok + self.t2i(tok + tok_pe, img + img_pe, img))
        tok = self.norms[2](tok + self.mlp(tok))
        img = self.norms[3](img + self.i2t(img + img_pe, tok + tok_pe, tok))
        return tok, img


class PromptableTiny(nn.Module):
    """SAM-shaped promptable segmenter, small and random-init (module docstring)."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, mlp: int = 64):
        super().__init__()
        if dim % 8 or dim % (2 * heads):
            raise ValueError(f"method.segmenter.dim ({dim}) must be a multiple of 8 and of 2 * heads ({2 * heads})")
        self.dim = self.embed_channels = dim

        def block(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.GroupNorm(8, o), nn.GELU()]
        self.image_encoder = nn.Sequential(*block(3, dim // 2, 2), *block(dim // 2, dim, 2), *block(dim, dim, 1),
                                           *block(dim, dim, 1), nn.Conv2d(dim, dim, 1))          # stride 4
        # SAM PositionEmbeddingRandom: a fixed Gaussian matrix, sin / cos of 2 pi (2 x - 1) @ G
        self.register_buffer("pe_gaussian", torch.randn(2, dim // 2))
        self.point_embed = nn.Embedding(4, dim)     # 0 negative point, 1 positive point, 2 box top-left, 3 bottom-right
        self.not_a_point = nn.Parameter(torch.randn(dim) * 0.02)
        self.no_mask = nn.Parameter(torch.randn(dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.blocks = nn.ModuleList(TwoWayBlock(dim, heads, mlp, skip_first_pe=(i == 0)) for i in range(depth))
        self.final_t2i = Attention(dim, heads, 2)
        self.final_norm = nn.LayerNorm(dim)
        self.upscale = nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, 2), nn.GroupNorm(1, dim // 4), nn.GELU(),
                                     nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())
        self.hyper = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim // 8))

    def positional(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) in [0, 1] -> (..., dim)."""
        z = 2 * math.pi * ((2 * xy - 1) @ self.pe_gaussian)
        return torch.cat([z.sin(), z.cos()], -1)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def prompt_tokens(self, boxes, points, labels, box_valid=None) -> torch.Tensor:
        """SAM PromptEncoder sparse embeddings: (N, K + 2 [box corners], dim); box_valid (N,) bool: where False the
        box tokens are padding (not-a-point), i.e. a points-only prompt."""
        parts = []
        if points is not None and points.shape[1] > 0:
            pad = labels < 0
            pe = self.positional(points) + self.point_embed(labels.clamp_min(0))
            parts.append(torch.where(pad[..., None], self.not_a_point.expand_as(pe), pe))
        if boxes is not None:
            corners = self.positional(boxes.view(-1, 2, 2)) + self.point_embed.weight[2:4]
            if box_valid is not None:
                corners = torch.where(box_valid[:, None, None], corners, self.not_a_point.expand_as(corners))
            parts.append(corners)
        if not parts:
            raise ValueError("a prompt needs a box or at least one point")
        return torch.cat(parts, 1)

    def decode(self, emb: torch.Tensor, boxes, points, labels, size, box_valid=None) -> torch.Tensor:
        n, d, h, w = emb.shape
        prompts = self.prompt_tokens(boxes, points, labels, box_valid)
        tok = torch.cat([self.mask_token.expand(n, 1, d), prompts], 1)
        img = (emb + self.no_mask[:, None, None]).flatten(2).transpose(1, 2)              # dense: no mask prompt
        ys, xs = torch.meshgrid((torch.arange(h, device=emb.device) + 0.5) / h,
                                (torch.arange(w, device=emb.device) + 0.5) / w, indexing="ij")
        img_pe = self.positional(torch.stack([xs, ys], -1).view(1, h * w, 2).to(emb.dtype))
        tok_pe = tok
        for blk in self.blocks:
            tok, img = blk(tok, img, tok_pe, img_pe)
        tok = self.final_norm(tok + self.final_t2i(tok + tok_pe, img + img_pe, img))
        up = self.upscale(img.transpose(1, 2).view(n, d, h, w))                            # (N, d/8, 4h, 4w)
        logits = torch.einsum("nc,nchw->nhw", self.hyper(tok[:, 0]), up)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return logits


@PROMPTABLE.register("promptable_tiny")
def promptable_tiny(cfg) -> nn.Module:
    return PromptableTiny(cfg.dim, cfg.depth, cfg.heads, cfg.mlp)


class SAM2Adapter(nn.Module):
    """SAM 2 / 2.1 behind the same interface (sam2.build_sam.build_sam2 + its image predictor's batched path).
    Images arrive ImageNet-normalised, which is SAM 2's own normalisation; they are resized to its 1024 input."""

    embed_channels = 256          # SAM 2's image embedding width

    def __init__(self, model):
        super().__init__()
        self.model = model

    def embed_image(self, images: torch.Tensor):
        x = F.interpolate(images, size=(self.model.image_size,) * 2, mode="bilinear", align_corners=False)
        out = self.model.forward_image(x)
        _, feats, _, _ = self.model._prepare_backbone_features(out)
        if self.model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + self.model.no_mem_embed
        b = images.shape[0]
        shapes = [(256, 256), (128, 128), (64, 64)][-len(feats):]
        maps = [f.permute(1, 2, 0).reshape(b, -1, *s) for f, s in zip(feats, shapes)]
        return maps[-1], maps[:-1]

    def decode(self, emb, boxes, points, labels, size, box_valid=None):
        image_embed, high_res = emb
        s = self.model.image_size
        coords, labs = [], []
        if points is not None and points.shape[1] > 0:
            coords.append(points * s)
            labs.append(labels)
        if boxes is not None:
            coords.append(boxes.view(-1, 2, 2) * s)
            labs.append(torch.tensor([2, 3], device=boxes.device).expand(boxes.shape[0], 2))
        sparse, dense = self.model.sam_prompt_encoder(points=(torch.cat(coords, 1), torch.cat(labs, 1)), boxes=None,
                                                      masks=None)
        masks, _, _, _ = self.model.sam_mask_decoder(
            image_embeddings=image_embed, image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=False, high_res_features=high_res)
        return F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


# the configs of the released SAM 2.1 checkpoints (sam2 package, configs/sam2.1/)
SAM2_CONFIGS = {"sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
                "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
                "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
                "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml"}


def _sam2_builder(name: str):
    def build(cfg) -> nn.Module:
        if not cfg.checkpoint or not os.path.isfile(cfg.checkpoint):
            raise ValueError(f"method.segmenter.checkpoint: {name} needs a local checkpoint file (e.g. "
                             f"{name}.pt from Meta's SAM 2 release), got {cfg.checkpoint!r}")
        try:
            from sam2.build_sam import build_sam2
        except ImportError:
            raise ValueError(f"method.segmenter.name: {name} needs the optional `sam2` package "
                             "(pip install sam2; see README, Seg-R1)") from None
        return SAM2Adapter(build_sam2(SAM2_CONFIGS[name], cfg.checkpoint, device="cpu"))
    return build


for _name in SAM2_CONFIGS:
    PROMPTABLE.register(_name, _sam2_builder(_name))


def build_promptable(cfg) -> nn.Module:
    """cfg: a SegmenterConfig (trainers/methods/promptable_pretrain.py)."""
    return PROMPTABLE.get(cfg.name)(cfg)
