"""Ablation tables from a sweep: mean ± std per row over seeds, delta and Welch p vs the first row, and the
statistics of orchestrator.stats beside them (bootstrap CIs, probability of improvement, Holm, seeds needed).

`summarize` turns the per-trial results (``trials.parquet``) into one line per spec row; the
renderers turn that summary into ``table.md`` / ``table.csv`` / ``table.tex``; the plot helpers draw
learning curves from ``epochs.parquet`` and a bar chart of the summary.

The first spec row is the reference (row_index 0): every other row is compared with it. Trials are
matched to spec rows by row name. A row whose seeds all failed is still listed, with n = 0.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from orchestrator import stats as rowstats
from orchestrator.controls import control_columns, control_note, has_control
from orchestrator.stats import welch_p  # the one Welch test of the table (orchestrator.stats); tables.welch_p for callers
from orchestrator.columns import reference_indices

STAT_COLUMNS = ["ci_low", "ci_high", "delta_ci_low", "delta_ci_high", "p_improve", "p_holm", "seeds_needed"]
SUMMARY_COLUMNS = ["row", "n", "mean", "std", "delta", "p_welch", "paper", "paper_std", "failed", "pending",
                   "rl_clipfrac", "rl_grad_share_max", *STAT_COLUMNS, "rl_inert", "best", "reference", "delta_control",
                   "p_control"]
DASH = "—"
CLIPFRAC = "rl/clipfrac"
INERT_CLIPFRAC = 0.95      # a row's PPO term is inert when its clipfrac is at least this over its last half of epochs
GRAD_SHARE = "rl/grad_share"
INERT_GRAD_SHARE = 1e-3    # ... or when its rl/grad_share (trainers.grad_share) stays below this over that half
INERT_MARK = "†"
P_HEADER = "p (Welch, Holm)"


# --------------------------------------------------------------------------- statistics


def _ok_values(trials: pd.DataFrame, metric: str, name: str) -> np.ndarray:
    """Finite metric values of the ok trials of one row (an ok trial without the metric has no value)."""
    if metric not in trials.columns:
        return np.array([], dtype=float)
    sel = (trials["row"] == name) & (trials["status"] == "ok")
    values = pd.to_numeric(trials.loc[sel, metric], errors="coerce").to_numpy(dtype=float)
    return values[np.isfinite(values)]


def late_values(epochs: pd.DataFrame | None, name: str, column: str) -> pd.Series:
    """One row's values of an epochs.parquet column over the last half of each of its trials' epochs that have one
    (empty without)."""
    if epochs is None or column not in epochs.columns or not len(epochs):
        return pd.Series(dtype=float)
    data = epochs.loc[epochs["row"] == name, ["trial_id", "epoch", column]].dropna()
    if data.empty:
        return pd.Series(dtype=float)
    last = data.groupby("trial_id")["epoch"].transform("max")
    return data.loc[data["epoch"] > last / 2, column].astype(float)


def late_clipfrac(epochs: pd.DataFrame | None, name: str) -> float:
    """Mean rl/clipfrac of one row over the last half of each of its trials' epochs (NaN without PPO figures)."""
    values = late_values(epochs, name, CLIPFRAC)
    return float(values.mean()) if len(values) else math.nan


def late_grad_share_max(epochs: pd.DataFrame | None, name: str) -> float:
    """The largest rl/grad_share of one row over the last half of each of its trials' epochs: the share stays below
    a bound there iff this does (NaN without the figure: no policy, or no L_seg)."""
    values = late_values(epochs, name, GRAD_SHARE)
    return float(values.max()) if len(values) else math.nan


