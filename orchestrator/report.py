"""report.html: one self-contained page per run folder that a reviewer can trust without opening anything else.

One HTML file, no server, no network: CSS inline, every figure a base64 PNG in the page (the same PNGs are in
plots/). Sections, top to bottom: the table with its statistics (orchestrator.stats), figures (bars, curves of
every row with its seed band, per-class IoU by row as a heat map, the RL diagnostics by row), the cells (failed,
reused and stopped-early marked, each with its rerun line), what each row changes against the base, the
environment (env.json).

`write_report(run_dir, summary, trials, epochs, meta, plots)` draws the report's own figures into plots/ and writes
report.html; it reads spec.resolved.yaml and env.json from the run folder when they are there.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import tables
from orchestrator.controls import control_note, has_control

from orchestrator.report_figures import class_iou_matrix, diagnostic_columns, draw_figures, final_epochs


CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:16px 24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #d0d7de;padding:3px 8px;
vertical-align:top}th{background:#f6f8fa;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}tr.best td{background:#fff8c5}tr.failed td{background:#ffebe9}tr.reused td{background:#ddf4ff}
tr.early td{background:#fbefff}code,pre{font:12px ui-monospace,Menlo,Consolas,monospace}pre{background:#f6f8fa;
padding:8px;overflow-x:auto}figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#59636e;font-size:12px}.muted{color:#59636e}.tag{display:inline-block;padding:0 6px;
border-radius:8px;font-size:12px;margin-right:4px}.t-failed{background:#ffcecb}.t-reused{background:#b6e3ff}
.t-early{background:#ecd8ff}.t-inert{background:#ffd8b5}nav a{margin-right:12px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px;align-items:start}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 2) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return tables.DASH
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return tables.DASH if math.isnan(v) else f"{v:.{digits}f}"


def _interval(low: float, high: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return tables.DASH
    return f"[{tables.fmt_delta(low).lstrip('+')}, {tables.fmt_delta(high).lstrip('+')}]"   # no "-0.00"


def _seeds(value: float) -> str:
    if not np.isfinite(value):
        return "> 10000" if value == math.inf else tables.DASH
    return str(int(value))


def _table(header: list[str], body: list[list[str]], classes: list[str] | None = None, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless `raw` (the caller built them); numbers right-aligned."""
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, cells in enumerate(body):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        tds = []
        for c in cells:
            text = c if raw else _e(c)
            numeric = bool(re.fullmatch(r"[−+\-<>\[\]0-9., ∞±—%]+", str(c)))
            tds.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    return "\n".join(out) + "</tbody></table>"


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{_e(path.stem)}"><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)} <span class=\"muted\">(plots/{_e(path.name)})</span></figcaption></figure>")


