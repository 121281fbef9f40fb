"""Render a preview grid of the synthetic surgical scenes.

    python -m trainers.data.preview OUT.png [--n 6] [--size 128] [--seed 0] [--start 0] [--split train]

Row 1: images; row 2: colour masks (EndoVis-2018 palette); a legend with the class colours below.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from trainers.data.synthetic import CLASSES, PALETTE, VAL_INDEX_OFFSET, colorize_mask, render_scene


def render_grid(n: int = 6, size: int = 128, seed: int = 0, start: int = 0, split: str = "train"):
    """Return (images, colour masks) lists for scenes ``start .. start+n-1`` of the split."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; valid splits are 'train', 'val'")
    offset = 0 if split == "train" else VAL_INDEX_OFFSET
    images, masks = [], []
    for i in range(start, start + n):
        img, mask = render_scene(seed, offset + i, size)
        images.append(img)
        masks.append(colorize_mask(mask))
    return images, masks


def save_preview(out: str, n: int = 6, size: int = 128, seed: int = 0, start: int = 0, split: str = "train") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    images, masks = render_grid(n, size, seed, start, split)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.7), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j], interpolation="nearest")
        axes[1, j].imshow(masks[j], interpolation="nearest")
        axes[0, j].set_title(f"{split} #{start + j}", fontsize=8)
        for r in range(2):
            axes[r, j].set_xticks([])
            axes[r, j].set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("mask", fontsize=9)
    handles = [
        Patch(facecolor=np.asarray(c) / 255.0, edgecolor="0.5", label=name) for name, c in zip(CLASSES, PALETTE)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"SyntheticSurgical (seed={seed}, size={size})", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainers.data.preview", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output PNG path")
    ap.add_argument("--n", type=int, default=6, help="number of scenes (columns)")
    ap.add_argument("--size", type=int, default=128, help="image size in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first scene index")
    ap.add_argument("--split", choices=("train", "val"), default="train")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    save_preview(args.out, args.n, args.size, args.seed, args.start, args.split)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
