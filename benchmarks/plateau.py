"""Does each shipped embedded spec train its baseline row to a plateau? A table of unconverged rows compares learning
speed, not methods.

    python benchmarks/plateau.py                      # every baseline row below, seeds 0 and 1
    python benchmarks/plateau.py --only clip_rl --seeds 0,1,2,3,4
    python benchmarks/plateau.py --epochs 2 --only reward   # a smoke run (the figure then means nothing)

For each (spec, row) below: the row's resolved config (the spec's embedded default), trained in process once per seed
(two processes side by side, one thread each, as a trial runs), and the mean over seeds of its metric per epoch. The
plateau figure is the gain over the last quarter of the epochs: mean[E] - mean[E - E // 4] (the criterion: < 1.0
point). Continual rows: the curve of the first step only (its own epochs), the step every later one starts from.
Numbers, not assertions (tests/test_embedded_plateau.py asserts the supervised row's).
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (spec, baseline row, metric): the rows every other row of the table is read against
BASELINES = [
    ("reward", "FCN", "val/mIoU"),
    ("clip_rl", "decoder only", "val/mIoU"),
    ("clip_rl", "+ curriculum", "val/mIoU"),
    ("seg_r1", "SFT only (ground-truth prompts)", "val/S_measure"),
    ("continual", "5-3 / 15-5 / 100-50: fine-tune", "val/mIoU"),
]


def row_config(spec: str, row: str, overrides: list[str]) -> dict:
    from orchestrator.spec import resolve
    plan = resolve(REPO / "ablations" / f"{spec}.yaml", None, overrides)
    return next(r.config for r in plan.rows if r.name == row)


def first_step_epochs(config: dict) -> int | None:
    """The first step's epoch count of a continual task (its recipe), None otherwise."""
    if not (config.get("continual") or {}).get("task"):
        return None
    from trainers.config import Config
    from trainers.continual.loop import step_epochs
    return step_epochs(Config.model_validate(config))[0]


def curve(args: tuple[dict, str]) -> tuple[list[float], float]:
    """(the metric per epoch, seconds) of one seed's fit; a top-level function: it runs in a worker process."""
    config, metric = args
    import torch
    torch.set_num_threads(1)
    from trainers.loop import fit
    out: list[float] = []
    t0 = time.perf_counter()
    first = first_step_epochs(config)
    fit(config, lambda m, s: out.append(float(m[metric])) if metric in m else None)
    return (out[:first] if first else out), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--only", default=None, help="one spec name (reward, clip_rl, seg_r1, continual)")
    p.add_argument("--epochs", type=int, default=None, help="schedule.epochs override (smoke runs)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    overrides = [f"schedule.epochs={a.epochs}"] if a.epochs else []
    import numpy as np
    for spec, row, metric in BASELINES:
        if a.only and spec != a.only:
            continue
        config = row_config(spec, row, overrides)
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(curve, [({**config, "seed": s}, metric) for s in seeds]))
        mean = np.mean([c for c, _ in runs], axis=0)
        e = len(mean)
        gain = mean[-1] - mean[e - e // 4 - 1] if e >= 4 else float("nan")
        print(f"{spec} / {row}: {metric} {np.round(mean, 2).tolist()}")
        print(f"  plateau: {gain:+.2f} over the last {e // 4} of {e} epochs ({'on' if gain < 1.0 else 'NOT on'} "
              f"its plateau); {np.mean([t for _, t in runs]):.0f} s per seed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
