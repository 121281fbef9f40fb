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
* thread (thin curves, pale or tissue-like) and suturing needle (thin silver half-circle arc),
  drawn under the instruments in most scenes and on top of them in the others;
* instruments (1-2): grey metallic shaft entering from the border, dark wrist with metallic
  bands, two thin metallic clasper jaws (a V); soft shadow on the tissue;
* unlabelled specular highlights (tissue and instruments), mild blur, vignette, colour/brightness
  jitter, a tone curve and Gaussian sensor noise.

All rasterisation is vectorised numpy on coordinate grids (signed distances to segments, arcs,
curves and polar contours); coordinates are normalised to [0, 1] so geometry is size independent.
Thin structures (thread, needle) have a half-width of 0.55-0.9 px at size 64 (scaled with size,
never below 0.5 px) so that they survive rasterisation as 1-2 px wide connected lines.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import ndimage

from trainers.data.endovis import CLASSES as _ENDOVIS_CLASSES, PALETTE as _ENDOVIS_PALETTE

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

CLASSES: tuple[str, ...] = (
    "background-tissue",
    "kidney-parenchyma",
    "instrument-shaft",
    "instrument-wrist",
    "instrument-clasper",
    "thread",
    "suturing-needle",
    "clamps",
)

# The EndoVis 2018 label colours (labels.json) of these classes, in CLASSES order: one table, in endovis.py.
PALETTE: tuple[tuple[int, int, int], ...] = tuple(_ENDOVIS_PALETTE[_ENDOVIS_CLASSES.index(c)] for c in CLASSES)

IGNORE_INDEX = 255

# Per-channel statistics of image/255, measured on SyntheticSurgical("train", 2048, 64, seed=0)
# (the values barely move with the seed or the image size). Fixed constants on purpose.
MEAN: tuple[float, float, float] = (0.579, 0.300, 0.282)
STD: tuple[float, float, float] = (0.154, 0.124, 0.125)

BACKGROUND, KIDNEY, SHAFT, WRIST, CLASPER, THREAD, NEEDLE, CLAMPS = range(8)

# Offset of the validation scene stream: val scene i is render_scene(seed, VAL_INDEX_OFFSET + i).
VAL_INDEX_OFFSET = 1 << 40

_FAR = np.float32(1e3)
_NEG_SEED_TAG = 0x5EED_0F_9E6


# --------------------------------------------------------------------------------------------
# cached grids
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _axes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: X with shape (1, W), Y with shape (H, 1)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    x, y = c[None, :].copy(), c[:, None].copy()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=64)
def _smooth_matrix(size: int, g: int) -> np.ndarray:
    """(size, g) Gaussian interpolation weights, rows L2-normalised.

    ``M @ G @ M.T`` of an i.i.d. N(0, 1) grid G is then a smooth field with unit variance per pixel.
    """
    centres = (np.arange(g, dtype=np.float64) - 0.5) / (g - 2)
    x = (np.arange(size, dtype=np.float64) + 0.5) / size
    sigma = 0.75 / (g - 2)
    w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / sigma) ** 2)
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True))
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def _smooth_field(grid: np.ndarray, size: int) -> np.ndarray:
    """Upsample a (C, g, g) grid of N(0, 1) values to a smooth (C, size, size) unit-variance field."""
    m = _smooth_matrix(size, grid.shape[-1])
    return m @ grid @ m.T


# --------------------------------------------------------------------------------------------
# geometry primitives (all return arrays broadcast to (H, W))
# --------------------------------------------------------------------------------------------


def _frame(x, y, px, py, ang):
    """Coordinates along (t) and across (n) the direction ``ang`` with origin (px, py)."""
    c, s = math.cos(ang), math.sin(ang)
    dx, dy = x - float(px), y - float(py)
    return dx * c + dy * s, dy * c - dx * s


