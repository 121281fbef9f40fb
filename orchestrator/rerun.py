"""rlseg-rerun RUN_DIR ROW SEED: train one cell of a finished run again, exactly, and say whether it matches.

The cell's config comes from the run's trials.parquet (config_json, the resolved config the trial trained); its
manifest (git sha, uncommitted-diff hash, code version, package versions, device, determinism flags) from the
run's env.json and the trial row. A single-worker cell is retrained in this process with trainers.loop.fit (the
computation its Ray Train worker ran, without Ray); a multi-worker cell goes through Ray as a one-cell sweep.
On CPU the final metrics must match exactly; any difference is printed.

Exit codes: 0 the metric matches; 1 it does not (or the rerun failed); 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

EXIT_MATCH, EXIT_DIFFERS, EXIT_BAD_INPUT = 0, 1, 2


def rerun_command(run_dir: Path, row: str, seed: int) -> str:
    """The one line (shell-quoted) that reruns a cell; trials.parquet carries it per cell."""
    import shlex

    return f"rlseg-rerun {shlex.quote(str(run_dir))} {shlex.quote(row)} {seed}"


def find_cell(run_dir: Path, row: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the trial record, the run's metadata) of (row, seed); ValueError with one line if there is none."""
    from orchestrator import results

    trials, _, meta = results.read_run(run_dir)
    hits = trials[(trials["row"] == row) & (trials["seed"] == seed)]
    if hits.empty:
        cells = sorted({f"{r!r}" for r in trials["row"]})
        raise ValueError(f"{run_dir}: no cell ({row!r}, seed {seed}); rows: {', '.join(cells)}")
    return results.records(hits)[0], meta


def _compare(old: dict[str, Any], new: dict[str, float], metric: str) -> tuple[bool, list[str]]:
    keys = sorted(k for k in new if k.startswith(("val/", "train/")) and isinstance(old.get(k), float))
    lines, same = [], True
    for k in keys:
        a, b = old[k], float(new[k])
        equal = a == b or (math.isnan(a) and math.isnan(b))
        same &= equal or k != metric
        if k == metric or not equal:
            lines.append(f"  {k}: recorded {a!r}, rerun {b!r}" + ("" if equal else f" (diff {b - a:+.3g})"))
    return same, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rlseg-rerun", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="results/<spec>/<run>/")
    p.add_argument("row", help="the row name, as in the table")
    p.add_argument("seed", type=int)
    args = p.parse_args(argv)

    from orchestrator import results

    run_dir = Path(args.run_dir)
    try:
        rec, meta = find_cell(run_dir, args.row, args.seed)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"rlseg-rerun: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not rec.get("config_json"):    # a search trial whose sampled values its search config rejected
        print(f"rlseg-rerun: cell ({args.row!r}, seed {args.seed}) of {run_dir} has no config to train: "
              f"{rec.get('error') or 'none was recorded'}", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = json.loads(rec["config_json"])
    metric = meta.get("metric", "val/mIoU")
    env_file = next((d / "env.json" for d in (run_dir, run_dir.parent) if (d / "env.json").is_file()), None)
    env = json.loads(env_file.read_text()) if env_file else {}   # a search's search/ folder: the run's env.json
    now_sha = results.git_info(Path(__file__).resolve().parent)
    print(f"cell ({args.row!r}, seed {args.seed}) of {run_dir}: status {rec['status']}, cell key {rec.get('cell_key')}")
    print(f"  recorded with git {env.get('git_sha')} (diff {env.get('git_diff_sha256') or 'clean'}), "
          f"code {rec.get('code_version') or '?'}; now git {now_sha['git_sha']}, code {results.code_version()}")
    if rec.get("code_version") and rec["code_version"] != results.code_version():
        print("  note: the trainers code differs from the run's; an exact match is not expected", flush=True)

    if config["resources"]["workers"] <= 1:
        from trainers.loop import fit

        new = fit(config)
    else:
        new = _rerun_with_ray(config, run_dir, args.row)
        if new is None:
            print("rlseg-rerun: the rerun failed (see above)", file=sys.stderr)
            return EXIT_DIFFERS
    same, lines = _compare(rec, new, metric)
    print("\n".join(lines))
    print(f"{metric}: {'matches exactly' if same else 'DIFFERS'}")
    return EXIT_MATCH if same else EXIT_DIFFERS


def _rerun_with_ray(config: dict[str, Any], run_dir: Path, row: str) -> dict[str, float] | None:
    """A one-cell sweep (workers > 1 needs Ray Train's DDP) into <results root>/<spec>-rerun/, no cell reuse."""
    from orchestrator.spec import RowSpec, Spec, plan_rows
    from orchestrator.sweep import run_sweep

    spec = Spec(name=f"{run_dir.parent.name}-rerun", seeds=[config["seed"]], base=config, rows=[RowSpec(name=row)])
    plan = plan_rows(spec, run_dir / "spec.resolved.yaml", None, [], config)
    out = run_sweep(plan, results_root=run_dir.parent.parent, verbose=1, reuse=False)
    if out.failed:
        return None
    import pandas as pd

    trials = pd.read_parquet(out.run_dir / "trials.parquet")
    return {k: float(v) for k, v in trials.iloc[0].items() if k.startswith(("val/", "train/"))}
