"""Rasterisation of a synthetic surgical scene (trainers.data.synthetic): the painter's algorithm over the scene's
layers (tissue, kidneys, clamps, thin structures, instruments, highlights), then the camera (blur, vignette, jitter,
tone curve, sensor noise). A pure function of (seed, index, size)."""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

from trainers.data.synthetic.draw import _arc, _axes, _Canvas, _coverage, _curve, _frame, _paint, _segment, _smooth_field
from trainers.data.synthetic.scene import (CLAMPS, CLASPER, KIDNEY, NEEDLE, SHAFT, THREAD, WRIST, _instrument_points,
                                           _rgb, _scene_params)

_NEG_SEED_TAG = 0x5EED_0F_9E6   # a negative seed's own SeedSequence stream (SeedSequence wants entropy >= 0)


def _draw_tissue(cv: _Canvas, p) -> np.ndarray:
    """Background tissue over the whole canvas; returns the mid-frequency field (2, H, W)."""
    size, img = cv.size, cv.img
    lo = _smooth_field(p["grid_lo"], size)
    lum = 1.0 + 0.13 * lo[0]
    tr, tg, tb = p["tissue"].ravel().tolist()
    img[0] = tr * lum
    img[1] = tg * lum + 0.03 * lo[1]
    img[2] = tb * lum + 0.03 * lo[2]
    mid = _smooth_field(p["grid_mid"], size)
    fine = _smooth_field(p["grid_fine"], size)[0]
    img *= 1.0 + 0.05 * mid[0] + 0.04 * fine
    fat = _smooth_field(p["grid_fat"], size)[0]
    fa = np.clip((fat - p["fat_thr"]) * 1.5, 0.0, 0.75)
    _paint(img, fa * (1.0 + 0.15 * mid[1]), p["fat"])
    for c in p["folds"]:
        v = cv.view_curve(c, 2.5 * c["w"])
        if v is not None:
            im, _, x, y, _ = v
            d, _ = _curve(x, y, c)
            im *= 1.0 - c["a"] * np.exp(-((d / c["w"]) ** 2))
    for c in p["vessels"]:
        v = cv.view_curve(c, 2.5 * c["w"])
        if v is not None:
            im, _, x, y, _ = v
            d, _ = _curve(x, y, c)
            _paint(im, c["a"] * np.exp(-((d / c["w"]) ** 2)), p["vessel"])
    return mid


def _draw_kidneys(cv: _Canvas, p, mid: np.ndarray) -> None:
    size = cv.size
    for k in p["kidneys"]:
        e = k["r"] * (1.0 + sum(a for _, a, _ in k["harm"]))
        v = cv.view(k["cx"] - e, k["cx"] + e, k["cy"] - e, k["cy"] + e)
        if v is None:
            continue
        img, mask, x, y, (sy, sx) = v
        dx, dy = x - k["cx"], y - k["cy"]
        rho = np.sqrt(dx * dx + dy * dy)
        phi = np.arctan2(dy, dx)
        rr = 1.0
        for order, amp, ph in k["harm"]:
            rr = rr + amp * np.cos(order * phi + ph)
        rr = k["r"] * rr
        inside_frac = np.clip(1.0 - rho / np.maximum(rr, 1e-3), 0.0, 1.0)
        shade = 0.78 + 0.32 * np.sqrt(inside_frac) + 0.08 * mid[1, sy, sx] + 0.06 * mid[0, sy, sx]
        hx, hy, ha = k["sheen"]
        sheen = ha * np.exp(-(((dx - hx * k["r"]) ** 2 + (dy - hy * k["r"]) ** 2) / (0.5 * k["r"] ** 2)))
        col = k["col"] * shade
        col += sheen
        _paint(img, np.clip((rr - rho) * (size / 1.5) + 0.5, 0.0, 1.0), col)
        mask[rho < rr] = KIDNEY


