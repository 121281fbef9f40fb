"""r^Boundary of paper 002 (Eq. 15): the class-wise boundary F score (BF), aware of ignore bands.

The paper says only that r^Boundary "measures edge accuracy by comparing predicted and ground-truth boundaries".
Our reading is the class-wise BF score of Csurka et al. 2013 ("What is a good evaluation measure for semantic
segmentation?"), built from the DAVIS boundary F measure (`f_measure` / `seg2bmap` of the DAVIS benchmark,
Perazzi et al. 2016), per class:

  * Boundary map of a binary map M (DAVIS `seg2bmap`): pixel p is a boundary pixel when M(p) differs from M at its
    right, bottom or bottom-right neighbour (the neighbours that exist). One pixel thick, on one side of the edge
    only (offset half a pixel towards the origin), and the image border is no boundary: a class region touching
    the border has no boundary along it. PB_c = boundary map of (prediction == c), TB_c = of (target == c).
  * Tolerance disk D_t = {(dy, dx): dy^2 + dx^2 <= t^2} (skimage `disk(t)`, as DAVIS dilates with; t = 1 is the
    4-neighbour cross). Precision P_c = |PB_c within D_t of TB_c| / |PB_c|, recall R_c = |TB_c within D_t of
    PB_c| / |TB_c|, F_c = 2 P R / (P + R) (0 when P + R = 0).
  * DAVIS's empty cases: PB_c and TB_c both empty -> F_c = 1; exactly one empty -> F_c = 0. And one of ours, so a
    uniform prediction of the wrong class cannot score 1: a class present in exactly one of the two maps scores
    F_c = 0 even when neither map has a boundary of it.
  * The image's r^Boundary = mean of F_c over the classes present in the target (on valid pixels) or in the
    prediction (on judged pixels, below). An image whose target has no valid pixel has no boundary term: NaN
    (rewards.weighted_reward leaves the term out of that image's reward).

Ignore pixels (target == ignore_index, `valid` False). DAVIS sets its void pixels to background in both masks; we
do not, so that a prediction never matches for free and a VOC outline drawn as a 255 band still counts:
  * The band Z_c of class c: the ignore pixels that lie, through ignore pixels (8-connected moves), within `band`
    moves of a valid c pixel and within `band` moves of a valid pixel of another class: an ignore band that
    separates c from something else (VOC draws a ~5 px 255 band around every object; its true outline lies
    somewhere inside). Judged pixels: valid pixels and the pixels of any class's band.
  * TB_c = seg2bmap pairs of valid pixels (both valid), plus the c side of each band: the valid c pixels that
    touch Z_c (8-neighbours). One rim per class, so each outline through a band counts once for c, like a thin
    boundary. PB_c = seg2bmap pairs of judged pixels (both judged); the prediction on other ignore pixels never
    counts.
  * Matching: a predicted c-edge is precise when it lies within D_t of TB_c or of where seg2bmap would mark an
    outline through the band (Z_c, and the pixels whose right, bottom or bottom-right neighbour is in Z_c): the
    outline may run through any band pixel. A target boundary pixel is found when a predicted c-edge lies within
    D_t of it, or when it touches a band pixel reached, through Z_c in at most `band` moves, from a pixel of Z_c
    within D_t of a predicted c-edge. So an outline inside a band is matched by a predicted c-edge inside (or
    within D_t of) that band, and by nothing else: no edge, an edge of another class, or a band alone score 0.
With no ignore pixel this is the plain class-wise BF score: DAVIS's F measure of each class's binary map.

`tolerance`: pixels when >= 1, else that fraction of the image diagonal (DAVIS's bound_th, default 0.008); rounded
up to whole pixels. `band`: how far (moves through ignore pixels) a band pixel may lie from both sides and still
carry an outline; 0 turns the band rule off (ignore pixels then only drop out).

All work is batched over images, with the classes as bit sets: one bit a class, 8 classes a byte, (B, words, H, W)
uint8, so a per-class map costs ceil(K / 8) bytes a pixel; no Python loop over images or classes and no host sync
on a GPU (on CPU one look at `valid` skips the ignore-pixel work for a batch without ignore pixels).
"""
from __future__ import annotations

import functools
import math

import torch

# seg2bmap compares each pixel with these neighbours (dy, dx): right, bottom, bottom-right.
_SEG2BMAP = ((0, 1), (1, 0), (1, 1))


def tolerance_pixels(tolerance: float, height: int, width: int) -> int:
    """DAVIS: `tolerance` pixels when >= 1, else that fraction of the image diagonal; rounded up, at least 1."""
    if tolerance >= 1:
        return int(math.ceil(tolerance))
    return max(1, int(math.ceil(tolerance * math.hypot(height, width))))


