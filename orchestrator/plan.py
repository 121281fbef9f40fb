"""The trial matrix of a Plan, as `--dry-run` prints it."""
from __future__ import annotations

import contextlib
import json
import logging
import os

from orchestrator.spec import Plan, SearchPlan, SpecError
from trainers.config import recipe_line


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


def _papers(plan: Plan, row) -> str:
    """The row's paper number, or one per table column (a / b / c) when the spec has columns."""
    if not plan.columns:
        return _paper(row.paper, row.paper_std)
    return " / ".join(_paper(row.papers.get(c["name"]), None) for c in plan.columns)


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
        *([f"columns: {', '.join(c['name'] + ' = ' + c['metric'] for c in plan.columns)}"] if plan.columns else []),
        "",
    ]
    table = [("#", "row", "method", "trial", "changes vs base",
              "paper" + (f" ({' / '.join(c['name'] for c in plan.columns)})" if plan.columns else ""))]
    lines_by_index = {}
    for r in plan.rows:
        res = r.config["resources"]
        where = (f"{res['workers']}x{res['cpus_per_worker']:g} CPU" + (f"+{res['gpus_per_worker']:g} GPU" if res["gpus_per_worker"] else "")
                 if trial_path(r.config) == "torch_trainer" else "in-process")
        lines_by_index[r.index] = (str(r.index), r.name, r.config["method"]["name"], where, _changes(r.changes),
                                   _papers(plan, r))
    for p in plan.pending:
        lines_by_index[p.index] = (str(p.index), p.name, "—", "PENDING", f"not runnable yet: {p.reason} [{p.error}]",
                                   _papers(plan, p))
    table += [lines_by_index[i] for i in sorted(lines_by_index)]
    lines = _table(table)
    tail = [
        "",
        *_model_lines(plan),
        *_base_lines(plan.base_config),
        f"max concurrent trials (local): {max_concurrent or default_max_concurrent(plan, os.cpu_count() or 1)}",
        "dry run: nothing started, nothing written",
    ]
    return "\n".join(head + lines + tail)


def _model_lines(plan: Plan) -> list[str]:
    """Each row's model built without weights on the meta device (trainers.methods.summary): its parameter counts.
    A model that does not build is a SpecError naming the row. A dataset this machine cannot read (a cluster's, with
    --address) leaves its rows' class count, and so their models, unknown here."""
    from orchestrator.preflight import _Datasets, _DataProblem
    from trainers.methods.summary import model_summary

    datasets, built, lines = _Datasets(), {}, ["models (built without weights: parameters):"]
    for r in plan.rows:
        key = json.dumps({k: r.config[k] for k in ("data", "model", "method")}, sort_keys=True)
        if key not in built:
            try:
                classes = datasets.get(r.config["data"])[1]()
            except _DataProblem:
                built[key] = "not built here (its dataset is read where the trials run)"
            else:
                try:
                    with _quiet_loggers():
                        built[key] = model_summary(r.config, len(classes))
                except Exception as e:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise SpecError(f"{plan.path}: rows[{r.index}] ({r.name}): the model does not build: "
                                    f"{type(e).__name__}: {first}") from None
        lines.append(f"  {r.name}: {built[key]}")
    return lines + [""]


@contextlib.contextmanager
def _quiet_loggers():
    """Libraries' warnings while a model is built without weights ('No pretrained weights loaded') stay out of the
    dry run: the missing weights are the point."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _base_lines(base: dict) -> list[str]:
    """The base config in one line, and for data read from disk the recipe's switches in a second."""
    from orchestrator.preflight import GENERATED

    return [_base_line(base)] + ([] if base["data"]["name"] in GENERATED else [recipe_line(base)])


def _base_line(base: dict) -> str:
    return (f"base: data={base['data']['name']} ({base['data']['image_size']}px, {base['data']['train_size'] or 'all'} "
            f"train / {base['data']['val_size'] or 'all'} val), model={base['model']['encoder']}+"
            f"{base['model']['decoder']}, method={base['method']['name']}, epochs={base['schedule']['epochs']}, "
            f"batch={base['schedule']['batch_size']}, lr={base['schedule']['lr']:g}")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(line[i]) for line in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render_search_plan(plan: SearchPlan, max_concurrent: int | None = None) -> str:
    from orchestrator.sweep import fitting_trials

    spec = plan.spec
    sched = spec.scheduler
    n_confirm = (spec.confirm.top_k + 1) * len(spec.confirm.seeds)
    head = [
        f"{spec.name}: {spec.title}" if spec.title else spec.name,
        f"spec: {plan.path}" + (f"   paper: {spec.paper}" if spec.paper else ""),
        f"profile: {plan.profile or 'embedded (default)'}   overrides: {' '.join(plan.overrides) or '(none)'}",
        f"metric: {spec.metric.name} ({spec.metric.mode})"
        + (f"   objectives: {', '.join(f'{o.name} ({o.mode})' for o in spec.objectives)}" if spec.objectives else "")
        + f"   search space: {plan.space_path} ({len(plan.params)} parameters)",
        f"search: {spec.num_samples} trials, training seed {spec.trial_seed}, sampler {spec.sampler.kind.upper()} "
        f"(seed {spec.sampler.seed}, {spec.sampler.n_startup_trials} random first), scheduler {sched.kind}"
        + (f" (grace period {sched.grace_period} epochs, reduction factor {sched.reduction_factor:g}, "
           f"max {plan.epochs} epochs)" if sched.kind == "asha" else ""),
        f"confirm: the {'Pareto configs (up to ' if spec.objectives else 'top '}{spec.confirm.top_k}"
        f"{')' if spec.objectives else ' configs'} and the base config x seeds {_seeds(spec.confirm.seeds)} "
        f"= {'up to ' if spec.objectives else ''}{n_confirm} trials",
        "",
    ]
    lines = _table([("parameter", "distribution", "base value")]
                   + [(p.key, p.describe(), str(_get(plan.base_config, p.key))) for p in plan.params])
    slots = max_concurrent or fitting_trials([plan.search_config] * spec.num_samples, os.cpu_count() or 1)
    tail = ["", *_base_lines(plan.base_config)]
    if plan.search_config["schedule"]["eval_every"] != plan.base_config["schedule"]["eval_every"]:
        tail.append("search trials evaluate every epoch (the searcher and the scheduler read the metric each epoch)")
    tail += [f"max concurrent trials (local): {slots}", "dry run: nothing started, nothing written"]
    return "\n".join(head + lines + tail)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree
