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
import os
import re
import tempfile

import numpy as np
import pandas as pd
from scipy import stats

from orchestrator import stats as rowstats

STAT_COLUMNS = ["ci_low", "ci_high", "delta_ci_low", "delta_ci_high", "p_improve", "p_holm", "seeds_needed"]
SUMMARY_COLUMNS = ["row", "n", "mean", "std", "delta", "p_welch", "paper", "paper_std", "failed", "pending",
                   "rl_clipfrac", *STAT_COLUMNS, "rl_inert", "best"]
DASH = "—"
CLIPFRAC = "rl/clipfrac"
INERT_CLIPFRAC = 0.95      # a row's PPO term is inert when its clipfrac is at least this over its last half of epochs
INERT_MARK = "†"
P_HEADER = "p (Welch, Holm)"


# --------------------------------------------------------------------------- statistics


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Welch t-test p-value of samples a vs b; NaN when either has fewer than 2 values.

    scipy returns NaN when both samples have zero variance (t = x/0); seeds that all land on the
    same number are common for deterministic rows, so decide that case by the means instead.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _ok_values(trials: pd.DataFrame, metric: str, name: str) -> np.ndarray:
    """Finite metric values of the ok trials of one row (an ok trial without the metric has no value)."""
    if metric not in trials.columns:
        return np.array([], dtype=float)
    sel = (trials["row"] == name) & (trials["status"] == "ok")
    values = pd.to_numeric(trials.loc[sel, metric], errors="coerce").to_numpy(dtype=float)
    return values[np.isfinite(values)]


def late_clipfrac(epochs: pd.DataFrame | None, name: str) -> float:
    """Mean rl/clipfrac of one row over the last half of each of its trials' epochs (NaN without PPO figures)."""
    if epochs is None or CLIPFRAC not in epochs.columns or not len(epochs):
        return math.nan
    data = epochs.loc[epochs["row"] == name, ["trial_id", "epoch", CLIPFRAC]].dropna()
    if data.empty:
        return math.nan
    last = data.groupby("trial_id")["epoch"].transform("max")
    return float(data.loc[data["epoch"] > last / 2, CLIPFRAC].mean())