class ClassSets:
    """Sets of classes per pixel as bytes (..., words, H, W) uint8: class c is bit c % 8 of word c // 8."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.words = -(-num_classes // 8)
        c = torch.arange(num_classes, device=device)
        table = torch.zeros(num_classes, self.words, dtype=torch.uint8, device=device)
        self.table = table.index_put_((c, c // 8), (1 << (c % 8)).to(torch.uint8))    # row c: the set {c}
        # for counts(): the bits of each byte value 0..255
        self.byte_bits = ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).double()

    def of(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B, H, W) int64 in [0, K) -> the singleton sets {label}, (B, words, H, W)."""
        if self.words == 1:
            return (1 << labels).to(torch.uint8)[:, None]
        b, h, w = labels.shape
        return self.table.index_select(0, labels.flatten()).view(b, h, w, self.words).permute(0, 3, 1, 2).contiguous()

    def counts(self, sets: torch.Tensor) -> torch.Tensor:
        """(..., words, H, W) -> how many pixels hold each class, (..., K) float64 (exact). One 256-bin histogram
        per (map, word) plane, then a (256, 8) table of the bits of each byte value: no (K, H, W) unpacking."""
        lead, hw = sets.shape[:-3], sets.shape[-2] * sets.shape[-1]
        planes = sets.reshape(-1, hw)
        n = planes.shape[0]
        # bin = 256 * plane + byte, int32; index_add_, not bincount, which syncs on a GPU
        offsets = torch.arange(0, 256 * n, 256, device=sets.device, dtype=torch.int32)
        bins = planes.to(torch.int32).add_(offsets[:, None])
        hist = torch.zeros(n * 256, dtype=torch.int64, device=sets.device)
        hist.index_add_(0, bins.flatten(), hist.new_ones(1).expand(bins.numel()))
        per_bit = hist.view(n, 256).double() @ self.byte_bits           # (n, 8): bit j of each plane's word
        return per_bit.view(*lead, self.words * 8)[..., :self.num_classes]


@functools.lru_cache(maxsize=16)
def _class_sets(num_classes: int, device: torch.device) -> ClassSets:
    return ClassSets(num_classes, device)


