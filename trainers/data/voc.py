"""PASCAL VOC 2012 semantic segmentation, optionally with the SBD "aug" training set.

Layout on disk (``data.root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself or
``VOCdevkit/VOC2012``)::

    VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg                  RGB images (every split)
        SegmentationClass/<id>.png           palette ("P") PNGs; the pixel values are class indices
                                             0..20 and 255 (object outlines / "difficult": ignored)
        SegmentationClassAug/<id>.png        the SBD "aug" masks as distributed by DeepLab / mmseg:
                                             single-channel PNGs of class indices
        ImageSets/Segmentation/train.txt     1,464 ids (plain VOC train)
        ImageSets/Segmentation/val.txt       1,449 ids (the val split of both datasets)
        ImageSets/Segmentation/train_aug.txt 10,582 ids (VOC train + SBD, minus VOC val); mmseg
                                             calls it aug.txt, both names are accepted

A list line is either an id (``2007_000032``) or DeepLab's ``/JPEGImages/<id>.jpg
/SegmentationClassAug/<id>.png``; the id is the stem of the first token. Masks are read with PIL
without any conversion, so a palette PNG yields its indices, not colours.

Transforms (trainers/data/transforms.py, shared with the other folder datasets through
trainers/data/folder.py) follow the SSSegmentation / mmseg VOC aug pipeline at a crop size S = ``image_size``
(SSSegmentation configs/_base_/datasets/vocaug_512x512.py):

* train: resize by a random ratio in ``scale_range`` ([0.5, 2.0]): with ``resize`` = (2048, 512) as
  SSSegmentation's Resize(keep_ratio=True) (the image fits (2048 r, 512 r), on VOC its shorter side
  becomes 512 r), without it the shorter side becomes S r (bilinear image, nearest mask); random crop
  of at most S x S, retried up to 10 times while one class covers ``cat_max_ratio`` (0.75) or more of
  its labelled pixels or it holds a single class; SSSegmentation's PhotoMetricDistortion
  (``photometric``); normalise with the ImageNet mean/std; pad bottom/right to S x S with 0 (the mean
  colour after normalisation) and 255 in the mask; horizontal flip with probability 0.5. All draws use
  the torch global RNG, so a run is reproducible from ``torch.manual_seed`` and resumable from
  ``torch.get_rng_state()``.
* val, ``val_resize`` = (2048, 512): SSSegmentation's test Resize(keep_ratio=True), normalise, no
  padding; the mask stays as stored (original size), to be scored against logits resampled to it.
* val, no ``val_resize``: resize so the longer side equals S (aspect ratio kept), normalise, pad
  bottom/right to S x S (image 0, mask 255), so padded pixels never count in the metrics.

``__getitem__`` returns ``(image float32 (3, S, S), mask int64 (S, S))`` (with ``val_resize``: the
resized image (3, h, w) and the original mask (H, W)); files are read lazily.
"""

from __future__ import annotations

from pathlib import Path

from trainers.data.folder import FolderSegmentation, read_ids, relative_path
from trainers.data.transforms import (  # noqa: F401  (re-exported: the VOC pipeline's names, as before the split)
    IGNORE_INDEX,
    MEAN,
    STD,
    apply_train_transform,
    crop_origin,
    keep_ratio_size,
    normalize,
    photometric_distortion,
    rescaled_size,
    resize_pair,
    to_tensors,
    train_transform,
    val_original_size,
    val_transform,
)

__all__ = [
    "CLASSES",
    "PALETTE",
    "IGNORE_INDEX",
    "MEAN",
    "STD",
    "voc_palette",
    "find_voc2012",
    "rescaled_size",
    "train_transform",
    "apply_train_transform",
    "val_transform",
    "val_original_size",
    "keep_ratio_size",
    "crop_origin",
    "photometric_distortion",
    "relative_path",
    "resize_pair",
    "to_tensors",
    "VOCSegmentation",
]

CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

LAYOUT = "the PASCAL VOC 2012 layout VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}"
AUG_LAYOUT = ("the VOC 2012 + SBD aug layout, "
              "VOCdevkit/VOC2012/{SegmentationClassAug,ImageSets/Segmentation/train_aug.txt}")


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The standard VOC colour map: the bits of the label are spread over R, G, B, high bit first."""
    colours = []
    for label in range(n):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


PALETTE: tuple[tuple[int, int, int], ...] = voc_palette(len(CLASSES))


def find_voc2012(root) -> Path:
    """The ``VOC2012`` folder under ``root`` (the folder holding VOCdevkit, VOCdevkit, or VOC2012)."""
    if root is None:
        raise FileNotFoundError(f"data.root: not set (expected a folder holding {LAYOUT})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} does not exist or is not a folder (expected {LAYOUT})")
    for voc in (root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if voc.is_dir():
            return voc
    if (root / "ImageSets").is_dir() or (root / "JPEGImages").is_dir():
        return root  # root is the VOC2012 folder itself
    raise FileNotFoundError(f"data.root: {root} has no VOCdevkit/VOC2012 folder (expected {LAYOUT})")


class VOCSegmentation(FolderSegmentation):
    """PASCAL VOC 2012 segmentation; ``aug=True`` trains on the SBD-augmented train_aug list.

    ``split="train"``: train_aug.txt (or aug.txt) with SegmentationClassAug masks if ``aug``, else
    train.txt with SegmentationClass masks, random train transform. ``split="val"``: val.txt with
    SegmentationClass masks, deterministic val transform. ``size``: the first ``size`` ids of the
    list (None: all). Images and masks are read from disk in ``__getitem__``.
    """

    classes = CLASSES
    palette = PALETTE

    def __init__(self, root, split: str, image_size: int = 512, size: int | None = None, aug: bool = False,
                 **pipeline):
        super().__init__(split, image_size=image_size, size=size, **pipeline)
        self.aug = bool(aug)
        self.voc = find_voc2012(root)
        self.root = Path(root).expanduser()
        seg_sets = self.voc / "ImageSets" / "Segmentation"
        if split == "train" and self.aug:
            lists = [seg_sets / "train_aug.txt", seg_sets / "aug.txt"]
            self.mask_dir = self.voc / "SegmentationClassAug"
            self.layout = AUG_LAYOUT
        else:
            lists = [seg_sets / f"{split}.txt"]
            self.mask_dir = self.voc / "SegmentationClass"
            self.layout = LAYOUT
        self.expected = self.layout
        self.image_dir = self.voc / "JPEGImages"
        list_file = next((p for p in lists if p.is_file()), None)
        if list_file is None:
            also = "".join(f" or {p.name}" for p in lists[1:])
            raise FileNotFoundError(f"data.root: {self.root} has no {relative_path(self.root, lists[0])}{also} "
                                    f"(expected {self.expected})")
        for d in (self.image_dir, self.mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f"data.root: {self.root} has no {relative_path(self.root, d)}/ (expected {self.expected})")
        self.list_file = list_file
        self.ids = self.first(read_ids(list_file))
        self.samples = [(self.image_dir / f"{i}.jpg", self.mask_dir / f"{i}.png") for i in self.ids]

    def paths(self, i: int) -> tuple[Path, Path]:
        for p in self.samples[i]:
            if not p.is_file():
                raise FileNotFoundError(
                    f"data.root: {self.root} has no {relative_path(self.root, p)} "
                    f"(listed in {relative_path(self.root, self.list_file)}; expected {self.expected})"
                )
        return self.samples[i]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, aug={self.aug}, "
            f"size={len(self)}, image_size={self.image_size})"
        )
