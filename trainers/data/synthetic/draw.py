"""Drawing primitives of the synthetic surgical scenes (trainers.data.synthetic): cached coordinate grids, smooth
random fields, distances to segments / curves / arcs, anti-aliased coverage, and the canvas that hands out windows
around objects. All vectorised numpy on normalised [0, 1] coordinates, so geometry is size independent."""

from __future__ import annotations

import functools
import math

import numpy as np

_FAR = np.float32(1e3)   # "no distance": outside a curve's parameter range


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
# canvas
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

