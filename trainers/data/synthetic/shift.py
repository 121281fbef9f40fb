"""Shifted domains of the synthetic surgical scenes (data.shift): the same scenes and labels seen through another
camera, for cross-domain evaluation (paper 002 Table 4: trained on daytime Cityscapes, tested on Dark Zurich and
Nighttime Driving). Three terms, each with a strength in [0, 1] (0: off), applied in the order light meets the sensor:

    colour cast   a white-balance error: per-channel gains toward a cool (LED / xenon) illuminant, against the red
                  tissue the model learnt; luminance kept (Rec. 601 weights), so the cast changes hue, not brightness
    low light     I_low = beta * I ** gamma (Lv et al., IJCV 2021, "Attention guided low-light image enhancement", the
                  linear + gamma darkening of their synthetic low-light pairs): gamma up to 1 + 2 s, beta down to 1 - 0.6 s
    sensor noise  the Poissonian-Gaussian model of raw sensor data (Foi et al., IEEE TIP 2008): y = x + sqrt(a x + b^2) n,
                  n ~ N(0, 1), signal-dependent shot noise a = 0.012 s and read noise b = 0.03 s (image in [0, 1])

Deterministic from (seed, index): per-image jitter of the cast and the darkening from default_rng([seed, index,
TAG]) (the same at every size, as a scene's layout), the noise from default_rng([seed, index, size, TAG]). The
unshifted image is untouched (the shift is applied to the rendered uint8 image), so data.shift off renders the
same bytes as before.
"""
from __future__ import annotations

import numpy as np

_SHIFT_TAG = 0x5A1F7   # the shift's own SeedSequence streams, apart from the scene's

# log gains of the cool illuminant at strength 1 (R down, B up), before the luminance correction
_CAST_LOG_GAINS = np.log(np.array([0.70, 1.05, 1.35], dtype=np.float64))
_LUMA = np.array([0.299, 0.587, 0.114])


def shift_seed(seed: int, index: int) -> list[int]:
    """The entropy of a scene's shift stream ([seed, index] as render.py keys its scene, plus the shift's tag)."""
    key = [seed] if seed >= 0 else [-seed, 1]     # SeedSequence wants non-negative entropy
    return [*key, index, _SHIFT_TAG]


def apply_shift(image: np.ndarray, shift, seed: int, index: int) -> np.ndarray:
    """One rendered image uint8 (3, H, W) -> the same scene in the shifted domain, uint8 (3, H, W).
    shift: trainers.config.ShiftConfig (low_light, noise, color_cast strengths)."""
    entropy = shift_seed(int(seed), int(index))
    jitter = np.random.default_rng(entropy).uniform(-1.0, 1.0, size=5)      # cast (3), gamma, beta
    x = image.astype(np.float32) * (1.0 / 255.0)
    if shift.color_cast > 0:
        log_g = shift.color_cast * (_CAST_LOG_GAINS + 0.1 * jitter[:3])
        gains = np.exp(log_g) / float(_LUMA @ np.exp(log_g))     # a grey pixel keeps its luminance
        x *= gains.astype(np.float32).reshape(3, 1, 1)
        np.clip(x, 0.0, 1.0, out=x)
    if shift.low_light > 0:
        gamma = 1.0 + 2.0 * shift.low_light * (1.0 + 0.1 * jitter[3])
        beta = 1.0 - 0.6 * shift.low_light * (1.0 + 0.1 * jitter[4])
        x = beta * np.power(x, np.float32(gamma))
    if shift.noise > 0:
        a, b = 0.012 * shift.noise, 0.03 * shift.noise
        n = np.random.default_rng([*entropy, image.shape[-1]]).standard_normal(x.shape, dtype=np.float32)
        x = x + np.sqrt(a * x + b * b) * n
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
