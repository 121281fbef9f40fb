"""The embedded default trains to a plateau: the supervised row of every Latent-Space RL table (the supervised preset,
with the data and schedule the latent_rl preset shares) gains less than 1.0 mean val mIoU point over the last
quarter of its epochs. A learning-curve property, at two seeds instead of the tables' five; not a timing."""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from trainers.loop import fit

PRESETS = Path(__file__).resolve().parents[1] / "trainers" / "presets"


def test_latent_rl_preset_shares_the_supervised_data_and_schedule():
    sup, rl = (yaml.safe_load((PRESETS / f"{n}.yaml").read_text()) for n in ("supervised", "latent_rl"))
    assert sup["data"] == rl["data"] and sup["model"] == rl["model"]
    for key in ("epochs", "batch_size", "lr_schedule"):
        assert sup["schedule"][key] == rl["schedule"][key], key


def curve(tree: dict) -> list[float]:
    """val/mIoU per epoch of one fit (a top-level function: it runs in a worker process)."""
    out = []
    fit(tree, lambda m, s: out.append(m["val/mIoU"]))
    return out


def test_supervised_row_reaches_a_plateau():
    tree = yaml.safe_load((PRESETS / "supervised.yaml").read_text())
    epochs = tree["schedule"]["epochs"]
    # a trial trains on resources.cpus_per_worker = 1 thread: the two seeds run side by side, one process each
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        curves = list(pool.map(curve, [{**tree, "seed": seed} for seed in (0, 1)]))
    assert [len(c) for c in curves] == [epochs, epochs]
    mean = np.mean(curves, axis=0)
    start = epochs - epochs // 4                # the last quarter's training: epochs start + 1 .. epochs
    gain = mean[-1] - mean[start - 1]
    assert gain < 1.0, f"mean val mIoU by epoch {np.round(mean, 2).tolist()}: +{gain:.2f} over the last quarter"
    assert mean[-1] > mean[0] + 5, mean          # and it did learn
