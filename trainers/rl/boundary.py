"""r^Boundary of paper 002 (Eq. 15): class-aware boundary F1 with a tolerance, aware of ignore bands.

Definition (per image; Csurka et al. 2013's class-wise BF score, DAVIS `f_measure`'s matching rule):
  * For every class c the target splits the image into certain-c pixels C (target == c), certain-not-c pixels N
    (another valid label) and unknown pixels U (ignore_index). The *band* of c, Z_c, is the set of ignore pixels
    that lie, through ignore pixels, within `band` steps of both C and N: an ignore band that separates c from
    something else (VOC draws a ~5 px 255 band around every object, so its true outline lies somewhere inside).
  * Target boundary of c, TB_c: valid pixels next to a valid pixel on the other side of c (the 8-neighbour
    morphological gradient of the binary map, both sides), plus the valid pixels that touch Z_c (the band's rims:
    the outline runs through the band between them).
  * Predicted boundary of c, PB_c: the same gradient of (prediction == c), on the pixels that can be judged
    (valid pixels and the bands of every class). The prediction on other ignore pixels never counts.
  * Precision P_c = |PB_c matched| / |PB_c|: a predicted edge matches when it lies within `tolerance` of TB_c or
    anywhere inside Z_c. Recall R_c = |TB_c matched| / |TB_c|: a target boundary pixel matches when a predicted edge
    of c lies within `tolerance` of it or, for a rim pixel, anywhere inside (or within `tolerance` of) the band it
    touches (reached through Z_c in at most `band` steps). So an outline inside a band is matched by a predicted c-edge anywhere in that
    band, and by nothing else: an empty prediction (no edge), an edge of another class, or a band alone score 0.
  * F_c = 2 P R / (P + R) (0 when P + R = 0; 0 when only one of PB_c, TB_c is empty). The image's reward is the mean
    of F_c over the classes with a boundary in either map; an image where no class has one scores 1 (DAVIS: both
    empty).
With no ignore pixel this is the plain class-wise boundary F1 with a Chebyshev tolerance.

`tolerance`: pixels when >= 1, else a fraction of the image diagonal (DAVIS uses 0.008); rounded up to whole
pixels (a (2t + 1)^2 square). `band`: how wide an ignore band (pixels) can be and still carry an outline; 0 turns
the band rule off (ignore pixels then only drop out).
All work is batched over images, with the classes as bit sets (one bit a class, packed into the smallest integer
type that holds them; several int64 words past 63 classes): a per-class map costs what one label map costs, and
there is no Python loop over images or classes.
"""
from __future__ import annotations

import math
import sys

import torch

# The 4 neighbour offsets (dy, dx) of the 3x3 neighbourhood up to symmetry: right, down, down-right, down-left.
_PAIRS = ((0, 1), (1, 0), (1, 1), (1, -1))
# (dtype, usable bits) of one class-set word; int64 keeps its sign bit clear.
_WORDS = ((torch.uint8, 8), (torch.int16, 15), (torch.int32, 31), (torch.int64, 63))


def tolerance_pixels(tolerance: float, height: int, width: int) -> int:
    """DAVIS: `tolerance` pixels when >= 1, else that fraction of the image diagonal; at least 1 pixel."""
    if tolerance >= 1:
        return int(math.ceil(tolerance))
    return max(1, int(math.ceil(tolerance * math.hypot(height, width))))


assert sys.byteorder == "little", "ClassSets.counts reads class bits as little-endian bytes"


