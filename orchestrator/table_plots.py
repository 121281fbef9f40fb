"""The table's figures: learning curves per row (mean over seeds ± 1 std) and bars per row (mean ± std, the paper's
number as a marker), one bar chart per table column where the spec has columns. Saved atomically (save_figure)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd


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