def summary_section(summary: pd.DataFrame, trials: pd.DataFrame, metric: str) -> str:
    ref = tables._reference_name(summary)
    header = ["row", "n", f"{metric} mean ± std", "95% CI of mean", f"Δ vs {ref}", "95% CI of Δ",
              f"P(improve over {ref})", "p Welch", "p Holm", "paper", "paper Δ", "seeds needed", "failed", "reused",
              "stopped early"]
    control = has_control(summary)
    if control:     # did the reward matter: each RL row against the spurious-reward control row
        header[7:7] = ["Δ vs control", "p vs control (Holm)"]
    body, classes = [], []
    paper_of = dict(zip(summary["row"], summary["paper"]))
    refs = summary["reference"] if "reference" in summary else summary["row"].iloc[:1].reindex(summary.index).ffill()
    for i, (line, ref_row) in enumerate(zip(summary.itertuples(index=False), refs)):
        sel = trials["row"] == line.row if "row" in trials else pd.Series(dtype=bool)
        reused = int(trials.loc[sel, "reused"].fillna(False).astype(bool).sum()) if "reused" in trials else 0
        early = int(trials.loc[sel, "stopped_early"].fillna(False).astype(bool).sum()) if "stopped_early" in trials else 0
        label = _e(line.row) + (' <span class="tag t-inert" title="RL term inert">RL inert †</span>'
                                if line.rl_inert else "")
        if line.pending:
            label += f' <span class="tag t-failed">not run: {_e(line.pending)}</span>'
        body.append([label, str(int(line.n)), _e(tables.fmt_mean_std(line.mean, line.std, int(line.n))),
                     _interval(line.ci_low, line.ci_high), tables.fmt_delta(line.delta),
                     _interval(line.delta_ci_low, line.delta_ci_high), _num(line.p_improve),
                     tables.fmt_p(line.p_welch), tables.fmt_p(line.p_holm),
                     *([tables.fmt_delta(line.delta_control), tables.fmt_p(line.p_control)] if control else []),
                     _e(tables.fmt_paper(line.paper, line.paper_std)),
                     tables.DASH if ref_row == line.row else tables.fmt_delta(line.paper - paper_of[ref_row]), _seeds(line.seeds_needed), str(int(line.failed)),
                     str(reused), str(early)])
        classes.append("best" if line.best else "")
    tested = int(summary["p_welch"].notna().sum())
    baseline = tables.reference_note(summary) or f"Baseline: the first row, {ref}"
    notes = (f"<p class=\"muted\">{_e(baseline)}. 95% CIs: percentile bootstrap of the mean over "
             f"seeds (scipy.stats.bootstrap, 9999 resamples, seed 0; Δ: each row resampled on its own). "
             f"P(improve): P(X &gt; Y) over all seed pairs, ties half (rliable). p Welch: two-sided Welch t-test vs "
             f"{_e(ref)}; p Holm: adjusted over the {tested} row(s) tested. Seeds needed: seeds per row for a "
             f"two-sided two-sample t-test (α 0.05, power 0.8) to detect the paper's Δ at the pooled std of the row "
             f"and {_e(ref)} (noncentral t). Highlighted: best mean."
             + (f" {_e(control_note(summary))}" if control else "") + "</p>")
    return _table(header, body, classes, raw=True) + notes + columns_section(summary)


def columns_section(summary: pd.DataFrame) -> str:
    """The spec's further columns (orchestrator.columns): each column's mean ± std, Δ vs the row's reference and the
    paper's number, per row; empty without columns."""
    names = tables.spec_columns(summary)
    if not names:
        return ""
    header = ["row"] + [f"{n} {what}" for n in names for what in ("mean ± std", "Δ", "paper")]
    body = []
    for rec in summary.to_dict("records"):
        cells = [_e(rec["row"])]
        for n in names:
            k = tables.column_keys(n)
            cells += [_e(tables.fmt_mean_std(rec[k["mean"]], rec[k["std"]], int(rec[k["n"]]))),
                      tables.fmt_delta(rec[k["delta"]]), _e(tables.fmt_paper(rec[k["paper"]]))]
        body.append(cells)
    return "<h3>Columns</h3>" + _table(header, body, raw=True)