class ClassSets:
    """Sets of classes per pixel as bit masks (B, words, H, W): class c is bit c % per_word of word c // per_word."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.dtype, self.per_word = next(((dt, n) for dt, n in _WORDS if num_classes <= n), _WORDS[-1])
        self.words = -(-num_classes // self.per_word)
        c = torch.arange(num_classes, device=device)
        self.word_of, self.bit_of = c // self.per_word, c % self.per_word
        full = torch.zeros(self.words, dtype=torch.int64, device=device).index_add_(0, self.word_of, 1 << self.bit_of)
        self.full = full.to(self.dtype).view(1, -1, 1, 1)                # every class
        # for counts(): bytes per pixel, each class's bit among them (little-endian words), the bits of 0..255
        word_bytes = torch.empty((), dtype=self.dtype).element_size()
        self.bytes = self.words * word_bytes
        self.position = self.word_of * (8 * word_bytes) + self.bit_of
        self.byte_bits = ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).double()

    def of(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B, H, W) in [0, K) -> the singleton sets {label}, (B, words, H, W)."""
        bit = (1 << (labels if self.words == 1 else labels % self.per_word)).to(self.dtype)
        if self.words == 1:
            return bit[:, None]
        out = torch.zeros((labels.shape[0], self.words, *labels.shape[1:]), dtype=self.dtype, device=labels.device)
        return out.scatter_(1, (labels // self.per_word)[:, None], bit[:, None])

    def counts(self, sets: torch.Tensor) -> torch.Tensor:
        """(B, words, H, W) -> how many pixels hold each class, (B, K) int64. Read as bytes: one 256-bin histogram
        per (image, byte) and a (256, 8) table of the bits of each byte value, instead of a (B, K, H, W) unpacking."""
        b = sets.shape[0]
        as_bytes = sets.permute(0, 2, 3, 1).reshape(b, -1).view(torch.uint8).view(b, -1, self.bytes)
        n_bins = b * self.bytes * 256
        bins = (torch.arange(b * self.bytes, device=sets.device).view(b, 1, -1) * 256 + as_bytes.long()).flatten()
        hist = torch.bincount(bins, minlength=n_bins).view(b, self.bytes, 256).double()
        per_bit = (hist @ self.byte_bits).flatten(1)                      # (B, bytes * 8): bit j of the pixel's bytes
        return per_bit[:, self.position].round().long()

def where(mask: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """The sets where mask (B, H, W) holds, the empty set elsewhere."""
    return sets * mask[:, None].to(sets.dtype)


def dilate(sets: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Chebyshev dilation by `steps` pixels of (..., H, W) bool maps or class sets (union over a (2 steps + 1)^2
    square), as row then column passes of width 3 (outside the image: nothing)."""
    out = sets
    for _ in range(steps):
        rows = out.clone()
        rows[..., 1:] |= out[..., :-1]
        rows[..., :-1] |= out[..., 1:]
        out = rows.clone()
        out[..., 1:, :] |= rows[..., :-1, :]
        out[..., :-1, :] |= rows[..., 1:, :]
    return out


def geodesic_reach(seed: torch.Tensor, within: torch.Tensor, steps: int) -> torch.Tensor:
    """Class sets of `within` reached from `seed` by at most `steps` 8-connected moves inside `within` (per class)."""
    reach = seed & within
    for _ in range(steps):
        reach = dilate(reach) & within
    return reach


def gradient(labels: torch.Tensor, domain: torch.Tensor | None, sets: ClassSets) -> torch.Tensor:
    """Class-wise morphological gradient of a label map (B, H, W) restricted to `domain` (B, H, W) bool, None for
    the whole image: for each pixel, the classes c for which it has an 8-neighbour in the domain on the other side
    of c. A neighbouring pair with labels a != b puts a and b into both pixels' sets (the gradient of each binary
    map c, both sides)."""
    h, w = labels.shape[-2:]
    single = sets.of(labels)
    labels = labels.to(torch.uint8 if sets.num_classes <= 256 else torch.int32)    # compares on fewer bytes
    out = torch.zeros_like(single)
    for dy, dx in _PAIRS:
        x0, x1 = max(0, -dx), w - max(0, dx)          # columns of the first pixel of each pair
        first = (..., slice(0, h - dy), slice(x0, x1))
        second = (..., slice(dy, h), slice(x0 + dx, x1 + dx))
        differ = labels[first] != labels[second]
        if domain is not None:
            differ &= domain[first] & domain[second]
        pair = where(differ, single[first] | single[second])
        out[first] |= pair
        out[second] |= pair
    return out


@torch.no_grad()
def boundary_f1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, num_classes: int,
                tolerance: float = 1.0, band: int = 8) -> torch.Tensor:
    """pred (B, H, W) class ids in [0, K), target (B, H, W) class ids in [0, K) (any such value where not valid),
    valid (B, H, W) bool -> r^Boundary (B,) float32 in [0, 1], as the module docstring defines it."""
    h, w = pred.shape[-2:]
    t = tolerance_pixels(tolerance, h, w)
    sets = ClassSets(num_classes, pred.device)
    # The band rule needs ignore pixels. On CPU, look (no device to wait for); on a GPU the look would be a host
    # sync, and the band work there costs less than one.
    all_valid = not pred.is_cuda and bool(valid.all())
    if band > 0 and not all_valid:
        unknown = ~valid
        is_c = where(valid, sets.of(target))                              # C: {target label} on valid pixels
        is_n = where(valid, sets.full ^ sets.of(target))                  # N: every other class
        zone = (geodesic_reach(where(unknown, dilate(is_c)), where(unknown, sets.full), band - 1)
                & geodesic_reach(where(unknown, dilate(is_n)), where(unknown, sets.full), band - 1))   # Z_c
        target_b = gradient(target, valid, sets) | where(valid, dilate(zone))             # TB_c: + the rims
        judged = valid | (zone != 0).any(1)                                                # any class's band
    else:
        zone = None
        judged = None if all_valid else valid
        target_b = gradient(target, judged, sets)
    pred_b = gradient(pred, judged, sets)                                                  # PB_c
    near_pred = dilate(pred_b, t)
    precise = pred_b & dilate(target_b, t)
    found = target_b & near_pred
    if zone is not None:
        precise = precise | (pred_b & zone)
        # a band's rims are matched from a predicted edge of c within tolerance of the band, across the band
        found = found | (target_b & dilate(geodesic_reach(near_pred & zone, zone, band)))

    n_p, n_t = sets.counts(pred_b), sets.counts(target_b)                 # (B, K)
    precision = sets.counts(precise) / n_p.clamp_min(1)
    recall = sets.counts(found) / n_t.clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    f1 = torch.where((n_p > 0) & (n_t > 0), f1, 0.0)
    scored = (n_p + n_t) > 0                                              # classes with a boundary in either map
    n_scored = scored.sum(1)
    mean = torch.where(scored, f1, 0.0).sum(1) / n_scored.clamp_min(1)
    return torch.where(n_scored > 0, mean, 1.0).float()
