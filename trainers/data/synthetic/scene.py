"""Scene composition of the synthetic surgical scenes (trainers.data.synthetic): the classes, and every scene's
parameters (tissue, kidneys, clamps, instruments, needle, thread, camera), drawn from the (seed, index) stream and
independent of the image size."""

from __future__ import annotations

import math

import numpy as np

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

# label ids, in CLASSES order (the painter writes them into the label map)
BACKGROUND, KIDNEY, SHAFT, WRIST, CLASPER, THREAD, NEEDLE, CLAMPS = range(8)

# Half-width of thread and needle, as a fraction of the image side: 1.1-1.5 px at the embedded 48 px (2-3 px wide
# lines). At 0.55-0.9 px of 64 (1 px wide at 48) no model of the embedded default learned either class (IoU 0.0 in
# every seed, see SyntheticSurgical's docstring): a tiny output-stride-8 CNN cannot place a 1-px line.
_THIN_HALF_WIDTH = (1.1 / 48, 1.5 / 48)


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
    n_clamp = 0 if r.random() < 0.45 else r.integers(1, 3)
    clamp_base = (_rgb(0.92, 0.82, 0.12), _rgb(0.28, 0.78, 0.30), _rgb(0.72, 0.86, 0.18))
    p["clamps"] = [
        dict(
            cx=r.uniform(0.12, 0.88),
            cy=r.uniform(0.12, 0.88),
            ang=r.uniform(0, 2 * math.pi),
            hl=r.uniform(0.09, 0.13),
            hw=r.uniform(0.045, 0.06),
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
        rad = r.uniform(0.1, 0.16)
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
            hw=r.uniform(1.8 / 48, 2.3 / 48),
            col=_rgb(0.86, 0.86, 0.88) * r.uniform(0.85, 1.1),
        )
    # --- thread (62%): 1-2 curves, violet (braided, Vicryl-like) or blue (monofilament, Prolene-like) ---
    p["threads"] = []
    if r.random() < 0.62:
        if r.random() < 0.6:
            tcol = _rgb(0.66, 0.52, 0.86)
        else:
            tcol = _rgb(0.30, 0.45, 0.85)
        tcol = np.clip(tcol * r.uniform(0.85, 1.1), 0.0, 1.0)
        nd = p["needle"]
        for k in range(r.integers(1, 3)):
            if k == 0 and nd is not None and r.random() < 0.6:  # attached to the needle's end
                ang = nd["mid"] + nd["half"]
                end = (nd["cx"] + nd["r"] * math.cos(ang), nd["cy"] + nd["r"] * math.sin(ang))
                c = _wavy(r, centre=end, anchor=1.0, t0=0.0, length=r.uniform(0.3, 0.7))
            else:
                c = _wavy(r)
            c["hw"] = r.uniform(_THIN_HALF_WIDTH[0], _THIN_HALF_WIDTH[1])
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

