"""Command line: rlseg-sweep (run or --dry-run a spec) and rlseg-table (re-render a run's table).

Exit codes: 0 every trial ok; 1 some trial failed (summary printed); 2 bad input (one line, nothing written).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other input error
        from orchestrator.spec import one_line   # an argument may hold a newline; show it escaped

        self.exit(EXIT_BAD_INPUT, f"{self.prog}: command line: {one_line(message)} (see --help)\n")


def _sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rlseg-sweep",
        description="Run an ablation spec (rows x seeds), or a search spec (an Optuna search, then its top configs "
                    "over seeds), as Ray Tune trials, each a Ray Train TorchTrainer; log to MLflow; write Parquet "
                    "and a mean ± std table under results/.",
        epilog="example: rlseg-sweep ablations/loss.yaml schedule.epochs=3 --max-concurrent 2")
    p.add_argument("spec", nargs="?", help="an ablation spec, e.g. ablations/loss.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides applied to every row before the row's own `set`")
    p.add_argument("--profile", help="a profile of the spec (default: the embedded default)")
    p.add_argument("--dry-run", action="store_true", help="print the trial matrix and exit; starts nothing")
    p.add_argument("--address", help="Ray cluster address (e.g. auto or ray://head:10001); "
                   "default: $RAY_ADDRESS if set, else a new local Ray")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs fit)")
    p.add_argument("--results-dir", default="results", help="results root (default: ./results)")
    p.add_argument("--rerun", action="store_true",
                   help="train every cell, even those that finished in an earlier run of this spec with the same "
                        "config, seed and code version (by default those are reused)")
    p.add_argument("--fill", metavar="RUN_DIR",
                   help="rerun only the failed or missing cells of that run folder of this spec (its own profile and "
                        "overrides) and re-render its table")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue an interrupted run of this spec (default: its newest unfinished run folder) "
                        "with its own profile and overrides; finished trials are not run again")
    p.add_argument("--pending-timeout", type=_seconds, metavar="S",
                   help="end the sweep (exit 2, the run folder resumable) when a trial has waited S seconds for "
                        "resources the cluster cannot give it; 'none' waits for ever (default: 120 on a local Ray, "
                        "none with --address, where an autoscaler may add nodes)")
    p.add_argument("--debug-skip-plan-check", action="store_true",
                   help="for tests: skip the plan check that runs before Ray starts (resources, data, batch size, ...)")
    p.add_argument("--list", action="store_true", help="list the shipped ablations, presets and registered names")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: Tune's status tables; -vv: also the workers' logs")
    return p


def _seconds(text: str) -> float:
    """--pending-timeout: seconds, or 'none' (inf: wait for ever)."""
    if text.strip().lower() == "none":
        return float("inf")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0 or 'none', got {text!r}")
    return value


def _pending_timeout(value: float | None) -> float | None | str:
    """What session() takes: "default" (not given), None (never), or seconds."""
    if value is None:
        return "default"
    return None if value == float("inf") else value


def sweep_main(argv: list[str] | None = None) -> int:
    args = _sweep_parser().parse_intermixed_args(argv)
    if args.list:
        return _list()
    if not args.spec:
        print("rlseg-sweep: a spec is required, e.g. rlseg-sweep ablations/loss.yaml (see --list)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.max_concurrent is not None and args.max_concurrent < 1:
        print("command line: --max-concurrent: expected a whole number >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT

    from orchestrator.spec import SearchPlan, SpecError, resolve

    resume = None
    if args.fill and args.resume:
        print("rlseg-sweep: command line: give --fill or --resume, not both", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.resume or args.fill:
            resume, plan = _resumable(args, "--fill" if args.fill else "--resume")
        else:
            plan = resolve(args.spec, profile=args.profile, overrides=args.overrides)
    except SpecError as e:
        print(f"rlseg-sweep: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    search = isinstance(plan, SearchPlan)
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if not args.debug_skip_plan_check:
        from orchestrator.preflight import check_plan

        try:   # before Ray starts, in a dry run too: what would hang or fail later is one line now
            check_plan(plan, results_root=Path(args.results_dir), address=address)
        except SpecError as e:
            print(f"rlseg-sweep: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.dry_run:
        from orchestrator.plan import render_plan, render_search_plan

        try:       # the rows' models are built (without weights) for the plan: one that does not build is bad input
            print((render_search_plan if search else render_plan)(plan, max_concurrent=args.max_concurrent))
        except SpecError as e:
            print(f"rlseg-sweep: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if address:
            print(f"resources: checked against the cluster at {address} when the sweep joins it")
        return EXIT_OK

    from orchestrator.tracking import ui_command

    if search:
        from orchestrator.search import run_search as run
    else:
        from orchestrator.sweep import run_sweep as run
    try:
        out = run(plan, results_root=Path(args.results_dir), address=args.address,
                  max_concurrent=args.max_concurrent, verbose=1 + args.verbose, resume=resume, reuse=not args.rerun,
                  pending_timeout=_pending_timeout(args.pending_timeout), **({"fill": True} if args.fill else {}))
    except SpecError as e:   # settings Ray rejects once joined (--address), before the run folder is written
        print(f"rlseg-sweep: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if out.stalled:
        print(f"rlseg-sweep: {out.stalled}; what finished is kept in {out.run_dir} (continue with: rlseg-sweep "
              f"{args.spec} --resume {out.run_dir} --results-dir {args.results_dir})", file=sys.stderr)
        return EXIT_BAD_INPUT
    if out.interrupted:
        print(f"\ninterrupted; what finished is kept in {out.run_dir}. Continue with:\n"
              f"  rlseg-sweep {args.spec} --resume {out.run_dir} --results-dir {args.results_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print(out.markdown)
    print()
    print(f"results: {out.run_dir}   (rerun one cell exactly: rlseg-rerun {out.run_dir} ROW SEED)")
    if out.tracking_offline:
        print(f"mlflow:  {out.tracking_uri} was unreachable; log this run there later with: rlseg-sync {out.run_dir}")
    else:
        print(f"mlflow:  {ui_command(out.tracking_uri)}")
    if out.failed:
        print(f"\n{len(out.failed)} of {out.trials} trials failed:", file=sys.stderr)
        for r in out.failed:
            print(f"  {r['row']} | seed {r['seed']}: {r['error']}", file=sys.stderr)
        return EXIT_TRIALS_FAILED
    return EXIT_OK


def _resumable(args, flag: str = "--resume"):
    """(run folder, plan) for --resume / --fill: the run's own profile and overrides, and the spec must resolve as it
    did; the run's --max-concurrent unless one is given. --fill takes a finished run too (it reruns the failed and
    missing cells)."""
    import yaml

    from orchestrator import results
    from orchestrator.spec import SpecError, load_spec, resolve

    if args.profile or args.overrides:
        raise SpecError(f"command line: {flag} takes the run's own --profile and overrides; give neither")
    name = load_spec(args.spec).name
    wanted = args.resume if flag == "--resume" else args.fill
    if wanted == "latest":
        try:
            runs = results.unfinished_runs(Path(args.results_dir), name)
        except (OSError, ValueError, AttributeError) as e:   # a damaged run.json: not JSON, not UTF-8, not a mapping
            raise SpecError(f"command line: {flag}: a run folder under {args.results_dir}/{name}/ cannot be read "
                            f"({e.__class__.__name__}: {e})") from None
        if not runs:
            raise SpecError(f"command line: {flag}: no unfinished run of {name!r} under {args.results_dir}/{name}/")
        run_dir = runs[0]
    else:
        run_dir = Path(wanted)
    state = _run_file(run_dir, results.RUN_STATE, results.read_state, flag)
    if not state:
        raise SpecError(f"command line: {flag}: {run_dir} is not a run folder of rlseg-sweep (no run.json)")
    profile, overrides = (state.get("profile"), state.get("overrides") or []) if isinstance(state, dict) else (0, 0)
    if not (isinstance(profile, (str, type(None))) and isinstance(overrides, list)
            and all(isinstance(o, str) for o in overrides)):
        raise SpecError(f"command line: {flag}: {run_dir / results.RUN_STATE}: not as rlseg-sweep writes it "
                        f"(a mapping with a profile name and a list of overrides)")
    if flag == "--fill" and state.get("kind") == "search":
        raise SpecError(f"command line: --fill: {run_dir} is a search run; --fill refills ablation runs "
                        f"(an interrupted search continues with --resume)")
    stored = state.get("max_concurrent")
    if args.max_concurrent is None and isinstance(stored, int) and not isinstance(stored, bool) and stored >= 1:
        args.max_concurrent = stored        # as many trials at a time as the run had, unless given anew
    if state.get("phase") == "done" and flag == "--resume":
        raise SpecError(f"command line: {flag}: {run_dir} finished; nothing to resume (rlseg-table re-renders it)")
    plan = resolve(args.spec, profile=profile, overrides=overrides)
    def what(resolved: dict) -> dict:   # everything but the paths as typed (a resume may run from another folder)
        return {k: v for k, v in resolved.items() if k not in ("spec_path", "space_path")}

    before = _run_file(run_dir, "spec.resolved.yaml", lambda d: yaml.safe_load((d / "spec.resolved.yaml").read_text()),
                       flag)
    if not (isinstance(before, dict) and isinstance(before.get("spec"), dict)):
        raise SpecError(f"command line: {flag}: {run_dir / 'spec.resolved.yaml'}: not as rlseg-sweep writes it")
    if before["spec"].get("name") != name:
        raise SpecError(f"command line: {flag}: {run_dir} is a run of {before['spec'].get('name')!r}, not {name!r}")
    if what(before) != what(yaml.safe_load(yaml.safe_dump(plan.resolved(), sort_keys=False))):
        raise SpecError(f"{args.spec}: the spec (or a preset it uses) changed since {run_dir} started; "
                        f"resuming would mix two configurations (start a new run instead)")
    return run_dir, plan


def _run_file(run_dir: Path, name: str, read, flag: str = "--resume"):
    """read(run_dir), with a missing or damaged file of the run folder as a SpecError (one line)."""
    import yaml

    from orchestrator.spec import SpecError

    try:
        return read(run_dir)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise SpecError(f"command line: {flag}: {run_dir / name} cannot be read ({e.__class__.__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def table_main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="rlseg-table",
                                description="Re-render table.md/.csv/.tex/.json, plots and report.html of a results folder from its "
                                            "Parquet files.")
    p.add_argument("run_dir", help="results/<spec>/<run>/")
    p.add_argument("--metric", help="another metric column of trials.parquet (default: the spec's)")
    args = p.parse_args(argv)

    from orchestrator import results
    from orchestrator.sweep import render_tables

    run_dir = Path(args.run_dir)
    try:
        trials, epochs, meta = results.read_run(run_dir)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"rlseg-table: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.metric:
        if args.metric not in trials.columns:
            known = ", ".join(c for c in trials.columns if c.startswith(("val/", "train/")))
            print(f"rlseg-table: {run_dir}: --metric: no column {args.metric!r} (columns: {known})", file=sys.stderr)
            return EXIT_BAD_INPUT
        meta = {**meta, "metric": args.metric}
    _, md, _, _ = render_tables(run_dir, trials, epochs, meta)
    print(md)
    print(f"\nwritten: {run_dir / 'table.md'} (.csv, .tex, .json), {run_dir / 'plots'}/ and {run_dir / 'report.html'}")
    return EXIT_OK


def _list() -> int:
    from orchestrator.spec import preset_names
    from trainers.registry import DATASETS, DECODERS, ENCODERS, METHODS, load_all

    load_all()
    specs = sorted(Path("ablations").glob("*.yaml")) if Path("ablations").is_dir() else []
    print("ablations: " + (", ".join(str(s) for s in specs) or "(none in ./ablations)"))
    print("presets:   " + ", ".join(preset_names()))
    for reg in (METHODS, DATASETS, ENCODERS, DECODERS):
        print(f"{reg.kind + 's:':<10} " + ", ".join(reg.names()))
    return EXIT_OK