def _segment(x, y, a, b):
    """Projection parameter h in [0, 1] and distance to the segment a-b."""
    ax, ay, vx, vy = float(a[0]), float(a[1]), float(b[0] - a[0]), float(b[1] - a[1])
    l2 = max(vx * vx + vy * vy, 1e-12)
    dx, dy = x - ax, y - ay
    h = np.clip((dx * vx + dy * vy) * (1.0 / l2), 0.0, 1.0)
    ex, ey = dx - h * vx, dy - h * vy
    return h, np.sqrt(ex * ex + ey * ey)


def _curve(x, y, c):
    """Approximate distance to a wavy open curve y' = f(x') in a rotated frame (x' in [t0, t1])."""
    t, n = _frame(x, y, c["cx"], c["cy"], c["ang"])
    arg = c["freq"] * t + c["phase"]
    f = c["amp"] * (np.sin(arg) - math.sin(c["phase"]) * c["anchor"]) + c["bend"] * t * t
    fp = (c["amp"] * c["freq"]) * np.cos(arg) + (2.0 * c["bend"]) * t
    d = np.abs(n - f) / np.sqrt(1.0 + fp * fp)
    return np.where((t >= c["t0"]) & (t <= c["t1"]), d, _FAR), t


def _arc(x, y, a):
    """Distance to a circular arc (centre, radius, mid angle, half span) and the angle offset."""
    dx, dy = x - a["cx"], y - a["cy"]
    rho = np.sqrt(dx * dx + dy * dy)
    dphi = (np.arctan2(dy, dx) - a["mid"] + math.pi) % (2.0 * math.pi) - math.pi
    inside = np.abs(dphi) <= a["half"]
    ends = []
    for sgn in (-1.0, 1.0):
        ang = a["mid"] + sgn * a["half"]
        ex = dx - a["r"] * math.cos(ang)
        ey = dy - a["r"] * math.sin(ang)
        ends.append(ex * ex + ey * ey)
    d_end = np.sqrt(np.minimum(ends[0], ends[1]))
    return np.where(inside, np.abs(rho - a["r"]), d_end), dphi


def _coverage(d, hw, size):
    """Anti-aliased coverage of the band ``d <= hw`` (normalised units) at the given image size."""
    return np.clip((hw - d) * size + 0.5, 0.0, 1.0)


def _paint(img, alpha, colour):
    """img <- img + alpha * (colour - img), in place. img (3, H, W); alpha (H, W); colour (3, 1, 1) or (3, H, W)."""
    img += alpha * (colour - img)


# --------------------------------------------------------------------------------------------
# scene parameters (size independent, drawn from the (seed, index) stream)
# --------------------------------------------------------------------------------------------


