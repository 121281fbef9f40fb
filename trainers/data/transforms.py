"""SSSegmentation's train / test pipelines for the folder datasets (VOC, ADE20K, Cityscapes, LIP, CIHP, ...).

The image is a PIL RGB image, the mask a uint8 (H, W) array of train ids (255 ignored). Sizes are (h, w) where a
crop is meant and (width, height) where PIL is. SSSegmentation's configs (configs/_base_/datasets/*.py):

* train: Resize(output_size, keep_ratio, scale_range) -> RandomCrop(crop_size, one_category_max_ratio 0.75) ->
  RandomFlip(0.5[, fixed_seg_target_pairs]) -> [RandomRotation(prob, angle_upper): LIP / CIHP] ->
  PhotoMetricDistortion -> Normalize(ImageNet) -> Padding(crop_size).
* test: Resize(output_size, keep_ratio) -> Normalize; the mask stays as stored, scored at the original size.

Ours pads bottom/right where SSSegmentation centres the crop in the pad (and swaps the pad's orientation for
portrait crops); all draws use the torch global RNG, so a run is reproducible from ``torch.manual_seed`` and
resumable from ``torch.get_rng_state()``.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255

# ImageNet statistics of image / 255 (SSSegmentation's Normalize mean [123.675, 116.28, 103.53], std [58.395, ...]).
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def hw(size) -> tuple[int, int]:
    """An int S (a square S x S) or an (h, w) pair -> (h, w)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------


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


def fixed_size(w: int, h: int, target: tuple[int, int], ratio: float | None = None) -> tuple[int, int]:
    """(width, height) after SSSegmentation's Resize(output_size=target, keep_ratio=False): the (scaled, truncated)
    target itself, its longer side along the image's longer side (LIP / CIHP: (520, 520) x U(0.75, 1.25))."""
    if ratio is not None:
        target = (int(target[0] * ratio), int(target[1] * ratio))
    return (min(target), max(target)) if h > w else (max(target), min(target))


def resized_size(w: int, h: int, target: tuple[int, int], ratio: float | None = None,
                 keep_ratio: bool = True) -> tuple[int, int]:
    return (keep_ratio_size if keep_ratio else fixed_size)(w, h, target, ratio)


# --------------------------------------------------------------------------------------------
# pixels
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


