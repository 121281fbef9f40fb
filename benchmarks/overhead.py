"""Orchestration overhead: one cell trained bare (trainers.loop.fit) vs the same cell as a trial of an rlseg sweep.

    python benchmarks/overhead.py [--spec ablations/reward.yaml] [--row 1] [--cells 4] [--epochs N] [key=value ...]

Prints, for one row of a spec (seed 0):
  * the bare fit wall time (after a warm-up fit, so imports and caches are paid);
  * the trial's wall time inside an rlseg sweep (from trials.parquet: Tune start to end as the recorder saw it), on
    the default path (`resources.trial_path: auto`: in process for one worker) and on a Ray Train TorchTrainer, with
    the ratio to bare and the fixed per-trial cost (the difference);
  * a sweep of `--cells` seeds of that row on the default path: its wall time against cells x bare / CPUs (what
    the cells cost with no orchestration at all, run as many at a time as there are CPUs).
Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]


def one_row(plan, row_index: int, seeds: list[int]):
    """The plan cut down to one row and these seeds."""
    plan = copy.deepcopy(plan)
    row = plan.rows[row_index]
    plan.rows = [row]
    plan.spec.seeds = seeds
    trial = next(t for t in plan.trials if t.row_index == row.index)
    plan.trials = []
    for seed in seeds:
        t = copy.deepcopy(trial)
        t.seed, t.config = seed, {**t.config, "seed": seed}
        plan.trials.append(t)
    return plan, row


def sweep_wall(plan, path: str) -> tuple[float, list[float]]:
    """Run the plan as a sweep with every cell on `path` (auto | torch_trainer): (sweep wall, trial walls)."""
    import pandas as pd

    from orchestrator.sweep import run_sweep

    for t in plan.trials:
        t.config = {**t.config, "resources": {**t.config["resources"], "trial_path": path}}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        out = run_sweep(plan, results_root=Path(d), verbose=0, reuse=False)
        wall = time.perf_counter() - t0
        trials = pd.read_parquet(out.run_dir / "trials.parquet")
        assert trials["status"].eq("ok").all(), trials["error"].tolist()
        return wall, [float(w) for w in trials["wall_s"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(REPO / "ablations" / "reward.yaml"))
    p.add_argument("--row", type=int, default=1)
    p.add_argument("--cells", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--skip-torch-trainer", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from orchestrator.spec import resolve
    from trainers.loop import fit

    overrides = list(args.overrides) + (["schedule.epochs=%d" % args.epochs] if args.epochs else [])
    plan = resolve(args.spec, overrides=overrides)
    single, row = one_row(plan, args.row, [0])
    config = single.trials[0].config
    cpus = os.cpu_count() or 1
    print(f"config: {plan.spec.name} / {row.name}, seed 0, {config['schedule']['epochs']} epochs, "
          f"{config['data']['train_size']} train images of {config['data']['image_size']}px, batch "
          f"{config['schedule']['batch_size']}, {config['model']['encoder']}+{config['model']['decoder']}, "
          f"{config['method']['name']}, {cpus} CPUs", flush=True)

    fit(dict(config, schedule=dict(config["schedule"], epochs=1)))  # warm imports and caches
    t0 = time.perf_counter()
    fit(config)
    bare = time.perf_counter() - t0
    print(f"bare trainers.loop.fit:                 {bare:7.2f} s", flush=True)

    paths = ["auto"] + ([] if args.skip_torch_trainer else ["torch_trainer"])
    for path in paths:
        wall, (trial,) = sweep_wall(copy.deepcopy(single), path)
        name = "default path (in process)" if path == "auto" else "Ray Train TorchTrainer   "
        print(f"trial, {name}:  {trial:7.2f} s   trial / bare {trial / bare:5.2f}   fixed per-trial cost "
              f"{trial - bare:6.2f} s   (whole one-cell sweep {wall:.1f} s)", flush=True)

    if args.cells > 1:
        many, _ = one_row(plan, args.row, list(range(args.cells)))
        wall, trials = sweep_wall(many, "auto")
        ideal = args.cells * bare / cpus
        print(f"sweep of {args.cells} cells (default path): {wall:7.2f} s   against {args.cells} x bare / {cpus} CPUs = "
              f"{ideal:.2f} s   ratio {wall / ideal:5.2f}   (trial walls {min(trials):.1f}-{max(trials):.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
