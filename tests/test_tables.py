"""orchestrator.tables: statistics checked against hand-computed numbers and textbook formulas."""

import io
import math
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer
from scipy import stats

from orchestrator.table_plots import plot_bars, plot_curves
from orchestrator.tables import (
    SUMMARY_COLUMNS,
    render_csv,
    render_latex,
    render_markdown,
    summarize,
)

METRIC = "val/mIoU"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_trials(cells: dict[str, list[float | None]], metric: str = METRIC) -> pd.DataFrame:
    """cells: row name -> one entry per seed; None marks a failed trial (no metric)."""
    records = []
    for row_index, (row, values) in enumerate(cells.items()):
        for seed, value in enumerate(values):
            ok = value is not None
            records.append({
                "trial_id": f"{row_index}-{seed}", "row": row, "row_index": row_index, "seed": seed,
                "status": "ok" if ok else "failed", "error": None if ok else "RuntimeError: boom",
                metric: value if ok else np.nan,
            })
    return pd.DataFrame(records)


def spec_rows(names_papers: list[tuple[str, float | None]]) -> list[dict]:
    return [{"name": n, "paper": p} for n, p in names_papers]


# FCN: mean 68, sample var (4+1+0+1+4)/4 = 2.5.  r_IoU: two failures, ok mean 78, var 2.5.
CELLS = {
    "FCN": [66.0, 67.0, 68.0, 69.0, 70.0],
    "r_IoU only": [76.0, 77.0, 78.0, 79.0, 80.0, None, None],
    "all failed": [None] * 5,
    "single seed": [70.0],
    "noisy": [67.0, 69.5, 68.2, 71.0],
}
ROWS = spec_rows([("FCN", 67.8), ("r_IoU only", 77.1), ("all failed", 75.0),
                  ("single seed", None), ("noisy", None)])


@pytest.fixture
def summary() -> pd.DataFrame:
    return summarize(make_trials(CELLS), METRIC, ROWS)


def welch_by_formula(a, b):
    n1, n2 = len(a), len(b)
    m1, m2 = sum(a) / n1, sum(b) / n2
    v1 = sum((x - m1) ** 2 for x in a) / (n1 - 1)
    v2 = sum((x - m2) ** 2 for x in b) / (n2 - 1)
    se2 = v1 / n1 + v2 / n2
    t = (m1 - m2) / math.sqrt(se2)
    df = se2**2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    return 2 * stats.t.sf(abs(t), df)


# --------------------------------------------------------------------------- summarize


def test_summary_has_one_line_per_spec_row_in_order(summary):
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(summary["row"]) == ["FCN", "r_IoU only", "all failed", "single seed", "noisy"]


def test_mean_std_delta(summary):
    s = summary.set_index("row")
    assert s.loc["FCN", "n"] == 5
    assert s.loc["FCN", "mean"] == pytest.approx(68.0)
    assert s.loc["FCN", "std"] == pytest.approx(math.sqrt(2.5))
    assert math.isnan(s.loc["FCN", "delta"]) and math.isnan(s.loc["FCN", "p_welch"])
    assert s.loc["r_IoU only", "delta"] == pytest.approx(10.0)
    noisy = CELLS["noisy"]
    m = sum(noisy) / 4
    assert s.loc["noisy", "mean"] == pytest.approx(m)
    assert s.loc["noisy", "std"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in noisy) / 3))
    assert s.loc["noisy", "delta"] == pytest.approx(m - 68.0)
    assert s.loc["FCN", "paper"] == 67.8 and math.isnan(s.loc["noisy", "paper"])


def test_failed_trials_are_counted_and_excluded_from_mean():
    cells = {"ref": [1.0, 2.0, 3.0], "row": [10.0, 12.0, None]}
    trials = make_trials(cells)
    # A failed trial that still carries a (bogus) number must not enter the mean either.
    trials.loc[trials["status"] == "failed", METRIC] = 0.0
    s = summarize(trials, METRIC, spec_rows([("ref", None), ("row", None)])).set_index("row")
    assert s.loc["row", "n"] == 2 and s.loc["row", "failed"] == 1
    assert s.loc["row", "mean"] == pytest.approx(11.0)
    assert s.loc["row", "std"] == pytest.approx(math.sqrt(2.0))