def to_tensors(image: np.ndarray, mask: np.ndarray, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise the (H, W, 3) uint8 image; pad image (0) and mask (IGNORE_INDEX) bottom/right to size (S or (h, w))."""
    out_h, out_w = hw(size)
    h, w = mask.shape
    out_img = torch.zeros(3, out_h, out_w, dtype=torch.float32)
    out_mask = torch.full((out_h, out_w), IGNORE_INDEX, dtype=torch.int64)
    out_img[:, :h, :w] = normalize(image)
    out_mask[:h, :w] = torch.from_numpy(mask.astype(np.int64))
    return out_img, out_mask


def crop_origin(mask: np.ndarray, size, cat_max_ratio: float | None = None,
                ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """(top, left) of a random crop of at most size (S or (h, w)). With cat_max_ratio, SSSegmentation's RandomCrop
    one_category_max_ratio (mmseg cat_max_ratio): up to 10 draws, keeping the first whose labelled pixels hold
    more than one class with none at cat_max_ratio or more; after 10 failures the last draw (mmseg; SSSegmentation
    returns it too unless the crop is all ignore)."""
    ch, cw = hw(size)
    h, w = mask.shape
    for _ in range(10 if cat_max_ratio is not None else 1):
        top = int(torch.randint(0, max(h - ch, 0) + 1, ()).item())
        left = int(torch.randint(0, max(w - cw, 0) + 1, ()).item())
        if cat_max_ratio is None:
            break
        counts = np.bincount(mask[top:top + ch, left:left + cw].ravel(), minlength=256)
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


def rotate_pair(image: np.ndarray, mask: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """SSSegmentation's RandomRotation warp: rotate both by `angle` degrees counter-clockwise about the centre at
    the same size, bicubic image filled with black, nearest mask filled with IGNORE_INDEX."""
    img = Image.fromarray(image).rotate(angle, resample=Image.BICUBIC, fillcolor=(0, 0, 0))
    m = Image.fromarray(mask).rotate(angle, resample=Image.NEAREST, fillcolor=IGNORE_INDEX)
    return np.asarray(img), np.asarray(m)


def swap_table(pairs) -> torch.Tensor:
    """A 256-entry lookup swapping each (a, b) label pair (LIP's left / right arm, leg and shoe after a flip)."""
    lut = torch.arange(256)
    for a, b in pairs:
        lut[a], lut[b] = b, a
    return lut


def _finish(img: np.ndarray, mask: np.ndarray, size, flip: bool, flip_pairs=()) -> tuple[torch.Tensor, torch.Tensor]:
    img_t, mask_t = to_tensors(img, mask, size)
    if flip:
        img_t, mask_t = img_t.flip(-1), mask_t.flip(-1)
        if flip_pairs:   # SSSegmentation RandomFlip(fixed_seg_target_pairs): a left arm seen flipped is a right arm
            mask_t = swap_table(flip_pairs)[mask_t]
    return img_t, mask_t


# --------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------


def apply_train_transform(image: Image.Image, mask: np.ndarray, size, ratio: float,
                          top: int, left: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training transform with its random draws given: rescale (shorter side -> min(size) * ratio),
    crop at most size (S or (h, w)) at (top, left) of the rescaled image, normalise, pad, flip."""
    ch, cw = hw(size)
    img, mask = resize_pair(image, mask, *rescaled_size(*image.size, min(ch, cw), ratio))
    img, mask = img[top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]
    return _finish(img, mask, (ch, cw), flip)


def train_transform(image: Image.Image, mask: np.ndarray, size,
                    ratio_range: tuple[float, float] = (0.5, 2.0), resize: tuple[int, int] | None = None,
                    cat_max_ratio: float | None = None, photometric: bool = False, keep_ratio: bool = True,
                    rotate: tuple[float, int] | None = None, flip_pairs=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale (to `resize` as SSSegmentation's Resize(keep_ratio), or the shorter side to min(size) * ratio),
    random crop of at most size (S or (h, w); crop_origin with cat_max_ratio), random horizontal flip (swapping
    `flip_pairs`), random rotation (`rotate` = (prob, angle_upper)), photometric distortion, normalise, pad. Draws
    from the torch global RNG in that order (ratio, crop, flip, rotation, photometric)."""
    ch, cw = hw(size)
    lo, hi = ratio_range
    ratio = lo + (hi - lo) * torch.rand(()).item()
    if resize:
        w, h = resized_size(*image.size, resize, ratio, keep_ratio)
    else:
        w, h = rescaled_size(*image.size, min(ch, cw), ratio)
    img, mask = resize_pair(image, mask, w, h)
    top, left = crop_origin(mask, (ch, cw), cat_max_ratio)
    flip = bool(torch.rand(()).item() < 0.5)
    img, mask = img[top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]
    if rotate is not None:
        prob, angle_upper = rotate
        if torch.rand(()).item() < prob:
            angle = int(torch.randint(-angle_upper, angle_upper, ()).item())
            # SSSegmentation rotates the flipped crop; the flip comes last here, and flip o rotate(a) = rotate(-a) o flip
            img, mask = rotate_pair(img, mask, -angle if flip else angle)
    if photometric:
        img = photometric_distortion(img)
    return _finish(img, mask, (ch, cw), flip, flip_pairs)


def val_original_size(image: Image.Image, mask: np.ndarray, resize: tuple[int, int], keep_ratio: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """SSSegmentation's test pipeline: Resize(resize, keep_ratio) and normalise the image, no padding; the mask as
    stored (H, W) int64, for scoring at the original resolution."""
    w, h = resized_size(*image.size, resize, None, keep_ratio)
    img = np.asarray(image.resize((w, h), Image.BILINEAR)) if (w, h) != image.size else np.asarray(image)
    return normalize(img), torch.from_numpy(mask.astype(np.int64))


def val_transform(image: Image.Image, mask: np.ndarray, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to fit size (S or (h, w); aspect kept, so with S the longer side becomes S), normalise, pad to size."""
    ch, cw = hw(size)
    w, h = image.size
    if w * ch >= h * cw:       # the width is the limit
        nw, nh = cw, max(1, int(h * cw / w + 0.5))
    else:
        nw, nh = max(1, int(w * ch / h + 0.5)), ch
    return to_tensors(*resize_pair(image, mask, nw, nh), (ch, cw))
