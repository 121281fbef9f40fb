"""Curriculum weights f(e) in [0, 1] for clip_rl (CLIP-RL Sec. III.B: f = (1 - e/E)^2).

The loss is L = f * L_seg(s_L) + (1 - f) * (L_seg(O) + lambda_RL * L_RL): f = 1 trains the decoder alone,
f = 0 the refined output and the agent alone. `epoch` is the 0-based current epoch e, `epochs` the total E;
e/E is clamped to [0, 1].
"""
from __future__ import annotations

import math

SHAPES = ("quadratic", "power", "linear", "cosine", "step", "constant")


def curriculum(shape: str, epoch: int | float, epochs: int, power: float = 2.0) -> float:
    """f(e) for a curriculum shape:

    quadratic  (1 - e/E)^2                     the paper's schedule
    power      (1 - e/E)^power
    linear     1 - e/E
    cosine     (1 + cos(pi e/E)) / 2
    step       1 for e < E/2, then 0
    constant   1 (no curriculum: the decoder alone, L = L_seg(s_L))
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    t = min(max(float(epoch) / epochs, 0.0), 1.0)
    if shape == "quadratic":
        return (1.0 - t) ** 2
    if shape == "power":
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        return (1.0 - t) ** power
    if shape == "linear":
        return 1.0 - t
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if shape == "step":
        return 1.0 if t < 0.5 else 0.0
    if shape == "constant":
        return 1.0
    raise ValueError(f"unknown curriculum shape {shape!r}; expected one of {', '.join(SHAPES)}")
