"""The shared base of the on-disk segmentation datasets: an image folder and a mask folder, one pipeline.

A subclass says where its files are (``self.samples``: one (image path, mask path) pair per image, or its own
``paths(i)``), how stored mask values become train ids (``label_map``: a 256-entry table, e.g. Cityscapes labelIds ->
trainIds, ADE20K's reduce_zero_label) and which labels a horizontal flip swaps (``flip_pairs``: LIP's left / right
limbs). Everything else, reading, checking and SSSegmentation's train / test pipelines (trainers/data/transforms.py),
is here. A missing root or folder is one error line naming data.root and the layout the dataset expects.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers.data.transforms import (
    IGNORE_INDEX,
    hw,
    train_transform,
    val_original_size,
    val_transform,
)

__all__ = ["FolderSegmentation", "find_top", "relative_path", "read_ids", "require_dir", "lookup_table"]


def relative_path(root: Path, path: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def read_ids(path: Path) -> list[str]:
    """Image ids of a list file: one per line, the stem of the line's first token."""
    ids = []
    for line in path.read_text().splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    return ids


def find_top(root, layout: str, names: tuple[str, ...], marks: tuple[str, ...]) -> Path:
    """The dataset's top folder: root/<name> for the first of `names` there, else root itself when it holds one of
    `marks` (its top-level folders), else the one-line data.root error naming `layout`."""
    if root is None:
        raise FileNotFoundError(f"data.root: not set (expected a folder holding {layout})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} does not exist or is not a folder (expected {layout})")
    for name in names:
        if (root / name).is_dir():
            return root / name
    if any((root / m).exists() for m in marks):
        return root
    raise FileNotFoundError(f"data.root: {root} has no {' or '.join(names or marks)} folder (expected {layout})")


def require_dir(root: Path, folder: Path, layout: str) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root: {root} has no {relative_path(root, folder)}/ (expected {layout})")
    return folder


def lookup_table(mapping: dict[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    """A 256-entry uint8 table: stored value -> train id (values not in `mapping` -> `default`)."""
    lut = np.full(256, default, dtype=np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


class FolderSegmentation(torch.utils.data.Dataset):
    """Image + mask files through SSSegmentation's pipeline.

    ``split="train"``: the random train transform at ``crop_size`` (h, w) (None: ``image_size`` x ``image_size``).
    Otherwise the test pipeline: with ``val_resize`` the resized image and the mask as stored (scored at the
    original size), without it the image fitted into the crop, padded, with its resized mask. ``size``: the first
    ``size`` samples (None: all). Files are read in ``__getitem__``.
    """

    classes: tuple[str, ...] = ()
    num_classes = 0
    ignore_index = IGNORE_INDEX
    splits: tuple[str, ...] = ("train", "val")
    eval_only = False                            # an evaluation set (Dark Zurich, Nighttime Driving): no train split
    data_name = ""                               # its data.name, for error messages
    label_map: np.ndarray | None = None          # stored value -> train id (None: stored as train ids)
    flip_pairs: tuple[tuple[int, int], ...] = ()
    layout = ""                                  # the expected layout, for error messages

    def __init__(self, split: str, image_size: int = 512, size: int | None = None,
                 resize: tuple[int, int] | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float | None = None, photometric: bool = False,
                 val_resize: tuple[int, int] | None = None, crop_size: tuple[int, int] | None = None,
                 keep_ratio: bool = True, rotate: tuple[float, int] | None = None):
        if split not in self.splits and self.eval_only:
            raise ValueError(f"data.name: {self.data_name} is an evaluation set with only a "
                             f"{'/'.join(self.splits)} split, no {split!r}: train on another dataset and name this one "
                             "under eval.datasets")
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, self.splits))}")
        if size is not None and int(size) < 0:
            raise ValueError(f"size must be >= 0 or None, got {size}")
        self.split = split
        self.image_size = int(image_size)
        self.crop = hw(crop_size) if crop_size is not None else (self.image_size, self.image_size)
        self.resize, self.scale_range, self.val_resize = resize, tuple(scale_range), val_resize
        self.cat_max_ratio, self.photometric = cat_max_ratio, bool(photometric)
        self.keep_ratio, self.rotate = bool(keep_ratio), rotate
        self.size = None if size is None else int(size)
        self.samples: list[tuple[Path, Path]] = []   # set by the subclass through first()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.num_classes = len(cls.classes)     # a class attribute, as the registry's callers read it

    def first(self, items: list) -> list:
        """The first `size` of a split's items (all of them when size is None)."""
        return items if self.size is None else items[: self.size]

    def __len__(self) -> int:
        return len(self.samples)

    def paths(self, i: int) -> tuple[Path, Path]:
        """(image, mask) paths of the i-th sample; a missing file is a data.root error."""
        image_path, mask_path = self.samples[i]
        for p in (image_path, mask_path):
            if not p.is_file():
                raise FileNotFoundError(f"data.root: {self.root} has no {relative_path(self.root, p)} "
                                        f"(expected {self.layout})")
        return image_path, mask_path

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """The i-th image (PIL RGB) and mask (uint8 (H, W) train ids, IGNORE_INDEX where unlabelled)."""
        image_path, mask_path = self.paths(i)
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        with Image.open(mask_path) as m:
            mask = np.array(m)  # mode "P" or "L": the class indices; no RGB conversion
        if mask.ndim != 2:
            raise ValueError(f"{mask_path}: expected a single-channel or palette PNG of class indices, "
                             f"got an image of shape {mask.shape}")
        if mask.shape != (image.size[1], image.size[0]):
            raise ValueError(f"{mask_path}: mask size {mask.shape[::-1]} differs from the image size {image.size}")
        mask = mask.astype(np.uint8)
        table = self.table_for(mask_path)
        return image, (table[mask] if table is not None else mask)

    def table_for(self, mask_path: Path) -> np.ndarray | None:
        """The stored value -> train id table of this mask file (None: stored as train ids)."""
        return self.label_map

    def __getitem__(self, i):
        image, mask = self.load(i)
        if self.split == "train":
            return train_transform(image, mask, self.crop, self.scale_range, self.resize, self.cat_max_ratio,
                                   self.photometric, self.keep_ratio, self.rotate, self.flip_pairs)
        if self.val_resize is not None:
            return val_original_size(image, mask, self.val_resize, self.keep_ratio)
        return val_transform(image, mask, self.crop)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, size={len(self)}, "
                f"crop={self.crop})")