def test_row_with_all_seeds_failed_is_listed(summary):
    line = summary.iloc[2]
    assert line["row"] == "all failed"
    assert line["n"] == 0 and line["failed"] == 5
    assert all(math.isnan(line[c]) for c in ["mean", "std", "delta", "p_welch"])
    assert line["paper"] == 75.0 and not line["best"]


def test_single_seed_has_no_std_and_no_p(summary):
    line = summary.set_index("row").loc["single seed"]
    assert line["n"] == 1 and line["mean"] == 70.0
    assert math.isnan(line["std"]) and math.isnan(line["p_welch"])
    assert line["delta"] == pytest.approx(2.0)


def test_welch_p_matches_formula(summary):
    s = summary.set_index("row")
    expected = welch_by_formula(CELLS["noisy"], CELLS["FCN"])
    assert s.loc["noisy", "p_welch"] == pytest.approx(expected, rel=1e-9)
    ok = [v for v in CELLS["r_IoU only"] if v is not None]
    assert s.loc["r_IoU only", "p_welch"] == pytest.approx(welch_by_formula(ok, CELLS["FCN"]), rel=1e-9)


def test_welch_p_known_value():
    # a = 1..5, b = 3..7: both variances 2.5, t = -2/sqrt(0.5 + 0.5) = -2, df = 1 / (2 * 0.25 / 4) = 8.
    # Two-sided p = 1 - A(2|8), A from the closed form for even df (Abramowitz & Stegun 26.7.3):
    # sin(th) * (1 + c/2 + 3c^2/8 + 15c^3/48), th = atan(2/sqrt(8)), c = cos^2(th) = 2/3 -> 0.0805162.
    trials = make_trials({"a": [1.0, 2.0, 3.0, 4.0, 5.0], "b": [3.0, 4.0, 5.0, 6.0, 7.0]})
    s = summarize(trials, METRIC, spec_rows([("a", None), ("b", None)]))
    assert s["p_welch"].iloc[1] == pytest.approx(0.0805162, abs=1e-6)


def test_p_is_nan_when_reference_has_fewer_than_two_seeds():
    trials = make_trials({"ref": [5.0, None], "row": [1.0, 2.0, 3.0]})
    s = summarize(trials, METRIC, spec_rows([("ref", None), ("row", None)]))
    assert math.isnan(s["p_welch"].iloc[1])
    assert s["delta"].iloc[1] == pytest.approx(-3.0)


def test_zero_variance_on_both_sides():
    trials = make_trials({"ref": [70.0] * 3, "same": [70.0] * 3, "other": [71.0] * 3})
    s = summarize(trials, METRIC, spec_rows([("ref", None), ("same", None), ("other", None)]))
    assert s["p_welch"].iloc[1] == 1.0
    assert s["p_welch"].iloc[2] == 0.0


def test_best_follows_mode(summary):
    assert list(summary["best"]) == [False, True, False, False, False]
    low = summarize(make_trials(CELLS), METRIC, ROWS, mode="min")
    assert list(low["row"][low["best"]]) == ["FCN"]  # 68.0 is the lowest defined mean
    with pytest.raises(ValueError, match="mode"):
        summarize(make_trials(CELLS), METRIC, ROWS, mode="median")


def test_missing_metric_column_gives_empty_rows():
    trials = make_trials({"a": [None, None], "b": [None]}).drop(columns=[METRIC])
    s = summarize(trials, METRIC, spec_rows([("a", None), ("b", 1.0)]))
    assert list(s["n"]) == [0, 0] and list(s["failed"]) == [2, 1] and not s["best"].any()


# --------------------------------------------------------------------------- renderers