class _Rand:
    """Scalar draws from a numpy Generator, pre-drawn in blocks (a scalar rng call costs ~1 us)."""

    def __init__(self, rng: np.random.Generator, block: int = 256):
        self.rng, self.block = rng, block
        self.buf: list[float] = []
        self.i = 0

    def random(self) -> float:
        if self.i >= len(self.buf):
            self.buf, self.i = self.rng.random(self.block).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def integers(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi)."""
        return min(lo + int(self.random() * (hi - lo)), hi - 1)


def _rgb(*c) -> np.ndarray:
    """A colour as a (3, 1, 1) float32 array (broadcasts against channel-first images)."""
    return np.array(c, dtype=np.float32).reshape(3, 1, 1)


def _wavy(r: _Rand, centre=None, length=None, anchor=0.0, t0=None) -> dict:
    """Parameters of a wavy curve through ``centre`` (random if None)."""
    if centre is None:
        centre = (r.uniform(0.15, 0.85), r.uniform(0.15, 0.85))
    half = r.uniform(0.25, 0.55) if length is None else length
    freq = r.uniform(4.0, 14.0)
    amp = min(r.uniform(0.01, 0.06), 0.7 / freq)  # moderate slope: the distance approximation holds
    return dict(
        cx=float(centre[0]),
        cy=float(centre[1]),
        ang=r.uniform(0, 2 * math.pi),
        amp=amp,
        freq=freq,
        phase=r.uniform(0, 2 * math.pi),
        bend=r.uniform(-1.2, 1.2),
        anchor=anchor,
        t0=-half if t0 is None else t0,
        t1=half,
    )


def _instrument(r: _Rand, side: int) -> dict:
    """One instrument: entry point on the border ``side``, clasper tip inside the image."""
    u = r.uniform(0.05, 0.95)
    entry = np.array({0: (u, -0.02), 1: (1.02, u), 2: (u, 1.02), 3: (-0.02, u)}[side])
    for _ in range(20):
        tip = np.array([r.uniform(0.18, 0.82), r.uniform(0.18, 0.82)])
        if np.hypot(*(tip - entry)) > 0.45:
            break
    v = tip - entry
    dist = float(np.hypot(*v))
    d = v / dist
    hw = r.uniform(0.055, 0.085)  # shaft half width
    lw = r.uniform(0.7, 1.3) * hw * 1.4  # wrist length
    lc = r.uniform(0.10, 0.16)  # jaw length
    grey = r.uniform(0.42, 0.68)
    return dict(
        start=entry - d * 0.3,  # 0.3 outside the border
        d=d,
        ang=math.atan2(d[1], d[0]),
        hw=hw,
        hw_w=hw * r.uniform(0.72, 0.9),
        L=dist - lw - 0.6 * lc + 0.3,  # shaft length from ``start``
        lw=lw,
        lc=lc,
        open=r.uniform(0.04, 0.42),
        bend=r.uniform(-0.35, 0.35),
        shaft_col=_rgb(grey, grey * r.uniform(0.98, 1.03), grey * r.uniform(1.0, 1.08)),
        wrist_col=_rgb(0.13, 0.13, 0.15) * r.uniform(0.8, 1.5),
        band_col=_rgb(0.55, 0.55, 0.58) * r.uniform(0.8, 1.2),
        jaw_col=_rgb(0.78, 0.77, 0.76) * r.uniform(0.82, 1.1),
        bands=r.integers(1, 3),
        light=r.uniform(-0.55, 0.55),
        shadow=(r.uniform(-0.02, 0.02), r.uniform(0.01, 0.03)),
        spots=[r.uniform(0.05, 0.95) for _ in range(r.integers(1, 4))],
    )


def _instrument_points(ins: dict):
    """Shaft end, wrist end and clasper jaw segments (base, tip, base radius, tip radius)."""
    d = ins["d"]
    nrm = np.array([-d[1], d[0]])
    shaft_end = ins["start"] + d * ins["L"]
    wrist_end = shaft_end + d * ins["lw"]
    jaws = []
    for sgn in (-1.0, 1.0):
        a = ins["ang"] + ins["bend"] + sgn * ins["open"] * 0.5
        base = wrist_end + nrm * (sgn * 0.35 * ins["hw_w"]) - d * 0.2 * ins["hw_w"]
        tip = wrist_end + np.array([math.cos(a), math.sin(a)]) * ins["lc"]
        jaws.append((base, tip, 0.45 * ins["hw_w"], max(0.16 * ins["hw_w"], 0.009)))
    return shaft_end, wrist_end, jaws


def _scene_params(rng: np.random.Generator) -> dict:
    r = _Rand(rng)
    p: dict = {}
    # --- tissue (RGB in [0, 1]) ---
    p["tissue"] = _rgb(r.uniform(0.66, 0.84), r.uniform(0.24, 0.40), r.uniform(0.22, 0.36))
    p["vessel"] = p["tissue"] * _rgb(0.62, 0.42, 0.55) * r.uniform(0.8, 1.05)
    p["fat"] = _rgb(0.86, 0.70, 0.44) * r.uniform(0.9, 1.05)
    p["fat_thr"] = r.uniform(0.9, 2.6)
    p["vessels"] = [
        dict(_wavy(r), w=r.uniform(0.008, 0.02), a=r.uniform(0.3, 0.65)) for _ in range(r.integers(2, 6))
    ]
    p["folds"] = [dict(_wavy(r), w=r.uniform(0.03, 0.07), a=r.uniform(0.2, 0.45)) for _ in range(r.integers(0, 3))]
    # --- kidney: 0 (22%), 1 or 2 blobs ---
    n_kid = 0 if r.random() < 0.22 else (1 if r.random() < 0.75 else 2)
    kmix = r.uniform(0.45, 0.85)
    kcol = (1 - kmix) * p["tissue"] + kmix * _rgb(0.46, 0.22, 0.27) * r.uniform(0.85, 1.2)
    p["kidneys"] = [
        dict(
            cx=r.uniform(0.1, 0.9),
            cy=r.uniform(0.1, 0.9),
            r=r.uniform(0.14, 0.3),
            harm=[(k, r.uniform(0, 0.22 / k**0.5), r.uniform(0, 2 * math.pi)) for k in (1, 2, 3, 4)],
            col=kcol * _rgb(r.uniform(0.92, 1.08), r.uniform(0.92, 1.08), r.uniform(0.92, 1.08)),
            sheen=(r.uniform(-0.5, 0.5), r.uniform(-0.5, 0.5), r.uniform(0.05, 0.18)),
        )
        for _ in range(n_kid)
    ]
    # --- clamps ---
    n_clamp = 0 if r.random() < 0.62 else r.integers(1, 3)
    clamp_base = (_rgb(0.92, 0.82, 0.12), _rgb(0.28, 0.78, 0.30), _rgb(0.72, 0.86, 0.18))
    p["clamps"] = [
        dict(
            cx=r.uniform(0.12, 0.88),
            cy=r.uniform(0.12, 0.88),
            ang=r.uniform(0, 2 * math.pi),
            hl=r.uniform(0.045, 0.075),
            hw=r.uniform(0.018, 0.03),
            col=clamp_base[r.integers(0, 3)] * r.uniform(0.85, 1.08),
        )
        for _ in range(n_clamp)
    ]
    # --- instruments: 1 (40%) or 2, from different borders, mostly not from the bottom ---
    n_ins = 1 if r.random() < 0.4 else 2
    sides = sorted(range(4), key=lambda _: r.random())
    if r.random() < 0.7:
        sides = [s for s in sides if s != 2] + [2]
    p["instruments"] = [_instrument(r, s) for s in sides[:n_ins]]
    # --- needle (65%) ---
    p["needle"] = None
    if r.random() < 0.65:
        rad = r.uniform(0.06, 0.11)
        half = r.uniform(0.4, 0.6) * math.pi
        if r.random() < 0.5:  # held by a clasper: the arc passes between the jaw tips
            _, _, jaws = _instrument_points(p["instruments"][0])
            grip = 0.5 * (jaws[0][1] + jaws[1][1])
            phi = r.uniform(0, 2 * math.pi)
            centre = (grip[0] - rad * math.cos(phi), grip[1] - rad * math.sin(phi))
            mid = phi + r.uniform(-0.6, 0.6) * half
        else:
            centre = (r.uniform(0.18, 0.82), r.uniform(0.18, 0.82))
            mid = r.uniform(0, 2 * math.pi)
        p["needle"] = dict(
            cx=float(centre[0]),
            cy=float(centre[1]),
            r=rad,
            mid=mid,
            half=half,
            hw=r.uniform(0.6, 0.9) / 64,
            col=_rgb(0.86, 0.86, 0.88) * r.uniform(0.85, 1.1),
        )
    # --- thread (62%): 1-2 curves, pale lavender or tissue-like ---
    p["threads"] = []
    if r.random() < 0.62:
        if r.random() < 0.6:
            tcol = _rgb(0.84, 0.78, 0.90)
        else:
            tcol = p["tissue"] * _rgb(1.25, 1.55, 1.55)
        tcol = np.clip(tcol * r.uniform(0.85, 1.1), 0.0, 1.0)
        nd = p["needle"]
        for k in range(r.integers(1, 3)):
            if k == 0 and nd is not None and r.random() < 0.6:  # attached to the needle's end
                ang = nd["mid"] + nd["half"]
                end = (nd["cx"] + nd["r"] * math.cos(ang), nd["cy"] + nd["r"] * math.sin(ang))
                c = _wavy(r, centre=end, anchor=1.0, t0=0.0, length=r.uniform(0.3, 0.7))
            else:
                c = _wavy(r)
            c["hw"] = r.uniform(0.55, 0.85) / 64
            c["col"] = tcol
            p["threads"].append(c)
    p["thin_on_top"] = r.random() < 0.3  # thread/needle drawn over the instruments
    # --- tissue highlights, camera ---
    rad = r.uniform(0.005, 0.014)
    p["spots"] = [(r.random(), r.random(), rad * r.uniform(0.6, 1.3)) for _ in range(r.integers(3, 10))]
    p["vignette"] = r.uniform(0.35, 0.7)
    p["brightness"] = r.uniform(0.82, 1.12)
    p["gains"] = _rgb(r.uniform(0.93, 1.07), r.uniform(0.93, 1.07), r.uniform(0.93, 1.07))
    p["tone"] = r.uniform(-0.25, 0.3)
    p["noise"] = r.uniform(0.008, 0.03)
    p["blur"] = r.uniform(0.35, 0.75)
    p["grid_lo"] = rng.standard_normal((3, 5, 5), dtype=np.float32)
    p["grid_mid"] = rng.standard_normal((2, 12, 12), dtype=np.float32)
    p["grid_fine"] = rng.standard_normal((1, 26, 26), dtype=np.float32)
    p["grid_fat"] = rng.standard_normal((1, 6, 6), dtype=np.float32)
    return p


# --------------------------------------------------------------------------------------------
# rasterisation
# --------------------------------------------------------------------------------------------


class _Canvas:
    """Image (3, H, W) float32 in [0, 1] + label map; hands out windows (views) around objects."""

    def __init__(self, size: int):
        self.size = size
        self.x, self.y = _axes(size)
        self.img = np.empty((3, size, size), dtype=np.float32)
        self.mask = np.zeros((size, size), dtype=np.uint8)

    def view(self, x0: float, x1: float, y0: float, y1: float):
        """(img, mask, x, y, (rows, cols)) in the normalised box [x0, x1] x [y0, y1] (+1.5 px), or None."""
        s = self.size
        i0, i1 = max(math.floor(x0 * s - 1.5), 0), min(math.ceil(x1 * s + 1.5), s)
        j0, j1 = max(math.floor(y0 * s - 1.5), 0), min(math.ceil(y1 * s + 1.5), s)
        if i0 >= i1 or j0 >= j1:
            return None
        sx, sy = slice(i0, i1), slice(j0, j1)
        return self.img[:, sy, sx], self.mask[sy, sx], self.x[:, sx], self.y[sy, :], (sy, sx)

    def view_points(self, pts, pad: float):
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        lo, hi = pts.min(axis=0) - pad, pts.max(axis=0) + pad
        return self.view(lo[0], hi[0], lo[1], hi[1])

    def view_curve(self, c, pad: float):
        ext = abs(c["amp"]) * (1.0 + abs(c["anchor"])) + abs(c["bend"]) * max(c["t0"] ** 2, c["t1"] ** 2) + pad
        ca, sa = math.cos(c["ang"]), math.sin(c["ang"])
        pts = [
            (c["cx"] + t * ca - n * sa, c["cy"] + t * sa + n * ca)
            for t in (c["t0"] - pad, c["t1"] + pad)
            for n in (-ext, ext)
        ]
        return self.view_points(pts, 0.0)


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
    """

    classes = CLASSES
    num_classes = len(CLASSES)
    ignore_index = IGNORE_INDEX
    palette = PALETTE
    splits = ("train", "val")

    def __init__(self, split: str, size: int, image_size: int = 64, seed: int = 0):
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, self.splits))}")
        if int(size) < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.split = split
        self.size = int(size)
        self.image_size = int(image_size)
        self.seed = int(seed)
        offset = 0 if split == "train" else VAL_INDEX_OFFSET
        n, s = self.size, self.image_size
        images = np.empty((n, 3, s, s), dtype=np.uint8)
        masks = np.empty((n, s, s), dtype=np.uint8)
        for i in range(n):
            images[i], masks[i] = _render_chw(self.seed, offset + i, s)
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
            f"image_size={self.image_size}, seed={self.seed})"
        )