def summarize(trials: pd.DataFrame, metric: str, rows: list[dict], mode: str = "max",
              epochs: pd.DataFrame | None = None, columns: list[dict] | None = None) -> pd.DataFrame:
    """One line per spec row, in spec order.

    Columns: row, n (ok seeds with a value), mean, std (ddof=1; NaN when n < 2), delta (mean minus
    the reference row's mean: the row's `compare_to`, else the first row; NaN for a reference row), p_welch (Welch
    t-test vs the reference row; NaN for a reference row or when either side has n < 2), paper and paper_std (NaN
    when absent), failed (failed
    trials), pending (why a row could not run, "" for a row that could), rl_clipfrac (the row's PPO clip
    fraction over the last half of its epochs, from ``epochs``; NaN without), rl_grad_share_max (the largest
    rl/grad_share over that half; NaN without), rl_inert (rl_clipfrac >= INERT_CLIPFRAC: nearly every ratio left
    [1 - eps, 1 + eps], so L_Policy's gradient was mostly off and the row trained on L_seg and the KL pull; or
    rl_grad_share_max < INERT_GRAD_SHARE: the RL terms' gradient did not reach the segmentor's own weights),
    best (True on the single row with the best mean; ``mode`` is "max"
    or "min"), orchestrator.stats.row_statistics's STAT_COLUMNS (ci_low ... seeds_needed), reference (the row
    compared with), and for each of the spec's `columns` ({name, metric}, orchestrator.columns) `<name>: mean`,
    `<name>: std`, `<name>: delta` (vs the reference row) and `<name>: paper` (column_keys).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"metric mode must be 'max' or 'min', got {mode!r}")
    values = [_ok_values(trials, metric, r["name"]) for r in rows]
    refs = reference_indices(rows)

    lines = []
    for i, (spec_row, v) in enumerate(zip(rows, values)):
        mean = v.mean() if len(v) else math.nan
        ref = values[refs[i]]
        ref_mean = ref.mean() if len(ref) else math.nan
        paper, paper_std = spec_row.get("paper"), spec_row.get("paper_std")
        lines.append({
            "row": spec_row["name"],
            "n": len(v),
            "mean": mean,
            "std": v.std(ddof=1) if len(v) >= 2 else math.nan,
            "delta": math.nan if refs[i] == i else mean - ref_mean,
            "p_welch": math.nan if refs[i] == i else welch_p(v, ref),
            "paper": math.nan if paper is None else float(paper),
            "paper_std": math.nan if paper_std is None else float(paper_std),
            "failed": int(((trials["row"] == spec_row["name"]) & (trials["status"] == "failed")).sum()),
            "pending": spec_row.get("pending") or "",
            "rl_clipfrac": late_clipfrac(epochs, spec_row["name"]),
            "rl_grad_share_max": late_grad_share_max(epochs, spec_row["name"]),
        })
    summary = pd.DataFrame(lines, columns=SUMMARY_COLUMNS[:SUMMARY_COLUMNS.index("rl_grad_share_max") + 1])
    summary = summary.astype({"row": object, "n": int, "failed": int,
                              "mean": float, "std": float, "delta": float, "p_welch": float, "paper": float,
                              "paper_std": float, "pending": object, "rl_clipfrac": float, "rl_grad_share_max": float})
    extra = rowstats.row_statistics(values, list(summary["paper"]), mode, refs=refs)
    for column in STAT_COLUMNS:
        summary[column] = np.asarray(extra[column], dtype=float) if len(summary) else np.array([], dtype=float)
    summary["rl_inert"] = ((summary["rl_clipfrac"].to_numpy() >= INERT_CLIPFRAC)      # NaN compares False
                           | (summary["rl_grad_share_max"].to_numpy() < INERT_GRAD_SHARE))

    best = np.zeros(len(summary), dtype=bool)
    means = summary["mean"]
    if means.notna().any():
        best[(means.idxmax() if mode == "max" else means.idxmin())] = True
    summary["best"] = best
    summary["reference"] = pd.Series([rows[j]["name"] for j in refs], dtype=object)
    for key, column_values in control_columns(rows, values).items():    # Δ and p against the spec's control row
        summary[key] = np.asarray(column_values, dtype=float)
    for column in columns or []:
        per_row = [_ok_values(trials, column["metric"], r["name"]) for r in rows]
        col_means = np.array([v.mean() if len(v) else math.nan for v in per_row])
        keys = column_keys(column["name"])
        summary[keys["mean"]] = col_means
        summary[keys["std"]] = [v.std(ddof=1) if len(v) >= 2 else math.nan for v in per_row]
        summary[keys["n"]] = [len(v) for v in per_row]
        summary[keys["delta"]] = [math.nan if refs[i] == i else col_means[i] - col_means[refs[i]]
                                  for i in range(len(rows))]
        summary[keys["paper"]] = [float((r.get("papers") or {}).get(column["name"], math.nan)) for r in rows]
    return summary


def column_view(summary: pd.DataFrame, name: str) -> pd.DataFrame:
    """One spec column's statistics under the names the bar chart reads (mean, std, paper, best, row)."""
    keys = column_keys(name)
    view = pd.DataFrame({"row": summary["row"], "mean": summary[keys["mean"]], "std": summary[keys["std"]],
                         "paper": summary[keys["paper"]]})
    best = np.zeros(len(view), dtype=bool)
    if view["mean"].notna().any():
        best[view["mean"].idxmax()] = True
    view["best"] = best
    return view