def test_markdown_lists_rows_in_order_with_formatted_numbers(summary):
    md = render_markdown(summary, METRIC, title="Table 5a", reused=3)
    positions = [md.index(f"| {name}") for name in summary["row"]]
    assert positions == sorted(positions)
    for text in ["68.00 ± 1.58", "78.00 ± 1.58", "+10.00", "+2.00", "<0.001", "67.8", "77.1",
                 "Δ vs FCN", f"{METRIC} (mean ± std)", "p (Welch, Holm)", "Table 5a",
                 "3 cells reused from earlier runs", "Holm-adjusted over the 2 rows tested"]:
        assert text in md, text
    assert re.search(r"\| +70\.00 \|", md)  # one seed: the mean alone, no ± std
    # two rows have a Welch p (r_IoU only, noisy): noisy's is the larger, so Holm multiplies it by 1, after the
    # running maximum with r_IoU's doubled p (far smaller), i.e. it stays as it is; r_IoU's doubles
    noisy_p = welch_by_formula(CELLS["noisy"], CELLS["FCN"])
    assert f"{noisy_p:.3g}" in md  # 3 significant digits
    riou_p = welch_by_formula([76.0, 77.0, 78.0, 79.0, 80.0], CELLS["FCN"])
    assert 2 * riou_p < noisy_p
    all_failed = next(line for line in md.splitlines() if line.startswith("| all failed"))
    cells = [c.strip() for c in all_failed.strip("|").split("|")]
    assert cells == ["all failed", "0", "—", "—", "—", "75.0", "5"]


def test_markdown_is_a_padded_pipe_table(summary):
    lines = [l for l in render_markdown(summary, METRIC).splitlines() if l.startswith("|")]
    assert len(lines) == 2 + len(summary)
    assert len({len(l) for l in lines}) == 1  # every column padded to one width
    assert all(l.count("|") == 8 for l in lines)
    assert re.fullmatch(r"\|( :?-{3,}:? \|)+", lines[1])
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "row", "n", f"{METRIC} (mean ± std)", "Δ vs FCN", "p (Welch, Holm)", "paper", "failed"]


def test_markdown_escapes_pipes_in_row_names():
    trials = make_trials({"a|b": [1.0, 2.0], "c": [3.0, 4.0]})
    md = render_markdown(summarize(trials, METRIC, spec_rows([("a|b", None), ("c", None)])), METRIC)
    assert "a\\|b" in md
    assert all(l.count("|") - l.count("\\|") == 8 for l in md.splitlines() if l.startswith("|"))


def test_csv_round_trips(summary):
    back = pd.read_csv(io.StringIO(render_csv(summary)))
    assert list(back.columns) == SUMMARY_COLUMNS
    assert list(back["row"]) == list(summary["row"])
    for col in ["mean", "std", "delta", "p_welch", "paper"]:
        np.testing.assert_array_equal(back[col].to_numpy(float), summary[col].to_numpy(float))
    assert list(back["n"]) == list(summary["n"]) and list(back["failed"]) == list(summary["failed"])
    assert list(back["best"]) == list(summary["best"])


def test_latex_booktabs_bold_best_and_escaping():
    cells = {"FCN": [66.0, 67.0, 68.0, 69.0, 70.0], "r_IoU & 5% boost": [76.0, 77.0, 78.0, 79.0, 80.0]}
    rows = spec_rows([("FCN", 67.8), ("r_IoU & 5% boost", None)])
    tex = render_latex(summarize(make_trials(cells), METRIC, rows), METRIC, caption="Table 5(a)")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\begin{tabular}" in tex and r"\caption{Table 5(a)}" in tex
    best = next(l for l in tex.splitlines() if "boost" in l)
    assert best.startswith(r"r\_IoU \& 5\% boost &")
    assert r"\textbf{78.00 $\pm$ 1.58}" in best
    ref = next(l for l in tex.splitlines() if l.startswith("FCN"))
    assert r"\textbf" not in ref and "68.00 $\\pm$ 1.58" in ref
    # Every & is either a column separator or escaped: the body lines all have 7 cells.
    body = [l for l in tex.splitlines() if l.endswith(r"\\")]
    assert all(len(re.split(r"(?<!\\)&", l)) == 7 for l in body)


# --------------------------------------------------------------------------- plots