def cells_section(trials: pd.DataFrame, metric: str) -> str:
    """Every cell: status and marks, the metric, epochs, wall time, error, and the line that reruns it."""
    header = ["row", "seed", "status", metric, "epochs", "wall s", "device", "note", "rerun"]
    body, classes = [], []
    order = trials.sort_values(["row_index", "seed"]) if {"row_index", "seed"} <= set(trials.columns) else trials
    for rec in order.to_dict("records"):
        marks, cls = [], ""
        if rec.get("status") != "ok":
            marks.append('<span class="tag t-failed">failed</span>')
            cls = "failed"
        if rec.get("reused") is True:
            marks.append('<span class="tag t-reused">reused</span>')
            cls = cls or "reused"
        if rec.get("stopped_early") is True:
            marks.append('<span class="tag t-early">stopped early</span>')
            cls = cls or "early"
        note = []
        if rec.get("error"):
            note.append(_e(rec["error"]))
        if rec.get("reused") is True and rec.get("source_run"):
            note.append("from run " + _e(rec["source_run"]))
        rerun = rec.get("rerun_command")
        body.append([_e(rec.get("row")), _e(rec.get("seed")), _e(rec.get("status")) + " " + " ".join(marks),
                     _num(rec.get(metric)), _e(rec.get("epochs")), _num(rec.get("wall_s"), 1), _e(rec.get("device") or ""),
                     "; ".join(note), f"<code>{_e(rerun)}</code>" if isinstance(rerun, str) and rerun else tables.DASH])
        classes.append(cls)
    counts = {k: int(v) for k, v in (("failed", (trials.get("status") != "ok").sum()),
                                      ("reused", trials.get("reused", pd.Series(dtype=object)).eq(True).sum()),
                                      ("stopped early", trials.get("stopped_early", pd.Series(dtype=object)).eq(True).sum()))}
    summary_line = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"<p>{len(trials)} cells: {summary_line}.</p>" + _table(header, body, classes, raw=True)


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for k, v in config.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changes_section(resolved: dict[str, Any] | None) -> str:
    """Per row, the keys it changes against the base: base value -> row value. The base value of a key is read
    from a row that keeps it (spec.resolved.yaml has the rows' configs, not the base's)."""
    if not resolved:
        return '<p class="muted">spec.resolved.yaml is not in this run folder.</p>'
    rows = resolved.get("rows") or []
    flats = [_flat(r.get("config") or {}) for r in rows]
    body = []
    for r, flat in zip(rows, flats):
        changes = r.get("changes") or {}
        if not changes:
            body.append([_e(r.get("name")), "<i>(the base config)</i>", "", ""])
        for key, value in changes.items():
            keepers = [f for other, f in zip(rows, flats) if key not in (other.get("changes") or {}) and key in f]
            base = json.dumps(keepers[0][key]) if keepers else "(every row sets it)"
            body.append([_e(r.get("name")), f"<code>{_e(key)}</code>", _e(base), _e(json.dumps(value, default=str))])
    for p in resolved.get("pending") or []:
        body.append([_e(p.get("name")), f"<i>not run: {_e(p.get('reason'))}</i>", "",
                     _e(json.dumps(p.get("set"), default=str))])
    spec = resolved.get("spec") or {}
    head = (f"<p>Base: <code>{_e(spec.get('base'))}</code>; profile: <code>{_e(resolved.get('profile'))}</code>; "
            f"overrides for every row: <code>{_e(resolved.get('overrides') or [])}</code></p>")
    return head + _table(["row", "key", "base", "row"], body, raw=True)


def environment_section(env: dict[str, Any] | None) -> str:
    if not env:
        return '<p class="muted">env.json is not in this run folder.</p>'
    device = ("CUDA: " + ", ".join(map(str, env.get("cuda_devices") or []))) if env.get("cuda") else "CPU only"
    rows = [["code version", env.get("code_version")],
            ["git sha", f"{env.get('git_sha')}" + (" (dirty, diff sha256 " + str(env.get("git_diff_sha256")) + ")"
                                                   if env.get("git_dirty") else "")],
            ["device", f"{device}; {env.get('cpu_count')} CPUs; host {env.get('host')}"],
            ["python / platform", f"{env.get('python')} / {env.get('platform')}"],
            ["ray address", env.get("ray_address")],
            ["command", " ".join(map(str, env.get("argv") or []))]]
    rows += [[f"package {k}", v] for k, v in (env.get("packages") or {}).items()]
    body = [[_e(k), f"<code>{_e(v)}</code>"] for k, v in rows]
    return _table(["", ""], body, raw=True) + f"<details><summary>env.json</summary><pre>{_e(json.dumps(env, indent=2))}</pre></details>"


def diagnostics_table(epochs: pd.DataFrame, rows: list[dict]) -> str:
    columns = diagnostic_columns(epochs)
    if not columns:
        return '<p class="muted">No RL diagnostics in epochs.parquet (no RL rows, or none reported them).</p>'
    last = final_epochs(epochs)
    means = last.groupby("row")[columns].mean(numeric_only=True).reindex([r["name"] for r in rows])
    body = [[_e(name)] + [_num(v, 4) for v in means.loc[name]] for name in means.index]
    return ("<p class=\"muted\">Last epoch, mean over seeds.</p>" +
            _table(["row"] + columns, body, raw=True))


