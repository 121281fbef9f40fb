"""Orchestration overhead: one trial bare (trainers.loop.fit) vs the same trial under Ray Tune + Ray Train.

    python benchmarks/overhead.py [--spec ablations/loss.yaml] [--row 0] [--epochs N] [key=value ...]

Prints the bare fit wall time, the trial's wall time inside an rlseg sweep (Tune trial -> TorchTrainer
-> worker, as recorded in trials.parquet), their ratio, the fixed per-trial start-up (the difference),
and the sweep's own fixed costs (ray.init, MLflow setup, tables). Also the in-process trial path
(resources.workers=0) for comparison. Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(REPO / "ablations" / "loss.yaml"))
    p.add_argument("--row", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import pandas as pd

    from orchestrator.spec import resolve
    from orchestrator.sweep import run_sweep
    from trainers.loop import fit

    overrides = list(args.overrides) + (["schedule.epochs=%d" % args.epochs] if args.epochs else []) + ["seeds=[0]"]
    plan = resolve(args.spec, overrides=overrides)
    row = plan.rows[args.row]
    plan.rows = [row]
    plan.trials = [t for t in plan.trials if t.row_index == row.index]
    config = plan.trials[0].config
    epochs = config["schedule"]["epochs"]
    print(f"config: {plan.spec.name} / {row.name}, seed 0, {epochs} epochs, "
          f"{config['data']['train_size']} train images of {config['data']['image_size']}px, "
          f"{config['model']['encoder']}+{config['model']['decoder']}, {os.cpu_count()} CPUs", flush=True)

    fit(dict(config, schedule=dict(config["schedule"], epochs=1)))  # warm imports and caches
    t0 = time.perf_counter()
    fit(config)
    bare = time.perf_counter() - t0
    print(f"bare trainers.loop.fit:              {bare:7.2f} s", flush=True)

    walls = {}
    for path, workers in (("torch_trainer", config["resources"]["workers"] or 1), ("in_process", 0)):
        cfg = dict(config, resources=dict(config["resources"], workers=workers))
        plan.trials[0].config = cfg
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            out = run_sweep(plan, results_root=Path(d), verbose=0)
            sweep_wall = time.perf_counter() - t0
            trials = pd.read_parquet(out.run_dir / "trials.parquet")
            assert trials["status"].eq("ok").all(), trials["error"].tolist()
            walls[path] = (float(trials["wall_s"].iloc[0]), sweep_wall)

    trial, sweep = walls["torch_trainer"]
    print(f"Tune trial -> TorchTrainer (1 worker): {trial:7.2f} s   ratio {trial / bare:5.2f}x   "
          f"fixed per-trial start-up {trial - bare:6.2f} s")
    print(f"  whole sweep of that one trial:       {sweep:7.2f} s   (+{sweep - trial:.2f} s ray.init, MLflow, tables)")
    trial0, sweep0 = walls["in_process"]
    print(f"Tune trial, in process (workers=0):    {trial0:7.2f} s   ratio {trial0 / bare:5.2f}x   "
          f"fixed per-trial start-up {trial0 - bare:6.2f} s")


if __name__ == "__main__":
    sys.exit(main())