def _draw_clamps(cv: _Canvas, p) -> None:
    size = cv.size
    for c in p["clamps"]:
        v = cv.view(c["cx"] - c["hl"], c["cx"] + c["hl"], c["cy"] - c["hl"], c["cy"] + c["hl"])
        if v is None:
            continue
        img, mask, x, y, _ = v
        t, n = _frame(x, y, c["cx"], c["cy"], c["ang"])
        # rounded rectangle: distance to the core segment, compared with the half width
        ex = np.maximum(np.abs(t) - (c["hl"] - c["hw"]), 0.0)
        d = np.sqrt(ex * ex + n * n)
        u = np.clip(n / c["hw"], -1.0, 1.0)
        shade = (0.65 + 0.45 * np.sqrt(1.0 - u * u)) * np.where(np.abs(t) < 0.1 * c["hl"], 0.75, 1.0)
        _paint(img, _coverage(d, c["hw"], size), c["col"] * shade)
        mask[d <= c["hw"]] = CLAMPS


def _draw_thin(cv: _Canvas, p) -> None:
    size = cv.size
    for c in p["threads"]:
        hw = max(c["hw"], 0.5 / size)
        v = cv.view_curve(c, hw)
        if v is None:
            continue
        img, mask, x, y, _ = v
        d, _ = _curve(x, y, c)
        _paint(img, _coverage(d, hw, size), c["col"])
        mask[d <= hw] = THREAD
    nd = p["needle"]
    if nd is not None:
        hw = max(nd["hw"], 0.5 / size)
        e = nd["r"] + hw
        v = cv.view(nd["cx"] - e, nd["cx"] + e, nd["cy"] - e, nd["cy"] + e)
        if v is not None:
            img, mask, x, y, _ = v
            d, dphi = _arc(x, y, nd)
            shade = 0.8 + 0.25 * np.cos(dphi * 2.5)
            _paint(img, _coverage(d, hw, size), nd["col"] * shade)
            mask[d <= hw] = NEEDLE


def _draw_instrument(cv: _Canvas, ins, spots: list) -> None:
    size = cv.size
    hw, hw_w = ins["hw"], ins["hw_w"]
    shaft_end, wrist_end, jaws = _instrument_points(ins)
    nrm = np.array([-ins["d"][1], ins["d"][0]])

    # shaft (+ soft unlabelled shadow on what lies below): cylinder shading + specular stripe
    ox, w = ins["shadow"]
    v = cv.view_points([ins["start"], wrist_end], hw + abs(ox) + w)
    if v is not None:
        img, mask, x, y, _ = v
        t, n = _frame(x, y, ins["start"][0], ins["start"][1], ins["ang"])
        sh = np.clip(1.0 - (np.abs(n - ox) - hw) / w, 0.0, 1.0) * (t <= ins["L"] + ins["lw"])
        img *= 1.0 - 0.35 * sh
        inside = t <= ins["L"]
        a = _coverage(np.abs(n), hw, size) * inside
        u = np.clip(n / hw, -1.0, 1.0)
        shade = 0.5 + 0.55 * np.sqrt(1.0 - u * u)
        stripe = 0.55 * np.exp(-(((u - ins["light"]) / 0.14) ** 2))
        col = ins["shaft_col"] * shade
        col += stripe * (1.0 - col)
        _paint(img, a, col)
        mask[(np.abs(n) <= hw) & inside] = SHAFT

    # wrist: capsule from the shaft end to the wrist end, dark with metallic bands
    v = cv.view_points([shaft_end, wrist_end], hw_w)
    if v is not None:
        img, mask, x, y, _ = v
        h, dw = _segment(x, y, shaft_end, wrist_end)
        n = (x - float(shaft_end[0])) * float(nrm[0]) + (y - float(shaft_end[1])) * float(nrm[1])
        band = np.sin(h * (math.pi * (2 * ins["bands"] + 1))) > 0.55
        col = np.where(band, ins["band_col"], ins["wrist_col"])
        u = np.clip(n / hw_w, -1.0, 1.0)
        col *= 0.6 + 0.6 * np.sqrt(1.0 - u * u)
        _paint(img, _coverage(dw, hw_w, size), col)
        mask[dw <= hw_w] = WRIST

    # clasper: two tapered jaws (V shape), metallic
    for base, tip, r0, r1 in jaws:
        v = cv.view_points([base, tip], r0)
        if v is None:
            continue
        img, mask, x, y, _ = v
        h, dj = _segment(x, y, base, tip)
        r = r0 + (r1 - r0) * h
        shade = 0.55 + 0.5 * np.clip(1.0 - dj / r, 0.0, 1.0)
        _paint(img, np.clip((r - dj) * size + 0.5, 0.0, 1.0), ins["jaw_col"] * shade)
        mask[dj <= r] = CLASPER

    # specular spots on the shaft, on the highlight stripe (drawn with the tissue highlights)
    for s in ins["spots"]:
        pt = ins["start"] + ins["d"] * (0.3 + s * (ins["L"] - 0.3)) + nrm * (ins["light"] * hw)
        spots.append((float(pt[0]), float(pt[1]), 0.3 * float(hw)))


