"""The trial matrix of a Plan, as `--dry-run` prints it."""
from __future__ import annotations

import os

from orchestrator.spec import Plan


def _seeds(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def _changes(changes: dict) -> str:
    return "; ".join(f"{k}={v}" for k, v in changes.items()) or "(base)"


def _paper(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:g}" + (f" ± {std:g}" if std is not None else "")


def render_plan(plan: Plan, max_concurrent: int | None = None) -> str:
    from orchestrator.sweep import default_max_concurrent, trial_path

    spec = plan.spec
    head = [
        f"{spec.name}: {spec.title}" if spec.title else spec.name,
        f"spec: {plan.path}" + (f"   paper: {spec.paper}" if spec.paper else ""),
        f"profile: {plan.profile or 'embedded (default)'}   overrides: {' '.join(plan.overrides) or '(none)'}",
        f"metric: {spec.metric.name} ({spec.metric.mode})   seeds: {_seeds(spec.seeds)}   "
        f"rows: {len(plan.rows)}" + (f" (+{len(plan.pending)} pending)" if plan.pending else "")
        + f"   trials: {len(plan.trials)}",
        "",
    ]
    table = [("#", "row", "method", "trial", "changes vs base", "paper")]
    lines_by_index = {}
    for r in plan.rows:
        res = r.config["resources"]
        where = (f"{res['workers']}x{res['cpus_per_worker']:g} CPU" + (f"+{res['gpus_per_worker']:g} GPU" if res["gpus_per_worker"] else "")
                 if trial_path(r.config) == "torch_trainer" else "in-process")
        lines_by_index[r.index] = (str(r.index), r.name, r.config["method"]["name"], where, _changes(r.changes),
                                   _paper(r.paper, r.paper_std))
    for p in plan.pending:
        lines_by_index[p.index] = (str(p.index), p.name, "—", "PENDING", f"not runnable yet: {p.reason} [{p.error}]",
                                   _paper(p.paper, p.paper_std))
    table += [lines_by_index[i] for i in sorted(lines_by_index)]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = plan.base_config
    tail = [
        "",
        f"base: data={base['data']['name']} ({base['data']['image_size']}px, {base['data']['train_size'] or 'all'} train / "
        f"{base['data']['val_size'] or 'all'} val), model={base['model']['encoder']}+{base['model']['decoder']}, "
        f"epochs={base['schedule']['epochs']}, batch={base['schedule']['batch_size']}, lr={base['schedule']['lr']:g}",
        f"max concurrent trials (local): {max_concurrent or default_max_concurrent(plan, os.cpu_count() or 1)}",
        "dry run: nothing started, nothing written",
    ]
    return "\n".join(head + lines + tail)
