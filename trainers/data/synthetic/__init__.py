"""Procedural "synthetic surgical scene" segmentation dataset (EndoVis-2018 style, in miniature).

Every scene is a pure function of ``(seed, index, size)``: geometry, colours and low-frequency
textures come from ``np.random.default_rng([seed, index])`` (so a scene rendered at 64 and at 128
pixels shows the same layout), per-pixel noise from ``np.random.default_rng([seed, index, size])``.
No global RNG state is touched.

Layers, back to front (the painter's algorithm also writes the label map):

* background tissue: pink/red base colour, low-frequency colour variation, yellowish fat patches,
  darker vessels and folds (soft curves, still labelled background), fine noise;
* kidney parenchyma: 0-2 smooth random blobs, darker purple-brown, mottled, convex shading;
* clamps: small, compact, high-contrast yellow/green clips;
* thread (thin curves, violet or blue) and suturing needle (thin silver half-circle arc),
  drawn under the instruments in most scenes and on top of them in the others;
* instruments (1-2): grey metallic shaft entering from the border, dark wrist with metallic
  bands, two thin metallic clasper jaws (a V); soft shadow on the tissue;
* unlabelled specular highlights (tissue and instruments), mild blur, vignette, colour/brightness
  jitter, a tone curve and Gaussian sensor noise.

All rasterisation is vectorised numpy on coordinate grids (signed distances to segments, arcs,
curves and polar contours); coordinates are normalised to [0, 1] so geometry is size independent.
Thin structures have a half-width of 1.1-1.5 px (thread) and 1.8-2.3 px (needle) at the embedded 48 px (scaled
with size, never below 0.5 px), and clamps are 9-13 % of the image side long: every class can be learned by the
embedded supervised row. Decided from that row alone (trainers/presets/supervised.yaml, FCN on the tiny CNN, 48 px;
5 seeds, final val IoU, mean ± std), before any RL row was looked at:

    class                 before (1-px thread / needle, small clamps;   after (this generator;
                          12 epochs, 33.6 ± 0.2 mIoU)                   18 epochs, 41.1 mIoU)
    background-tissue     88.5 ± 0.1                                    84.4 ± 0.4
    kidney-parenchyma     62.5 ± 0.4                                    58.0 ± 1.7
    instrument-shaft      69.9 ± 0.4                                    67.5 ± 0.4
    instrument-wrist      26.9 ± 1.2                                    24.3 ± 2.1
    instrument-clasper    21.2 ± 1.5                                    16.9 ± 1.3
    thread                 0.0 ± 0.0                                    21.5 ± 0.6
    suturing-needle        0.0 ± 0.0                                    24.2 ± 2.0
    clamps                 0.0 ± 0.0                                    31.8 ± 4.2

Before, the thread and the needle were 1 px wide at 48 px and the clamps 2-3 x 4-7 px: smaller than one cell of the
output-stride-8 latent (6 x 6), and IoU 0.0 in every seed. The thread's tissue-coloured variant is gone (sutures
are violet or blue). The other classes lose a few points: the thicker thin classes cover more of them.

Modules: scene (classes and each scene's parameters), draw (grids, distances, canvas), render (rasterisation and
camera), shift (the shifted domains of data.shift: low light, sensor noise, colour cast); this module holds the
torch dataset and re-exports the names other code uses.
"""

from __future__ import annotations

import numpy as np
import torch

from trainers.data.endovis import CLASSES as _ENDOVIS_CLASSES, PALETTE as _ENDOVIS_PALETTE
from trainers.data.synthetic.draw import _axes, _smooth_field  # noqa: F401  (trainers.data.foreground uses them)
from trainers.data.synthetic.render import _render_chw, render_scene
from trainers.data.synthetic.scene import (BACKGROUND, CLAMPS, CLASPER, CLASSES, KIDNEY, NEEDLE, SHAFT,  # noqa: F401
                                           THREAD, WRIST)
from trainers.data.synthetic.shift import apply_shift

__all__ = [
    "CLASSES",
    "PALETTE",
    "IGNORE_INDEX",
    "MEAN",
    "STD",
    "render_scene",
    "colorize_mask",
    "SyntheticSurgical",
]

# The EndoVis 2018 label colours (labels.json) of these classes, in CLASSES order: one table, in endovis.py.
PALETTE: tuple[tuple[int, int, int], ...] = tuple(_ENDOVIS_PALETTE[_ENDOVIS_CLASSES.index(c)] for c in CLASSES)

IGNORE_INDEX = 255

# Per-channel statistics of image/255, measured on SyntheticSurgical("train", 2048, 64, seed=0)
# (the values barely move with the seed or the image size). Fixed constants on purpose.
MEAN: tuple[float, float, float] = (0.572, 0.310, 0.296)
STD: tuple[float, float, float] = (0.156, 0.134, 0.145)

# Offset of the validation scene stream: val scene i is render_scene(seed, VAL_INDEX_OFFSET + i).
VAL_INDEX_OFFSET = 1 << 40


def colorize_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours from PALETTE (IGNORE_INDEX -> white)."""
    lut = np.full((256, 3), 255, dtype=np.uint8)
    lut[: len(PALETTE)] = np.asarray(PALETTE, dtype=np.uint8)
    return lut[np.asarray(mask, dtype=np.uint8)]


# --------------------------------------------------------------------------------------------
# torch dataset
# --------------------------------------------------------------------------------------------


class SyntheticSurgical(torch.utils.data.Dataset):
    """Pre-rendered synthetic surgical scenes.

    ``split="train"`` uses scene indices ``0 .. size-1``; ``split="val"`` uses
    ``VAL_INDEX_OFFSET + 0 .. size-1`` of the same seed, so the two streams never overlap.
    ``__getitem__`` returns ``(image float32 (3, H, W) normalised with MEAN/STD, mask int64 (H, W))``.
    ``shift`` (trainers.config.ShiftConfig, data.shift): the same scenes in a shifted domain (shift.py), still
    normalised with the training domain's MEAN/STD, as a deployed model would see them.
    """

    classes = CLASSES
    num_classes = len(CLASSES)
    ignore_index = IGNORE_INDEX
    palette = PALETTE
    splits = ("train", "val")

    def __init__(self, split: str, size: int, image_size: int = 64, seed: int = 0, shift=None):
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, self.splits))}")
        if int(size) < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.split = split
        self.size = int(size)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.shift = shift
        offset = 0 if split == "train" else VAL_INDEX_OFFSET
        n, s = self.size, self.image_size
        images = np.empty((n, 3, s, s), dtype=np.uint8)
        masks = np.empty((n, s, s), dtype=np.uint8)
        for i in range(n):
            images[i], masks[i] = _render_chw(self.seed, offset + i, s)
            if shift is not None:
                images[i] = apply_shift(images[i], shift, self.seed, offset + i)
        self.images = torch.from_numpy(images)
        self.masks = torch.from_numpy(masks)
        self._mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        image = (self.images[i].float() / 255.0 - self._mean) / self._std
        return image, self.masks[i].long()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, size={self.size}, "
            f"image_size={self.image_size}, seed={self.seed}"
            + (f", shift={self.shift!r})" if self.shift is not None else ")")
        )