def _draw_highlights(cv: _Canvas, spots: list) -> None:
    """Small unlabelled specular spots (wet tissue, metal)."""
    white = _rgb(1.0, 0.98, 0.96)
    for sx, sy, r in spots:
        e = 2.0 * r
        v = cv.view(sx - e, sx + e, sy - e, sy + e)
        if v is None:
            continue
        img, _, x, y, _ = v
        dx, dy = x - sx, y - sy
        g = np.exp(-(dx * dx + dy * dy) * (1.0 / (r * r)))
        _paint(img, np.clip(1.6 * g - 0.25, 0.0, 1.0), white)


@functools.lru_cache(maxsize=32)
def _vignette_base(size: int) -> np.ndarray:
    """(2 r^2)^1.5 with r the distance to the image centre (0 at the centre, 1 in the corners)."""
    x, y = _axes(size)
    v = (2.0 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)) ** 1.5
    v.setflags(write=False)
    return v


def _camera(img: np.ndarray, p, size: int, rng_pix: np.random.Generator) -> np.ndarray:
    """Blur, vignette, brightness/colour jitter, tone curve, sensor noise; (3, H, W) float -> uint8."""
    sigma = p["blur"] * size / 64.0
    img = ndimage.gaussian_filter(img, sigma=(0.0, sigma, sigma), mode="nearest", truncate=3.0)
    vig = (1.0 - p["vignette"] * _vignette_base(size)) * p["brightness"]
    img *= vig * p["gains"]
    np.clip(img, 0.0, 1.0, out=img)
    k = p["tone"]  # img + k img (1 - img): a cheap gamma-like tone curve
    sq = img * img
    img *= 1.0 + k
    img -= k * sq
    img *= 255.0
    img += rng_pix.standard_normal(img.shape, dtype=np.float32) * (255.0 * p["noise"])
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


def render_scene(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image uint8 (size, size, 3), mask uint8 (size, size) with values in range(len(CLASSES)).

    A pure function of (seed, index, size): the layout comes from ``default_rng([seed, index])``
    (identical at every size), per-pixel noise from ``default_rng([seed, index, size])``.
    """
    image, mask = _render_chw(seed, index, size)
    return np.ascontiguousarray(image.transpose(1, 2, 0)), mask


def _render_chw(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """render_scene with the image channel-first (3, size, size)."""
    seed, index, size = int(seed), int(index), int(size)
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    # SeedSequence wants non-negative entropy: a negative seed gets its own, tagged stream.
    key = [seed] if seed >= 0 else [-seed, _NEG_SEED_TAG]
    p = _scene_params(np.random.default_rng([*key, index]))
    cv = _Canvas(size)
    mid = _draw_tissue(cv, p)
    _draw_kidneys(cv, p, mid)
    _draw_clamps(cv, p)
    spots = list(p["spots"])
    if not p["thin_on_top"]:
        _draw_thin(cv, p)
    for ins in p["instruments"]:
        _draw_instrument(cv, ins, spots)
    if p["thin_on_top"]:
        _draw_thin(cv, p)
    _draw_highlights(cv, spots)
    image = _camera(cv.img, p, size, np.random.default_rng([*key, index, size]))
    return image, cv.mask