def make_epochs(cells: dict[str, int], n_epochs: int = 4) -> pd.DataFrame:
    """cells: row name -> number of seeds; val/mIoU is evaluated every epoch but the second."""
    records = []
    for row_index, (row, seeds) in enumerate(cells.items()):
        for seed in range(seeds):
            for epoch in range(1, n_epochs + 1):
                records.append({
                    "trial_id": f"{row_index}-{seed}", "row": row, "row_index": row_index,
                    "seed": seed, "epoch": epoch,
                    METRIC: np.nan if epoch == 2 else 50.0 + 5 * epoch + row_index + seed,
                })
    return pd.DataFrame(records)


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        p.name for p in path.parent.iterdir() if not p.name.startswith(".tmp"))  # no leftovers


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save (orchestrator.table_plots.save_figure, still called), to read their data."""
    import orchestrator.table_plots as table_plots

    saved, save = [], table_plots.save_figure
    monkeypatch.setattr(table_plots, "save_figure", lambda fig, path: (saved.append(fig), save(fig, path)))
    return saved


def band_edges(collection) -> dict[float, tuple[float, float]]:
    """A fill_between band's (low, high) at each x, from its polygon's vertices."""
    edges: dict[float, list[float]] = {}
    for x, y in collection.get_paths()[0].vertices:
        edges.setdefault(round(float(x), 9), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in edges.items()}


def test_plot_curves_draws_mean_and_std_band_per_row(tmp_path, figures):
    rows = spec_rows([("FCN", None), ("r_IoU", None), ("all failed", None)])
    path = tmp_path / "plots" / "curves.png"
    plot_curves(make_epochs({"FCN": 3, "r_IoU": 3}), METRIC, rows, path)
    assert_png(path)
    (ax,) = figures[-1].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"FCN", "r_IoU", "all failed (no data)"}
    assert len(lines["all failed (no data)"].get_xdata()) == 0
    bands = ax.collections
    assert len(bands) == 2
    for row_index, name in enumerate(["FCN", "r_IoU"]):
        # make_epochs: 50 + 5 epoch + row_index + seed over seeds 0, 1, 2 (epoch 2 not evaluated): mean +1, std 1
        epochs = [1, 3, 4]
        values = np.array([[50 + 5 * e + row_index + s for s in range(3)] for e in epochs], dtype=float)
        mean, std = values.mean(1), values.std(1, ddof=1)
        assert list(lines[name].get_xdata()) == epochs
        np.testing.assert_allclose(lines[name].get_ydata(), mean)
        np.testing.assert_allclose(bands[row_index].get_facecolor()[0][:3], to_rgba(lines[name].get_color())[:3])
        edges = band_edges(bands[row_index])
        for e, m, sd in zip(epochs, mean, std):
            np.testing.assert_allclose(edges[e], (m - sd, m + sd))
    assert lines["FCN"].get_color() != lines["r_IoU"].get_color()
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == METRIC


def test_plot_curves_single_seed_has_no_band(tmp_path, figures):
    path = tmp_path / "curves.png"
    plot_curves(make_epochs({"FCN": 1}), METRIC, spec_rows([("FCN", None)]), path)
    assert_png(path)
    (ax,) = figures[-1].axes
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 3, 4] and list(line.get_ydata()) == [55.0, 65.0, 70.0]
    assert not ax.collections          # one seed: no std, no band


def test_plot_bars_draws_means_std_and_paper_numbers(tmp_path, summary, figures):
    path = tmp_path / "bars.png"
    plot_bars(summary, METRIC, str(path))
    assert_png(path)
    plot_bars(summary, METRIC, path)  # overwrites in place
    assert_png(path)
    (ax,) = figures[-1].axes
    # from CELLS, by numpy: rows with at least one ok seed get a bar of their mean, +-1 sample std (0 for one seed)
    names = list(CELLS)
    ok = {n: np.array([v for v in vals if v is not None]) for n, vals in CELLS.items()}
    with_data = [i for i, n in enumerate(names) if len(ok[names[i]])]
    means = [ok[names[i]].mean() for i in with_data]
    stds = [ok[names[i]].std(ddof=1) if len(ok[names[i]]) > 1 else 0.0 for i in with_data]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in bars], with_data)
    np.testing.assert_allclose([b.get_height() for b in bars], means)
    best = int(np.argmax(means))      # the best mean is orange, the others blue
    orange, blue = to_rgba("tab:orange"), to_rgba("tab:blue")
    assert [b.get_facecolor() for b in bars] == [orange if i == best else blue for i in range(len(bars))]
    (whiskers,) = bars.errorbar.lines[2]
    np.testing.assert_allclose([(seg[0][1], seg[1][1]) for seg in whiskers.get_segments()],
                               [(m - s, m + s) for m, s in zip(means, stds)])
    (paper,) = [c for c in ax.collections if c is not whiskers]
    np.testing.assert_allclose(paper.get_offsets(), [(0, 67.8), (1, 77.1), (2, 75.0)])
    assert [t.get_text() for t in ax.texts] == ["no data"] and ax.texts[0].get_position()[0] == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == names


def test_plot_pixels_follow_the_data(tmp_path):
    """The saved image itself: the same data gives the same pixels, other data other pixels."""
    from matplotlib.image import imread

    epochs = make_epochs({"FCN": 3})
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    plot_curves(epochs, METRIC, spec_rows([("FCN", None)]), paths[0])
    plot_curves(epochs, METRIC, spec_rows([("FCN", None)]), paths[1])
    moved = epochs.assign(**{METRIC: epochs[METRIC].where(epochs["epoch"] != 4, 0.0)})
    plot_curves(moved, METRIC, spec_rows([("FCN", None)]), paths[2])
    a, b, c = (imread(p) for p in paths)
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_paper_std_and_pending_rows():
    rows = [{"name": "FCN", "paper": 67.8}, {"name": "+RL", "paper": 78.5, "paper_std": 0.43},
            {"name": "SETR", "paper": 84.5, "pending": "no vit_large yet"}]
    s = summarize(make_trials({"FCN": [66.0, 68.0], "+RL": [70.0, 72.0]}), METRIC, rows)
    assert s.loc[1, "paper_std"] == 0.43 and math.isnan(s.loc[0, "paper_std"])
    assert list(s["pending"]) == ["", "", "no vit_large yet"] and s.loc[2, "n"] == 0
    md = render_markdown(s, METRIC)
    assert "78.5 ± 0.43" in md and "- SETR: not run (no vit_large yet)" in md
    assert r"78.5 $\pm$ 0.43" in render_latex(s, METRIC)


def test_inert_rl_rows_are_flagged_from_their_last_half_of_epochs():
    """A row whose rl/clipfrac is >= 0.95 over the last half of its epochs is flagged (column, mark, note, warning);
    a row that clipped early only, a row under the threshold and a supervised row (no clipfrac) are not."""
    from orchestrator.tables import inert_warnings

    cells = {"FCN": [66.0, 67.0], "inert": [70.0, 71.0], "early": [72.0, 73.0], "alive": [74.0, 75.0]}
    late = {"inert": [0.2, 0.3, 1.0, 0.97], "early": [1.0, 1.0, 0.3, 0.2], "alive": [0.9, 0.9, 0.9, 0.94]}
    epochs = pd.DataFrame([
        {"trial_id": f"{row}-{seed}", "row": row, "seed": seed, "epoch": e + 1, "rl/clipfrac": clip}
        for row, clips in late.items() for seed in (0, 1) for e, clip in enumerate(clips)]
        + [{"trial_id": f"FCN-{s}", "row": "FCN", "seed": s, "epoch": e, "val/mIoU": 60.0}
           for s in (0, 1) for e in (1, 2, 3, 4)])
    rows = spec_rows([(name, None) for name in cells])
    summ = summarize(make_trials(cells), METRIC, rows, epochs=epochs)
    assert summ["rl_inert"].tolist() == [False, True, False, False]
    assert summ["rl_clipfrac"].iloc[1] == pytest.approx((1.0 + 0.97) / 2)     # epochs 3 and 4 of 4
    assert math.isnan(summ["rl_clipfrac"].iloc[0])
    md = render_markdown(summ, METRIC)
    assert "| inert †" in md and "RL term inert" in md and "| early †" not in md
    assert [w.split(":")[0] for w in inert_warnings(summ)] == ["row 'inert'"]
    assert summ.columns.tolist() == SUMMARY_COLUMNS
    assert not summarize(make_trials(cells), METRIC, rows)["rl_inert"].any()     # no epochs: nothing flagged
