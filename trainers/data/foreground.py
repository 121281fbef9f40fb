"""Procedural foreground-segmentation scenes (one object, a binary mask), in two flavours:

* camouflaged (COD-like, `synthetic_cod`): the object is painted with the *same* texture process as its background
  (same palette, same blotch and mottle statistics, another realisation of the random fields). What gives it away is
  what gives a camouflaged animal away: a slight shift of its mean colour, a slightly finer mottle, soft convex
  shading and a faint rim where its texture meets the background's;
* salient (SOD-like, `synthetic_sod`): the object's colour comes from the far side of the colour wheel and its
  texture is flatter: a clearly visible object.

Every scene is a pure function of (seed, index, size) as in trainers/data/synthetic.py (same smooth-field builder):
layout and colours come from `default_rng([seed, index])` (identical at every size), per-pixel noise from
`default_rng([seed, index, size])`. The object is a star-shaped blob r(theta) = r0 (1 + sum_k a_k cos(k theta +
phi_k)), k = 2..5, its area 3-20% of the image, never touching the border (so its box is well defined).
Masks are 0/1 (uint8); there is no ignore label in these scenes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from trainers.data.synthetic import VAL_INDEX_OFFSET, _axes, _smooth_field

CLASSES: tuple[str, ...] = ("background", "foreground")
IGNORE_INDEX = 255
FLAVOURS = ("camouflaged", "salient")
# image/255 statistics are close to these for both flavours (measured on 1024 scenes at 64 px, seed 0)
MEAN: tuple[float, float, float] = (0.45, 0.42, 0.33)
STD: tuple[float, float, float] = (0.14, 0.13, 0.12)


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An earthy base colour and a secondary (spot) colour near it, (3,) each in [0, 1]."""
    base = np.array([0.35, 0.32, 0.22]) + rng.uniform(-0.12, 0.18, 3) * np.array([1.0, 1.0, 0.7])
    spot = np.clip(base + rng.uniform(-0.18, 0.18, 3), 0.05, 0.95)
    return np.clip(base, 0.08, 0.9), spot


def _texture(rng: np.random.Generator, size: int, base: np.ndarray, spot: np.ndarray, mottle_g: int) -> np.ndarray:
    """(3, size, size) natural texture: large colour blotches, a finer mottle and thresholded spots."""
    blotch = _smooth_field(rng.standard_normal((2, 6, 6)).astype(np.float32), size)        # (2, S, S)
    mottle = _smooth_field(rng.standard_normal((1, mottle_g, mottle_g)).astype(np.float32), size)[0]
    spots = np.clip((_smooth_field(rng.standard_normal((1, 12, 12)).astype(np.float32), size)[0] - 0.9) * 3, 0, 1)
    tint = np.array([1.0, 0.9, 0.6], dtype=np.float32)[:, None, None]
    img = base.astype(np.float32)[:, None, None] * (1 + 0.22 * blotch[0]) + 0.05 * tint * blotch[1]
    img = img + 0.07 * mottle
    return img + spots * (spot.astype(np.float32)[:, None, None] - img)


def _blob(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Star-shaped object: its mask (S, S) bool and its normalised radius rho / r(theta) (S, S)."""
    x, y = _axes(size)
    r0 = rng.uniform(0.12, 0.25)
    cx, cy = rng.uniform(0.18 + r0, 0.82 - r0, 2) if r0 < 0.32 else (0.5, 0.5)
    amps = rng.uniform(0.0, 0.22, 4) / np.arange(1, 5)
    phases = rng.uniform(0, 2 * math.pi, 4)
    dx, dy = x - cx, y - cy
    theta = np.arctan2(dy, dx)
    k = np.arange(2, 6, dtype=np.float32)[:, None, None]
    r = r0 * (1 + (amps[:, None, None] * np.cos(k * theta[None] + phases[:, None, None])).sum(0))
    rel = np.sqrt(dx * dx + dy * dy) / r
    return rel < 1.0, rel


def render_foreground(seed: int, index: int, size: int, flavour: str = "camouflaged") -> tuple[np.ndarray, np.ndarray]:
    """One scene: image uint8 (3, size, size), mask uint8 (size, size) of 0/1. A pure function of its arguments."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; expected one of {', '.join(FLAVOURS)}")
    seed, index, size = int(seed), int(index), int(size)
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed}, {index}")
    rng = np.random.default_rng([seed, index])
    base, spot = _palette(rng)
    background = _texture(rng, size, base, spot, mottle_g=10)
    mask, rel = _blob(rng, size)
    if flavour == "camouflaged":
        # same process, another realisation; the cues are small on purpose (COD)
        shift = rng.uniform(0.03, 0.07) * rng.choice([-1.0, 1.0], 3)
        obj = _texture(rng, size, np.clip(base + shift, 0.05, 0.95), spot, mottle_g=16)
        shading = 1 + 0.08 * (1 - np.clip(rel, 0, 1) ** 2)               # convex body
        rim = np.exp(-((rel - 1.0) / 0.06) ** 2) * 0.06                # faint outline
    else:
        hue = np.clip(1.0 - base + rng.uniform(-0.1, 0.1, 3), 0.05, 0.95)   # far side of the colour wheel
        flat = _texture(rng, size, hue, hue, mottle_g=6)
        obj = hue.astype(np.float32)[:, None, None] + 0.3 * (flat - flat.mean((1, 2), keepdims=True))
        shading = 1 + 0.15 * (1 - np.clip(rel, 0, 1) ** 2)
        rim = np.zeros_like(rel)
    soft = np.clip((1.0 - rel) * size * 0.25 + 0.5, 0.0, 1.0)          # anti-aliased object edge
    img = background + soft * (obj * shading - background) - rim
    img = ndimage.gaussian_filter(img, sigma=(0.0, 0.5 * size / 64, 0.5 * size / 64), mode="nearest")
    noise = np.random.default_rng([seed, index, size]).standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img * rng.uniform(0.85, 1.15) + 0.02 * noise, 0.0, 1.0)
    return (img * 255 + 0.5).astype(np.uint8), mask.astype(np.uint8)


class SyntheticForeground(torch.utils.data.Dataset):
    """Pre-rendered foreground scenes. split "train": indices 0 .. size-1; "val": VAL_INDEX_OFFSET + 0 .. size-1 of
    the same seed (never overlapping). __getitem__ -> (image float32 (3, H, W) normalised with MEAN / STD,
    mask int64 (H, W) of 0/1)."""

    classes = CLASSES
    num_classes = len(CLASSES)
    ignore_index = IGNORE_INDEX
    splits = ("train", "val")

    def __init__(self, split: str, size: int, image_size: int = 64, seed: int = 0, flavour: str = "camouflaged"):
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, self.splits))}")
        self.split, self.size, self.image_size, self.seed, self.flavour = split, int(size), int(image_size), int(seed), flavour
        offset = 0 if split == "train" else VAL_INDEX_OFFSET
        images = np.empty((self.size, 3, self.image_size, self.image_size), dtype=np.uint8)
        masks = np.empty((self.size, self.image_size, self.image_size), dtype=np.uint8)
        for i in range(self.size):     # one scene per index (each its own RNG streams); ~1 ms a scene at 64 px
            images[i], masks[i] = render_foreground(self.seed, offset + i, self.image_size, flavour)
        self.images, self.masks = torch.from_numpy(images), torch.from_numpy(masks)
        self._mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        return (self.images[i].float() / 255.0 - self._mean) / self._std, self.masks[i].long()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed}, flavour={self.flavour!r})")
