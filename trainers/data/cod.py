"""Camouflaged (COD10K, CAMO) and salient (DUTS-TR / DUTS-TE) object datasets in their published on-disk layouts.

``data.root`` is the folder that holds the dataset's top folder, or that folder itself::

    COD10K-v3/                        (COD10K, Fan et al. CVPR 2020)
        Train/Image/<name>.jpg        6,000 images; the 3,040 camouflaged ones (names with "-CAM-") are the train set
        Train/GT_Object/<name>.png    object masks, 0/255
        Test/Image/<name>.jpg         4,000 images; the 2,026 "-CAM-" ones are the test set every COD paper reports
        Test/GT_Object/<name>.png
    CAMO-V.1.0-CVIU2019/              (CAMO, Le et al. CVIU 2019)
        Images/Train/<name>.jpg       1,000 images
        Images/Test/<name>.jpg        250 images
        GT/<name>.png                 the masks of both splits, 0/255
    DUTS-TR/DUTS-TR-Image/<name>.jpg, DUTS-TR/DUTS-TR-Mask/<name>.png   (DUTS, Wang et al. CVPR 2017: 10,553 train)
    DUTS-TE/DUTS-TE-Image/<name>.jpg, DUTS-TE/DUTS-TE-Mask/<name>.png   (5,019 test)

COD10K's non-camouflaged images ("-NonCAM-", no object) are left out, as SINet and the COD tables do. Split "train"
reads Train / Images/Train / DUTS-TR, "val" reads Test / Images/Test / DUTS-TE (the test sets the tables report).

Each image is resized to image_size x image_size (bilinear; the SOD / COD habit of a square input), its mask read as
a greyscale PNG, binarised once at 128 (0/255 -> 0/1) and resized with nearest neighbour; training images are
flipped horizontally with probability 1/2 (torch's global RNG, so a run is reproducible and resumable). Metrics are
computed at image_size (not at the original resolution as the COD tables are). ``__getitem__`` returns
(image float32 (3, S, S) normalised with the ImageNet mean / std, mask int64 (S, S) of 0/1); files are read lazily.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers.data.voc import MEAN, STD, relative_path

CLASSES: tuple[str, ...] = ("background", "foreground")
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _find_top(root, top: str, layout: str) -> Path:
    """`root`/`top`, or root itself when its name is `top`; errors start with data.root."""
    if root is None:
        raise FileNotFoundError(f"data.root: not set (expected a folder holding {layout})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} does not exist or is not a folder (expected {layout})")
    for cand in (root / top, root):
        if cand.name == top and cand.is_dir():
            return cand
    raise FileNotFoundError(f"data.root: {root} has no {top} folder (expected {layout})")


def _pairs(root: Path, image_dir: Path, mask_dir: Path, layout: str, keep=lambda stem: True) -> list[tuple[Path, Path]]:
    """(image, mask) paths, sorted by name; every kept image needs its mask (same stem, .png)."""
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"data.root: {root} has no {relative_path(root, d)} folder (expected {layout})")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and keep(p.stem))
    if not images:
        raise FileNotFoundError(f"data.root: {relative_path(root, image_dir)} holds no images (expected {layout})")
    pairs = []
    for img in images:
        mask = mask_dir / f"{img.stem}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"data.root: {relative_path(root, mask)} is missing (the mask of "
                                    f"{relative_path(root, img)})")
        pairs.append((img, mask))
    return pairs


def cod10k_pairs(root, split: str) -> list[tuple[Path, Path]]:
    layout = "COD10K-v3/{Train,Test}/{Image,GT_Object}"
    top = _find_top(root, "COD10K-v3", layout)
    part = top / ("Train" if split == "train" else "Test")
    names = {p.stem for p in (part / "Image").glob("*")} if (part / "Image").is_dir() else set()
    cam_only = any("-CAM-" in n for n in names)        # the published names; a renamed copy keeps every image
    return _pairs(top, part / "Image", part / "GT_Object", layout, (lambda s: "-CAM-" in s) if cam_only else (lambda s: True))


def camo_pairs(root, split: str) -> list[tuple[Path, Path]]:
    layout = "CAMO-V.1.0-CVIU2019/{Images/Train,Images/Test,GT}"
    top = _find_top(root, "CAMO-V.1.0-CVIU2019", layout)
    return _pairs(top, top / "Images" / ("Train" if split == "train" else "Test"), top / "GT", layout)


def duts_pairs(root, split: str) -> list[tuple[Path, Path]]:
    name = "DUTS-TR" if split == "train" else "DUTS-TE"
    layout = f"{name}/{{{name}-Image,{name}-Mask}}"
    root_path = Path(root).expanduser() if root is not None else None
    # data.root may hold DUTS-TR and DUTS-TE, or be one of them, or be DUTS-TE's sibling folder
    if root_path is not None and root_path.name in ("DUTS-TR", "DUTS-TE") and root_path.name != name:
        root_path = root_path.parent
    top = _find_top(root_path, name, layout)
    return _pairs(top, top / f"{name}-Image", top / f"{name}-Mask", layout)


class ForegroundFolder(torch.utils.data.Dataset):
    """(image, mask) pairs from disk, binary masks; see the module docstring for the transforms."""

    classes = CLASSES
    num_classes = len(CLASSES)
    ignore_index = IGNORE_INDEX
    splits = ("train", "val")

    def __init__(self, pairs: list[tuple[Path, Path]], split: str, image_size: int = 352, size: int | None = None):
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, self.splits))}")
        self.pairs = pairs[:size] if size is not None else pairs
        self.split, self.image_size = split, int(image_size)
        self._mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """The i-th image (PIL RGB) and its mask binarised once: uint8 (H, W) of 0/1."""
        image_path, mask_path = self.pairs[i]
        image = Image.open(image_path).convert("RGB")
        with Image.open(mask_path) as m:
            mask = (np.asarray(m.convert("L")) >= 128).astype(np.uint8)
        if mask.shape[::-1] != image.size:
            raise ValueError(f"{mask_path}: mask size {mask.shape[::-1]} differs from the image size {image.size}")
        return image, mask

    def __getitem__(self, i):
        image, mask = self.load(i)
        s = self.image_size
        img = torch.from_numpy(np.array(image.resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0)
        msk = torch.from_numpy(np.array(Image.fromarray(mask).resize((s, s), Image.NEAREST))).long()
        img = (img.permute(2, 0, 1) - self._mean) / self._std
        if self.split == "train" and torch.rand(()) < 0.5:
            img, msk = img.flip(-1), msk.flip(-1)
        return img.contiguous(), msk.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, image_size={self.image_size})"