def render_html(summary: pd.DataFrame, trials: pd.DataFrame, epochs: pd.DataFrame, meta: dict[str, Any],
                figures: list[tuple[Path, str]], resolved: dict[str, Any] | None, env: dict[str, Any] | None,
                run_name: str, notes: list[str] = ()) -> str:
    metric = meta["metric"]
    title = meta.get("title") or meta.get("spec") or run_name
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ok, total = int((trials.get("status") == "ok").sum()), len(trials)
    matrix = class_iou_matrix(epochs, meta["rows"])
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} — rlseg report</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class=\"muted\">spec <code>{_e(meta.get('spec'))}</code> · run <code>{_e(run_name)}</code> · "
        f"paper: {_e(meta.get('paper') or tables.DASH)} · metric <code>{_e(metric)}</code> "
        f"({_e(meta.get('mode', 'max'))}) · {ok}/{total} cells ok · rendered {stamp}</p>",
        '<nav><a href="#table">table</a><a href="#figures">figures</a><a href="#classes">per-class IoU</a>'
        '<a href="#rl">RL diagnostics</a><a href="#cells">cells</a><a href="#changes">row changes</a>'
        '<a href="#env">environment</a></nav>',
        '<h2 id="table">Table</h2>', summary_section(summary, trials, metric),
    ]
    inert = tables.inert_warnings(summary)
    if inert or notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in [*inert, *notes]) + "</ul>")
    parts.append('<h2 id="figures">Figures</h2><div class="pair">')
    parts += [_image(p, caption) for p, caption in figures if p.stem.startswith(("bars_", "curves_"))]
    parts.append("</div>")
    parts += [_image(p, caption) for p, caption in figures if p.stem.startswith("seeds_")]
    parts.append('<h2 id="classes">Per-class IoU by row</h2>')
    heat = [f for f in figures if f[0].stem == "class_iou"]
    parts.append(_image(*heat[0]) if heat else '<p class="muted">No val/IoU/&lt;class&gt; columns in epochs.parquet.</p>')
    if matrix.shape[1]:
        parts.append(_table(["row"] + [str(c) for c in matrix.columns],
                            [[_e(r)] + [_num(v, 1) for v in matrix.loc[r]] for r in matrix.index], raw=True))
    parts.append('<h2 id="rl">RL diagnostics by row</h2>')
    parts += [_image(p, caption) for p, caption in figures if p.stem == "rl_diagnostics"]
    parts.append(diagnostics_table(epochs, meta["rows"]))
    parts += ['<h2 id="cells">Cells</h2>', cells_section(trials, metric),
              '<h2 id="changes">What each row changes against the base</h2>', changes_section(resolved),
              '<h2 id="env">Environment</h2>', environment_section(env), "</body></html>"]
    return "\n".join(parts) + "\n"


CAPTIONS = {"bars_": "mean ± std per row, the paper's number as a red diamond",
            "curves_": "learning curves: mean over seeds ± 1 std",
            "seeds_": "each row's seeds, mean and seed range",
            "class_iou": "per-class IoU by row (last epoch, mean over seeds)",
            "rl_diagnostics": "RL diagnostics by row (mean over seeds per epoch)"}


def _read(path: Path, parse) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def write_report(run_dir: Path, summary: pd.DataFrame, trials: pd.DataFrame, epochs: pd.DataFrame,
                 meta: dict[str, Any], plots: list[Path]) -> tuple[Path, list[Path]]:
    """Draw the report's figures into plots/ and write report.html; returns (report path, the new plots)."""
    import yaml

    from orchestrator import results

    own = draw_figures(run_dir, summary, epochs, meta)
    figures = [(p, next((c for k, c in CAPTIONS.items() if p.stem.startswith(k)), p.stem)) for p in [*plots, *own]]
    resolved = _read(run_dir / "spec.resolved.yaml", yaml.safe_load)
    env = _read(run_dir / "env.json", json.loads)
    text = render_html(summary, trials, epochs, meta, figures, resolved if isinstance(resolved, dict) else None,
                       env if isinstance(env, dict) else None, run_dir.name, notes=meta.get("notes") or [])
    path = run_dir / "report.html"
    results.write_atomic(path, text)
    return path, own


def table_json(summary: pd.DataFrame) -> str:
    """The summary as JSON records, NaN as null and ±inf (seeds_needed beyond reach) as the string "inf"."""
    records = []
    for rec in summary.to_dict("records"):
        out = {}
        for k, v in rec.items():
            if isinstance(v, (float, np.floating)):
                v = None if math.isnan(v) else ("inf" if math.isinf(v) else float(v))
            elif isinstance(v, np.bool_):
                v = bool(v)
            elif isinstance(v, np.integer):
                v = int(v)
            out[k] = v
        records.append(out)
    return json.dumps(records, indent=1, ensure_ascii=False) + os.linesep