def column_keys(name: str) -> dict[str, str]:
    """The summary's column names of one spec column: `<name>: mean`, `: std`, `: n`, `: delta`, `: paper`."""
    return {stat: f"{name}: {stat}" for stat in ("mean", "std", "n", "delta", "paper")}


def spec_columns(summary: pd.DataFrame) -> list[str]:
    """The names of the spec columns a summary holds, in order."""
    return [c[:-len(": mean")] for c in summary.columns if isinstance(c, str) and c.endswith(": mean")]


def inert_warnings(summary: pd.DataFrame) -> list[str]:
    """One line per row and reason whose RL term was inert (summarize's rl_inert)."""
    out = []
    for line in summary.itertuples(index=False):
        if line.rl_clipfrac >= INERT_CLIPFRAC:
            out.append(f"row {line.row!r}: the RL term was inert (rl/clipfrac {line.rl_clipfrac:.2f} >= "
                       f"{INERT_CLIPFRAC} over the last half of its epochs): L_Policy's gradient was mostly off, the "
                       f"row trained on L_seg and the KL pull; see method.loss.ratio_level")
        if getattr(line, "rl_grad_share_max", math.nan) < INERT_GRAD_SHARE:
            out.append(f"row {line.row!r}: the RL term was inert (rl/grad_share at most {line.rl_grad_share_max:.2g} "
                       f"< {INERT_GRAD_SHARE:g} over the last half of its epochs): the RL terms' gradient did not "
                       f"reach the segmentor's own weights, which trained on L_seg alone; see "
                       f"method.policy.detach_state, method.loss.element_reduction")
    return out


# --------------------------------------------------------------------------- human formatting


