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

Transforms follow the SSSegmentation / mmseg VOC aug pipeline at a crop size S = ``image_size``
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

import numpy as np
import torch
from PIL import Image

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

IGNORE_INDEX = 255

# ImageNet statistics of image / 255 (what pretrained encoders expect).
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

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


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# transforms (image: PIL RGB; mask: uint8 (H, W) numpy array of class indices)
# --------------------------------------------------------------------------------------------


def resize_pair(image: Image.Image, mask: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear for the image, nearest for the mask; a no-op at the same size. Returns uint8 arrays."""
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BILINEAR)
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return np.asarray(image), mask


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, (x / 255 - MEAN) / STD."""
    arr = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (arr - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def to_tensors(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise the (H, W, 3) uint8 image; pad image (0) and mask (IGNORE_INDEX) bottom/right to size x size."""
    h, w = mask.shape
    out_img = torch.zeros(3, size, size, dtype=torch.float32)
    out_mask = torch.full((size, size), IGNORE_INDEX, dtype=torch.int64)
    out_img[:, :h, :w] = normalize(image)
    out_mask[:h, :w] = torch.from_numpy(mask.astype(np.int64))
    return out_img, out_mask


def rescaled_size(w: int, h: int, size: int, ratio: float) -> tuple[int, int]:
    """(width, height) after the train rescale: the shorter side becomes size * ratio."""
    scale = size / min(w, h) * ratio
    return max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))


def keep_ratio_size(w: int, h: int, target: tuple[int, int], ratio: float | None = None) -> tuple[int, int]:
    """(width, height) after SSSegmentation's Resize(output_size=target, keep_ratio=True[, scale_range]): the
    target is first scaled by the random ratio and truncated (its int(output_size * rand_scale)), then the image
    by min(long target / long side, short target / short side), rounded half up."""
    if ratio is not None:
        target = (int(target[0] * ratio), int(target[1] * ratio))
    scale = min(max(target) / max(w, h), min(target) / min(w, h))
    return int(w * scale + 0.5), int(h * scale + 0.5)


def crop_origin(mask: np.ndarray, size: int, cat_max_ratio: float | None = None,
                ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """(top, left) of a random crop of at most size x size. With cat_max_ratio, SSSegmentation's RandomCrop
    one_category_max_ratio (mmseg cat_max_ratio): up to 10 draws, keeping the first whose labelled pixels hold
    more than one class with none at cat_max_ratio or more; after 10 failures the last draw (mmseg; SSSegmentation
    returns it too unless the crop is all ignore)."""
    h, w = mask.shape
    for _ in range(10 if cat_max_ratio is not None else 1):
        top = int(torch.randint(0, max(h - size, 0) + 1, ()).item())
        left = int(torch.randint(0, max(w - size, 0) + 1, ()).item())
        if cat_max_ratio is None:
            break
        counts = np.bincount(mask[top:top + size, left:left + size].ravel(), minlength=256)
        counts[ignore_index] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


def _coin() -> bool:
    return bool(torch.randint(0, 2, ()).item())


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """x * alpha + beta, clipped to [0, 255] and truncated to uint8 (SSSegmentation's convert)."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, brightness_delta: float = 32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """SSSegmentation's PhotoMetricDistortion (defaults as in its VOC config) on an (H, W, 3) uint8 RGB image:
    each step with probability 1/2: brightness +U(-32, 32); contrast xU(0.5, 1.5) before or after (a coin)
    saturation xU(0.5, 1.5) and hue +randint(-18, 18) of 180. HSV by PIL (hue in 256ths instead of OpenCV's
    180ths: the shift is rescaled). Draws from the torch global RNG."""
    img = image
    if _coin():
        img = _convert(img, beta=_uniform(-brightness_delta, brightness_delta))
    contrast_last = not _coin()            # SSSegmentation: mode 1 = contrast first, mode 0 = contrast last

    def contrast(x):
        return _convert(x, alpha=_uniform(*contrast_range)) if _coin() else x

    if not contrast_last:
        img = contrast(img)
    if _coin():
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        hsv[..., 1] = _convert(hsv[..., 1], alpha=_uniform(*saturation_range))
        img = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if _coin():
        shift = int(torch.randint(-hue_delta, hue_delta, ()).item())      # OpenCV hue units (0-179)
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(shift * 256 / 180)) % 256
        img = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if contrast_last:
        img = contrast(img)
    return img


def _finish(img: np.ndarray, mask: np.ndarray, size: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    img_t, mask_t = to_tensors(img, mask, size)
    if flip:
        img_t, mask_t = img_t.flip(-1), mask_t.flip(-1)
    return img_t, mask_t


def apply_train_transform(image: Image.Image, mask: np.ndarray, size: int, ratio: float,
                          top: int, left: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training transform with its random draws given: rescale (shorter side -> size * ratio),
    crop at most size x size at (top, left) of the rescaled image, normalise, pad, flip."""
    img, mask = resize_pair(image, mask, *rescaled_size(*image.size, size, ratio))
    img, mask = img[top:top + size, left:left + size], mask[top:top + size, left:left + size]
    return _finish(img, mask, size, flip)


def train_transform(image: Image.Image, mask: np.ndarray, size: int,
                    ratio_range: tuple[float, float] = (0.5, 2.0), resize: tuple[int, int] | None = None,
                    cat_max_ratio: float | None = None, photometric: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale (keep_ratio_size to `resize`, or the shorter side to size * ratio), random crop
    (crop_origin with cat_max_ratio), photometric distortion, normalise, pad, random horizontal flip; draws
    from the torch global RNG in that order (ratio, crop, flip, photometric)."""
    lo, hi = ratio_range
    ratio = lo + (hi - lo) * torch.rand(()).item()
    w, h = keep_ratio_size(*image.size, resize, ratio) if resize else rescaled_size(*image.size, size, ratio)
    img, mask = resize_pair(image, mask, w, h)
    top, left = crop_origin(mask, size, cat_max_ratio)
    flip = bool(torch.rand(()).item() < 0.5)
    img, mask = img[top:top + size, left:left + size], mask[top:top + size, left:left + size]
    if photometric:
        img = photometric_distortion(img)
    return _finish(img, mask, size, flip)


def val_original_size(image: Image.Image, mask: np.ndarray, resize: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """SSSegmentation's test pipeline: Resize(resize, keep_ratio=True) and normalise the image, no padding; the
    mask as stored (H, W) int64, for scoring at the original resolution."""
    w, h = keep_ratio_size(*image.size, resize)
    img = np.asarray(image.resize((w, h), Image.BILINEAR)) if (w, h) != image.size else np.asarray(image)
    return normalize(img), torch.from_numpy(mask.astype(np.int64))


def val_transform(image: Image.Image, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize so the longer side equals size (aspect kept), normalise, pad to size x size."""
    w, h = image.size
    if w >= h:
        nw, nh = size, max(1, int(h * size / w + 0.5))
    else:
        nw, nh = max(1, int(w * size / h + 0.5)), size
    return to_tensors(*resize_pair(image, mask, nw, nh), size)


# --------------------------------------------------------------------------------------------
# torch dataset
# --------------------------------------------------------------------------------------------


class VOCSegmentation(torch.utils.data.Dataset):
    """PASCAL VOC 2012 segmentation; ``aug=True`` trains on the SBD-augmented train_aug list.

    ``split="train"``: train_aug.txt (or aug.txt) with SegmentationClassAug masks if ``aug``, else
    train.txt with SegmentationClass masks, random train transform. ``split="val"``: val.txt with
    SegmentationClass masks, deterministic val transform. ``size``: the first ``size`` ids of the
    list (None: all). Images and masks are read from disk in ``__getitem__``.
    """

    classes = CLASSES
    num_classes = len(CLASSES)
    ignore_index = IGNORE_INDEX
    palette = PALETTE
    splits = ("train", "val")

    def __init__(self, root, split: str, image_size: int = 512, size: int | None = None, aug: bool = False,
                 resize: tuple[int, int] | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float | None = None, photometric: bool = False,
                 val_resize: tuple[int, int] | None = None):
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, self.splits))}")
        if size is not None and int(size) < 0:
            raise ValueError(f"size must be >= 0 or None, got {size}")
        self.split = split
        self.aug = bool(aug)
        self.image_size = int(image_size)
        self.resize, self.scale_range, self.val_resize = resize, tuple(scale_range), val_resize
        self.cat_max_ratio, self.photometric = cat_max_ratio, bool(photometric)
        self.voc = find_voc2012(root)
        self.root = Path(root).expanduser()
        seg_sets = self.voc / "ImageSets" / "Segmentation"
        if split == "train" and self.aug:
            lists = [seg_sets / "train_aug.txt", seg_sets / "aug.txt"]
            self.mask_dir = self.voc / "SegmentationClassAug"
            self.expected = AUG_LAYOUT
        else:
            lists = [seg_sets / f"{split}.txt"]
            self.mask_dir = self.voc / "SegmentationClass"
            self.expected = LAYOUT
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
        ids = read_ids(list_file)
        self.ids = ids if size is None else ids[: int(size)]

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, folder: Path, name: str) -> Path:
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(
                f"data.root: {self.root} has no {relative_path(self.root, p)} "
                f"(listed in {relative_path(self.root, self.list_file)}; expected {self.expected})"
            )
        return p

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """The i-th image (PIL RGB) and mask (uint8 (H, W) class indices) as stored on disk."""
        sample_id = self.ids[i]
        image_path = self._path(self.image_dir, f"{sample_id}.jpg")
        mask_path = self._path(self.mask_dir, f"{sample_id}.png")
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        with Image.open(mask_path) as m:
            mask = np.array(m)  # mode "P" or "L": the class indices; no RGB conversion
        if mask.ndim != 2:
            raise ValueError(f"{mask_path}: expected a single-channel or palette PNG of class indices, "
                             f"got an image of shape {mask.shape}")
        if mask.shape != (image.size[1], image.size[0]):
            raise ValueError(f"{mask_path}: mask size {mask.shape[::-1]} differs from the image size {image.size}")
        return image, mask.astype(np.uint8)

    def __getitem__(self, i):
        image, mask = self.load(i)
        if self.split == "train":
            return train_transform(image, mask, self.image_size, self.scale_range, self.resize,
                                   self.cat_max_ratio, self.photometric)
        if self.val_resize is not None:
            return val_original_size(image, mask, self.val_resize)
        return val_transform(image, mask, self.image_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, aug={self.aug}, "
            f"size={len(self)}, image_size={self.image_size})"
        )