def summarize(trials: pd.DataFrame, metric: str, rows: list[dict], mode: str = "max",
              epochs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One line per spec row, in spec order.

    Columns: row, n (ok seeds with a value), mean, std (ddof=1; NaN when n < 2), delta (mean minus
    the first row's mean; NaN for the first row), p_welch (Welch t-test vs the first row; NaN for the
    first row or when either side has n < 2), paper and paper_std (NaN when absent), failed (failed
    trials), pending (why a row could not run, "" for a row that could), rl_clipfrac (the row's PPO clip
    fraction over the last half of its epochs, from ``epochs``; NaN without), rl_inert (rl_clipfrac >=
    INERT_CLIPFRAC: nearly every ratio left [1 - eps, 1 + eps], so L_Policy's gradient was mostly off and the
    row trained on L_seg and the KL pull), best (True on the single row with the best mean; ``mode`` is "max"
    or "min"), and orchestrator.stats.row_statistics's STAT_COLUMNS (ci_low ... seeds_needed).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"metric mode must be 'max' or 'min', got {mode!r}")
    values = [_ok_values(trials, metric, r["name"]) for r in rows]
    ref = values[0] if values else np.array([])
    ref_mean = ref.mean() if len(ref) else math.nan

    lines = []
    for i, (spec_row, v) in enumerate(zip(rows, values)):
        mean = v.mean() if len(v) else math.nan
        paper, paper_std = spec_row.get("paper"), spec_row.get("paper_std")
        lines.append({
            "row": spec_row["name"],
            "n": len(v),
            "mean": mean,
            "std": v.std(ddof=1) if len(v) >= 2 else math.nan,
            "delta": math.nan if i == 0 else mean - ref_mean,
            "p_welch": math.nan if i == 0 else welch_p(v, ref),
            "paper": math.nan if paper is None else float(paper),
            "paper_std": math.nan if paper_std is None else float(paper_std),
            "failed": int(((trials["row"] == spec_row["name"]) & (trials["status"] == "failed")).sum()),
            "pending": spec_row.get("pending") or "",
            "rl_clipfrac": late_clipfrac(epochs, spec_row["name"]),
        })
    summary = pd.DataFrame(lines, columns=SUMMARY_COLUMNS[:SUMMARY_COLUMNS.index("rl_clipfrac") + 1])
    summary = summary.astype({"row": object, "n": int, "failed": int,
                              "mean": float, "std": float, "delta": float, "p_welch": float, "paper": float,
                              "paper_std": float, "pending": object, "rl_clipfrac": float})
    extra = rowstats.row_statistics(values, list(summary["paper"]), mode)
    for column in STAT_COLUMNS:
        summary[column] = np.asarray(extra[column], dtype=float) if len(summary) else np.array([], dtype=float)
    summary["rl_inert"] = summary["rl_clipfrac"].to_numpy() >= INERT_CLIPFRAC     # NaN compares False

    best = np.zeros(len(summary), dtype=bool)
    means = summary["mean"]
    if means.notna().any():
        best[(means.idxmax() if mode == "max" else means.idxmin())] = True
    summary["best"] = best
    return summary


def inert_warnings(summary: pd.DataFrame) -> list[str]:
    """One line per row whose RL term was inert (summarize's rl_inert)."""
    return [f"row {line.row!r}: the RL term was inert (rl/clipfrac {line.rl_clipfrac:.2f} >= {INERT_CLIPFRAC} over "
            f"the last half of its epochs): L_Policy's gradient was mostly off, the row trained on L_seg and the KL "
            f"pull; see method.loss.ratio_level" for line in summary.itertuples(index=False) if line.rl_inert]


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
    return f"{paper:.1f}" + (f" ± {std:.2f}" if np.isfinite(std) else "")


def _reference_name(summary: pd.DataFrame) -> str:
    return str(summary["row"].iloc[0]) if len(summary) else "first row"


def _row_label(line) -> str:
    """The row name, marked when its RL term was inert."""
    return str(line.row) + (f" {INERT_MARK}" if getattr(line, "rl_inert", False) else "")


def _cells(line) -> list[str]:
    """The human-formatted cells of one summary line, in table column order after the row name."""
    return [
        str(int(line.n)),
        fmt_mean_std(line.mean, line.std, int(line.n)),
        fmt_delta(line.delta),
        fmt_p(line.p_holm),
        fmt_paper(line.paper, line.paper_std),
        str(int(line.failed)),
    ]


# --------------------------------------------------------------------------- renderers


def render_markdown(summary: pd.DataFrame, metric: str, title: str | None = None,
                    reused: int | None = None, notes: list[str] | None = None) -> str:
    """A GitHub pipe table, columns padded to equal width so it also reads well in a terminal; `notes` are
    listed under it."""
    header = ["row", "n", f"{metric} (mean ± std)", f"Δ vs {_reference_name(summary)}",
              P_HEADER, "paper", "failed"]
    body = [[_row_label(line)] + _cells(line) for line in summary.itertuples(index=False)]
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
        out += ["", f"{INERT_MARK} RL term inert: rl/clipfrac >= {INERT_CLIPFRAC} over the last half of the epochs "
                    "(L_Policy's gradient mostly off)"]
    if len(summary) > 1:
        out += ["", _escape_markdown(stats_footnote(summary))]
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
    """The summary as CSV: raw numbers at full precision (round-trips through pandas.read_csv)."""
    return summary[SUMMARY_COLUMNS].to_csv(index=False, lineterminator="\n")


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


def render_latex(summary: pd.DataFrame, metric: str, caption: str | None = None) -> str:
    """A booktabs tabular (wrapped in a table float when a caption is given); best mean in bold."""
    header = ["Row", "$n$", f"{latex_escape(metric)} (mean $\\pm$ std)",
              f"$\\Delta$ vs {latex_escape(_reference_name(summary))}", "$p$ (Welch, Holm)", "Paper", "Failed"]
    out = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
           " & ".join(header) + r" \\", r"\midrule"]
    for line in summary.itertuples(index=False):
        cells = [_latex_cell(c) for c in _cells(line)]
        if bool(line.best):
            cells[1] = rf"\textbf{{{cells[1]}}}"
        out.append(" & ".join([latex_escape(_row_label(line)).replace(INERT_MARK, r"$^\dagger$")] + cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out = [r"\begin{table}[t]", r"\centering", *out,
               rf"\caption{{{latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def save_figure(fig, path: str | os.PathLike) -> None:
    """Save to a temporary file beside `path`, then rename: a reader never sees a half-written PNG."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plot_curves(epochs: pd.DataFrame, metric: str, rows: list[dict], path: str | os.PathLike) -> None:
    """Learning curve per spec row: mean over seeds vs epoch, shaded ±1 std where >= 2 seeds report."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, spec_row in enumerate(rows):
            color = colors[i % len(colors)]
            name = spec_row["name"]
            data = pd.DataFrame()
            if metric in epochs.columns and len(epochs):
                data = epochs.loc[epochs["row"] == name, ["epoch", metric]].dropna()
            if data.empty:
                ax.plot([], [], color=color, label=f"{name} (no data)")
                continue
            per_epoch = data.groupby("epoch")[metric].agg(["mean", "std"]).sort_index()
            x = per_epoch.index.to_numpy(dtype=float)
            mean, std = per_epoch["mean"].to_numpy(), per_epoch["std"].to_numpy()  # std NaN with 1 seed
            ax.plot(x, mean, color=color, marker="o" if len(x) == 1 else None, label=name)
            band = np.isfinite(std)
            if band.any():
                ax.fill_between(x, mean - std, mean + std, where=band, color=color, alpha=0.2,
                                linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean over seeds ± 1 std")
        ax.grid(True, alpha=0.3)
        if rows:
            ax.legend(fontsize="small")
        save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_bars(summary: pd.DataFrame, metric: str, path: str | os.PathLike) -> None:
    """One bar per row: mean with ±1 std error bars, the paper's number as a marker where present."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(summary) + 2), 4.5))
    try:
        x = np.arange(len(summary))
        mean = summary["mean"].to_numpy(dtype=float)
        std = np.nan_to_num(summary["std"].to_numpy(dtype=float))
        paper = summary["paper"].to_numpy(dtype=float)
        has_mean, has_paper = np.isfinite(mean), np.isfinite(paper)
        best = summary["best"].to_numpy(dtype=bool) if "best" in summary else np.zeros(len(x), bool)

        ax.bar(x[has_mean], mean[has_mean], yerr=std[has_mean], capsize=4,
               error_kw={"ecolor": "dimgray"}, color=np.where(best[has_mean], "tab:orange", "tab:blue"), label="ours (mean ± std)")
        if has_paper.any():
            ax.scatter(x[has_paper], paper[has_paper], marker="D", color="tab:red", edgecolor="white", zorder=3,
                       label="paper")
        for xi in x[~has_mean]:  # at the foot of the axes, whatever the y range
            ax.text(xi, 0.02, "no data", transform=ax.get_xaxis_transform(), ha="center",
                    fontsize="small", color="gray")

        # Ablation rows differ by a point or two: zoom the y axis onto the numbers being compared.
        ends = np.concatenate([(mean - std)[has_mean], (mean + std)[has_mean], paper[has_paper]])
        if len(ends):
            lo, hi = float(ends.min()), float(ends.max())
            pad = 0.25 * (hi - lo) if hi > lo else max(1.0, 0.05 * abs(hi))
            bottom = lo - pad
            if lo >= 0 and bottom < 0:
                bottom = 0.0
            ax.set_ylim(bottom, hi + pad)

        ax.set_xticks(x)
        ax.set_xticklabels([str(r) for r in summary["row"]], rotation=20 if len(x) > 3 else 0,
                           ha="right" if len(x) > 3 else "center")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per row")
        ax.grid(True, axis="y", alpha=0.3)
        if len(x):
            ax.legend(fontsize="small")
        save_figure(fig, path)
    finally:
        plt.close(fig)