def fmt_mean_std(mean: float, std: float, n: int) -> str:
    if n == 0 or not np.isfinite(mean):
        return DASH
    if n == 1 or not np.isfinite(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def fmt_delta(delta: float) -> str:
    if not np.isfinite(delta):
        return DASH
    text = f"{delta:+.2f}"
    return "+0.00" if text == "-0.00" else text


def fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return DASH
    if p < 0.001:
        return "<0.001"
    return f"{p:#.3g}"  # 3 significant digits, keeping trailing zeros: 1.00, 0.500, 0.0123


def fmt_paper(paper: float, std: float = math.nan) -> str:
    if not np.isfinite(paper):
        return DASH
    # mIoU-like numbers as the papers print them (78.5); scores in [0, 1] (Seg-R1's S-measure .873) to 3 digits
    text = f"{paper:.1f}" if abs(paper) >= 10 or paper == round(paper, 1) else f"{paper:.3g}"
    return text + (f" ± {std:.2f}" if np.isfinite(std) else "")


def _reference_name(summary: pd.DataFrame) -> str:
    """The row every Δ is against, or "reference" when rows name their own (compare_to)."""
    if not len(summary):
        return "first row"
    first = str(summary["row"].iloc[0])
    if "reference" in summary and (summary["reference"].astype(str) != first).any():
        return "reference"
    return first


def reference_note(summary: pd.DataFrame) -> str | None:
    """'Δ and p against: B vs A, C vs A, E vs D' when rows name their references (compare_to)."""
    if _reference_name(summary) != "reference":
        return None
    pairs = [f"{r} vs {ref}" for r, ref in zip(summary["row"], summary["reference"]) if r != ref]
    return "Δ and p of each row against its reference row: " + ", ".join(pairs)


def _row_label(rec: dict) -> str:
    """The row name, marked when its RL term was inert."""
    return str(rec["row"]) + (f" {INERT_MARK}" if rec.get("rl_inert", False) else "")


def _layout(summary: pd.DataFrame, metric: str, columns: list[dict] | None) -> tuple[list[str], list[list[str]], int]:
    """(header, the cells of each row after its name, the position of the spec metric's mean among the cells).

    Without spec columns: n, the metric's mean ± std, Δ, p, paper, failed. With them: each column's mean ± std in
    place of the metric's (the metric keeps its own column only if no spec column shows it), the other columns' Δ
    against the row's reference in parentheses as the papers print gains ("19.29 ± 1.63 (+1.76)"), and one paper
    cell "a / b / c" in column order."""
    names = [c["name"] for c in columns or [] if f"{c['name']}: mean" in summary]
    metric_column = next((c["name"] for c in columns or [] if c["metric"] == metric and c["name"] in names), None)
    means = [f"{n} (mean ± std)" for n in names]
    if metric_column is None:
        means = [f"{metric} (mean ± std)"] + means
    delta = f"Δ vs {_reference_name(summary)}" if metric_column is None else \
        f"Δ {metric_column} vs {_reference_name(summary)}"
    paper = "paper" if not names else "paper (" + " / ".join(([] if metric_column else [metric]) + names) + ")"
    control = has_control(summary)
    header = ["n", *means, delta, P_HEADER, *(["Δ vs control", "p vs control"] if control else []), paper, "failed"]
    body = []
    for rec in summary.to_dict("records"):
        n = int(rec["n"])
        own = [] if metric_column else [fmt_mean_std(rec["mean"], rec["std"], n)]
        own += [fmt_mean_std(rec[f"{c}: mean"], rec[f"{c}: std"], int(rec[f"{c}: n"]))
                + ("" if c == metric_column or not np.isfinite(rec[f"{c}: delta"]) else f" ({fmt_delta(rec[f'{c}: delta'])})")
                for c in names]
        papers = [] if metric_column else [fmt_paper(rec["paper"], rec["paper_std"])]
        papers += [fmt_paper(rec[f"{c}: paper"], rec["paper_std"] if c == metric_column else math.nan) for c in names]
        vs_control = [fmt_delta(rec["delta_control"]), fmt_p(rec["p_control"])] if control else []
        body.append([str(n), *own, fmt_delta(rec["delta"]), fmt_p(rec["p_holm"]), *vs_control, " / ".join(papers),
                     str(int(rec["failed"]))])
    primary = 1 + (names.index(metric_column) if metric_column else 0)
    return header, body, primary


# --------------------------------------------------------------------------- renderers


def render_markdown(summary: pd.DataFrame, metric: str, title: str | None = None,
                    reused: int | None = None, notes: list[str] | None = None,
                    columns: list[dict] | None = None) -> str:
    """A GitHub pipe table, columns padded to equal width so it also reads well in a terminal; `notes` are
    listed under it. `columns`: the spec's table columns ({name, metric}; summarize's)."""
    header, cells, _ = _layout(summary, metric, columns)
    header = ["row", *header]
    body = [[_row_label(rec)] + c for rec, c in zip(summary.to_dict("records"), cells)]
    header = [_escape_markdown(h) for h in header]
    body = [[_escape_markdown(c) for c in cells] for cells in body]

    left = [True] + [False] * (len(header) - 1)  # row names left, numbers right
    # At least three hyphens in every delimiter cell ("---", "---:"), as GitHub's examples have it.
    widths = [max(3 if lft else 4, len(h), *(len(cells[j]) for cells in body))
              for j, (h, lft) in enumerate(zip(header, left))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * w) if lft else ("-" * (w - 1) + ":")
                             for w, lft in zip(widths, left)) + " |"
    out = []
    if title:
        out += [f"### {title}", ""]
    out += [line(header), rule] + [line(cells) for cells in body]
    pending = [(line.row, line.pending) for line in summary.itertuples(index=False) if line.pending]
    if pending:
        out += [""] + [f"- {_escape_markdown(str(row))}: not run ({_escape_markdown(why)})" for row, why in pending]
    if reused is not None:
        out += ["", f"{reused} cell{'' if reused == 1 else 's'} reused from earlier runs"]
    if "rl_inert" in summary and summary["rl_inert"].any():
        out += ["", f"{INERT_MARK} RL term inert over the last half of the epochs: rl/clipfrac >= {INERT_CLIPFRAC} "
                    f"(L_Policy's gradient mostly off) or rl/grad_share < {INERT_GRAD_SHARE:g} (the RL terms' gradient "
                    "does not reach the segmentor's weights)"]
    if len(summary) > 1:
        out += ["", _escape_markdown(stats_footnote(summary))]
    if reference_note(summary):
        out += ["", _escape_markdown(reference_note(summary))]
    if control_note(summary):
        out += ["", _escape_markdown(control_note(summary))]
    if notes:
        out += [""] + [f"- {_escape_markdown(n)}" for n in notes]
    return "\n".join(out) + "\n"


