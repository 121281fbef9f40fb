"""The figures of report.html beyond the table's own (orchestrator.table_plots): every row's curve with its seed band,
per-class IoU by row as a heat map, and the RL diagnostics by row; PNGs in plots/ that the report inlines."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import table_plots

CLASS_IOU = "val/IoU/"
# RL health by row, in the papers' words: reward terms, PPO clip fraction and KL (k3), KL to the reference policy,
# the modulation weight alpha and the policy's log sigma (002 Eq. 11-14), and how much of the segmentor's gradient the
# RL terms make (rl/grad_share, trainers.grad_share)
DIAGNOSTICS = (r"train/reward_.+", r"rl/reward(_.+)?", r"rl/clipfrac", r"rl/approx_kl", r"rl/kl_ref", r"rl/grad_share",
               r"train/alpha", r"train/log_sigma.*", r"train/sigma.*")


# --------------------------------------------------------------------------- figures


def class_iou_columns(epochs: pd.DataFrame) -> list[str]:
    return [c for c in epochs.columns if c.startswith(CLASS_IOU)]


def diagnostic_columns(epochs: pd.DataFrame) -> list[str]:
    """The epochs.parquet columns among DIAGNOSTICS that hold a number, in DIAGNOSTICS order."""
    out = []
    for pattern in DIAGNOSTICS:
        out += sorted(c for c in epochs.columns if re.fullmatch(pattern, c) and c not in out
                      and pd.to_numeric(epochs[c], errors="coerce").notna().any())
    return out


def final_epochs(epochs: pd.DataFrame) -> pd.DataFrame:
    """The last epoch row of each trial."""
    if epochs.empty:
        return epochs
    last = epochs.groupby("trial_id")["epoch"].transform("max")
    return epochs[epochs["epoch"] == last]


def class_iou_matrix(epochs: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """Rows x classes: mean over seeds of each trial's last-epoch val/IoU/<class> (NaN where a row has none)."""
    columns = class_iou_columns(epochs)
    last = final_epochs(epochs)
    names = [r["name"] for r in rows]
    if not columns:
        return pd.DataFrame(index=names)
    means = last.groupby("row")[columns].mean(numeric_only=True) if len(last) else pd.DataFrame(columns=columns)
    means = means.reindex(names)
    means.columns = [c[len(CLASS_IOU):] for c in columns]
    return means


def plot_seed_curves(epochs: pd.DataFrame, metric: str, rows: list[dict], path: Path) -> None:
    """One panel per row: each seed's curve thin, the mean over seeds bold, min..max over seeds shaded."""
    plt = table_plots._pyplot()
    from matplotlib.ticker import MaxNLocator
    n = max(1, len(rows))
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.0 * math.ceil(n / cols)),
                             sharey=True, squeeze=False)
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, ax in enumerate(axes.flat):
            if i >= len(rows):
                ax.axis("off")
                continue
            name, color = rows[i]["name"], colors[i % len(colors)]
            data = epochs.loc[epochs["row"] == name, ["seed", "epoch", metric]].dropna() \
                if metric in epochs.columns and len(epochs) else pd.DataFrame()
            ax.set_title(name, fontsize="small")
            ax.grid(True, alpha=0.3)
            if data.empty:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="gray")
                continue
            for _, seed in data.groupby("seed"):
                seed = seed.sort_values("epoch")
                ax.plot(seed["epoch"], seed[metric], color=color, alpha=0.45, linewidth=0.9)
            band = data.groupby("epoch")[metric].agg(["mean", "min", "max"]).sort_index()
            ax.fill_between(band.index.to_numpy(float), band["min"], band["max"], color=color, alpha=0.18, linewidth=0)
            ax.plot(band.index, band["mean"], color=color, linewidth=2.2, marker="o" if len(band) == 1 else None)
            ax.set_xlabel("epoch", fontsize="small")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0][0].set_ylabel(metric)
        fig.suptitle(f"{metric} per row: each seed (thin), mean (bold), seed range (band)")
        fig.tight_layout()
        table_plots.save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_class_iou(matrix: pd.DataFrame, path: Path) -> None:
    """A heat map of rows x classes with the IoU written in each cell."""
    plt = table_plots._pyplot()
    values = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * values.shape[1] + 3), max(2.5, 0.5 * values.shape[0] + 1.5)))
    try:
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
        ax.set_xticks(range(values.shape[1]), [str(c) for c in matrix.columns], rotation=30, ha="right")
        ax.set_yticks(range(values.shape[0]), [str(r) for r in matrix.index])
        finite = values[np.isfinite(values)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0
        for (i, j), v in np.ndenumerate(values):
            text = "—" if not np.isfinite(v) else f"{v:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="white" if np.isfinite(v) and v < middle else "black")
        fig.colorbar(image, ax=ax, label="IoU")
        ax.set_title("per-class IoU by row (last epoch, mean over seeds)")
        table_plots.save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_diagnostics(epochs: pd.DataFrame, columns: list[str], rows: list[dict], path: Path) -> None:
    """One panel per diagnostic: its mean over seeds vs epoch, one line per row that has it."""
    plt = table_plots._pyplot()
    from matplotlib.ticker import MaxNLocator
    cols = min(3, len(columns))
    nrows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.0 * nrows), squeeze=False)
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, ax in enumerate(axes.flat):
            if k >= len(columns):
                ax.axis("off")
                continue
            column = columns[k]
            for i, spec_row in enumerate(rows):
                data = epochs.loc[epochs["row"] == spec_row["name"], ["epoch", column]].dropna()
                if data.empty:
                    continue
                mean = data.groupby("epoch")[column].mean().sort_index()
                ax.plot(mean.index, mean.to_numpy(), color=colors[i % len(colors)], label=spec_row["name"],
                        marker="o" if len(mean) == 1 else None)
            ax.set_title(column, fontsize="small")
            ax.set_xlabel("epoch", fontsize="small")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes.flat[1:]:
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(h)
                    labels.append(label)
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize="small",
                       bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 3)))
        fig.suptitle("RL diagnostics by row (mean over seeds)")
        fig.tight_layout()
        table_plots.save_figure(fig, path)
    finally:
        plt.close(fig)


def draw_figures(run_dir: Path, summary: pd.DataFrame, epochs: pd.DataFrame, meta: dict[str, Any]) -> list[Path]:
    """The report's own PNGs in plots/: seed curves, class IoU heat map, RL diagnostics (the last two when the
    epochs have such columns)."""
    metric, rows = meta["metric"], meta["rows"]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")
    out = [run_dir / "plots" / f"seeds_{slug}.png"]
    plot_seed_curves(epochs, metric, rows, out[0])
    matrix = class_iou_matrix(epochs, rows)
    if matrix.shape[1]:
        out.append(run_dir / "plots" / "class_iou.png")
        plot_class_iou(matrix, out[-1])
    columns = diagnostic_columns(epochs)
    if columns:
        out.append(run_dir / "plots" / "rl_diagnostics.png")
        plot_diagnostics(epochs, columns, rows, out[-1])
    return out


# --------------------------------------------------------------------------- HTML