def byte_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> (B, 1, H, W) uint8, 0xFF where True: `sets & byte_mask(m)` keeps the sets where m holds."""
    return mask.to(torch.uint8).mul_(255)[:, None]


def _shifted_or_(out: torch.Tensor, x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] |= x[..., i + dy, j + dx] where that pixel exists (in place)."""
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:                  # no such pixel (and a negative stop would wrap around)
        return out
    out[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] |= \
        x[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    return out


def dilate_square(sets: torch.Tensor) -> torch.Tensor:
    """Union over each pixel's 3x3 neighbourhood (8-neighbour step) of (..., H, W) class sets or bool maps."""
    rows = _shifted_or_(_shifted_or_(sets.clone(), sets, 0, 1), sets, 0, -1)
    return _shifted_or_(_shifted_or_(rows.clone(), rows, 1, 0), rows, -1, 0)


def dilate_disk(sets: torch.Tensor, radius: int) -> torch.Tensor:
    """Union over the disk {dy^2 + dx^2 <= radius^2} around each pixel (skimage disk(radius)); outside: nothing.
    Row spans: spans[a] is the union over |dx| <= a, and row dy of the disk takes spans[isqrt(r^2 - dy^2)]."""
    spans = [sets]
    for a in range(1, radius + 1):
        spans.append(_shifted_or_(_shifted_or_(spans[-1].clone(), sets, 0, a), sets, 0, -a))
    out = spans[radius]                                   # row dy = 0; spans[radius] serves no other row
    for dy in range(1, radius + 1):
        a = math.isqrt(radius * radius - dy * dy)
        _shifted_or_(_shifted_or_(out, spans[a], dy, 0), spans[a], -dy, 0)
    return out


def geodesic_reach(seed: torch.Tensor, within: torch.Tensor, steps: int) -> torch.Tensor:
    """Class sets of `within` reached from `seed` by at most `steps` 8-connected moves inside `within` (per class)."""
    reach = seed & within
    for _ in range(steps):
        reach = dilate_square(reach) & within
    return reach


def seg2bmap(sets: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
    """DAVIS seg2bmap of every class at once: singleton sets (B, words, H, W) of a label map -> for each pixel p the
    classes c for which (label(p) == c) != (label(q) == c) at its right, bottom or bottom-right neighbour q, i.e.
    the symmetric difference {label(p)} ^ {label(q)}. domain: (B, 1, H, W) byte_mask; a pair counts only when both
    of its pixels are in it. None: the whole image."""
    h, w = sets.shape[-2:]
    out = torch.zeros_like(sets)
    for dy, dx in _SEG2BMAP:
        first, second = (..., slice(0, h - dy), slice(0, w - dx)), (..., slice(dy, h), slice(dx, w))
        pair = sets[first] ^ sets[second]
        if domain is not None:
            pair &= domain[first] & domain[second]
        out[first] |= pair
    return out


def present(labels: torch.Tensor, mask: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """labels (B, H, W) in [0, K), mask (B, H, W) bool or None (every pixel) -> (B, K) bool: the class has a pixel
    in mask. One scatter over the labels, cheaper than counting the class sets."""
    b = labels.shape[0]
    if mask is None:
        hit = torch.ones((), dtype=torch.uint8, device=labels.device).expand(b, labels[0].numel())
    else:
        hit = mask.flatten(1).to(torch.uint8)
    seen = torch.zeros(b, num_classes, dtype=torch.uint8, device=labels.device)
    return seen.scatter_reduce_(1, labels.flatten(1), hit, "amax") > 0


@torch.no_grad()
def boundary_f1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, num_classes: int,
                tolerance: float = 1.0, band: int = 8) -> torch.Tensor:
    """pred (B, H, W) class ids in [0, K), target (B, H, W) class ids in [0, K) (any such value where not valid),
    valid (B, H, W) bool -> r^Boundary (B,) float32 in [0, 1], NaN for an image without a valid pixel, as the
    module docstring defines it."""
    h, w = pred.shape[-2:]
    t = tolerance_pixels(tolerance, h, w)
    sets = _class_sets(num_classes, pred.device)
    target_sets, pred_sets = sets.of(target), sets.of(pred)
    # On CPU, look for ignore pixels (no device to wait for) and skip the masks without them; on a GPU the look
    # would be a host sync, and the masked work there costs less than one.
    all_valid = not pred.is_cuda and bool(valid.all())
    zone = rim = None
    if all_valid:
        judged = known = None
    else:
        known = byte_mask(valid)
        target_sets = target_sets & known                                 # no class on ignore pixels
        judged = known
        if band > 0:
            # the classes of the valid pixels each ignore pixel reaches within `band` moves through ignore pixels;
            # Z_c holds c where c and some other class are both reached
            unknown = ~known
            reach = geodesic_reach(dilate_square(target_sets), unknown, band - 1)
            two_or_more = ((reach & (reach - 1)) != 0).any(1) | ((reach != 0).sum(1) >= 2)
            zone = reach & byte_mask(two_or_more)                          # Z_c
            rim = target_sets & dilate_square(zone)                       # the valid c pixels touching Z_c
            judged = known | byte_mask((zone != 0).any(1))
        pred_sets = pred_sets & judged
    target_b = seg2bmap(target_sets, known)                               # TB_c
    if rim is not None:
        target_b |= rim
    pred_b = seg2bmap(pred_sets, judged)                                  # PB_c
    near_pred = dilate_disk(pred_b, t)
    outline = target_b                                                    # where a target outline is, or may be
    found = target_b & near_pred
    if zone is not None:
        # seg2bmap marks an outline through a band on Z_c or on the pixel left of, above or diagonally before it
        outline = target_b | zone
        for dy, dx in _SEG2BMAP:
            _shifted_or_(outline, zone, dy, dx)
        found |= target_b & dilate_square(geodesic_reach(near_pred & zone, zone, band))
    precise = pred_b & dilate_disk(outline, t)

    n_p, n_t, n_precise, n_found = sets.counts(torch.stack([pred_b, target_b, precise, found]))   # each (B, K)
    in_t = present(target, valid, num_classes)
    in_p = present(pred, None if judged is None else judged[:, 0] != 0, num_classes)
    precision, recall = n_precise / n_p.clamp_min(1), n_found / n_t.clamp_min(1)
    f = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    # DAVIS: both boundary maps empty -> 1, exactly one empty -> 0; ours: a class in one map only -> 0
    f = torch.where((n_p > 0) & (n_t > 0), f, ((n_p == 0) & (n_t == 0) & in_t & in_p).double())
    scored = in_t | in_p
    mean = torch.where(scored, f, 0.0).sum(1) / scored.sum(1).clamp_min(1)
    return torch.where(in_t.any(1), mean, torch.nan).float()