def stats_footnote(summary: pd.DataFrame) -> str:
    """Which test and correction the p column is, and where the other statistics are."""
    tested = int(summary["p_welch"].notna().sum())
    return (f"{P_HEADER}: two-sided Welch t-test of each row vs {_reference_name(summary)}, Holm-adjusted over the "
            f"{tested} row{'' if tested == 1 else 's'} tested. 95% bootstrap CIs of each mean and Δ, P(improvement) "
            "and seeds needed: table.csv / table.json / report.html")


def _escape_markdown(text: str) -> str:
    # A literal pipe would split the cell.
    return text.replace("|", "\\|")


def render_csv(summary: pd.DataFrame) -> str:
    """The summary as CSV: raw numbers at full precision (round-trips through pandas.read_csv), the spec columns'
    statistics after the fixed ones."""
    extra = [c for c in summary.columns if c not in SUMMARY_COLUMNS]
    return summary[SUMMARY_COLUMNS + extra].to_csv(index=False, lineterminator="\n")


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_LATEX_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIALS))


def latex_escape(text: str) -> str:
    return _LATEX_RE.sub(lambda m: _LATEX_SPECIALS[m.group()], str(text))


def _latex_cell(text: str) -> str:
    # The human formats use Unicode (±, —) and bare signs; spell them so pdflatex accepts them.
    if text == DASH:
        return "--"
    text = text.replace(" ± ", r" $\pm$ ")
    if text.startswith("<"):
        text = "$<$" + text[1:]
    if text.startswith("-"):
        text = "$-$" + text[1:]
    return text


def _latex_header(text: str) -> str:
    return (latex_escape(text).replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
            .replace(P_HEADER, "$p$ (Welch, Holm)"))


def render_latex(summary: pd.DataFrame, metric: str, caption: str | None = None,
                 columns: list[dict] | None = None) -> str:
    """A booktabs tabular (wrapped in a table float when a caption is given); best mean in bold."""
    header, body, primary = _layout(summary, metric, columns)
    header = ["Row", "$n$"] + [(lambda t: t[0].upper() + t[1:])(_latex_header(h)) for h in header[1:]]
    out = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
           " & ".join(header) + r" \\", r"\midrule"]
    for rec, row_cells in zip(summary.to_dict("records"), body):
        cells = [" / ".join(_latex_cell(part) for part in c.split(" / ")) for c in row_cells]
        if bool(rec["best"]):
            cells[primary] = rf"\textbf{{{cells[primary]}}}"
        out.append(" & ".join([latex_escape(_row_label(rec)).replace(INERT_MARK, r"$^\dagger$")] + cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out = [r"\begin{table}[t]", r"\centering", *out,
               rf"\caption{{{latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(out) + "\n"
