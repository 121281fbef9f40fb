"""Did the reward matter: each RL row read against the spec's spurious-reward control row (orchestrator.controls)."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from orchestrator.controls import control_targets
from orchestrator.spec import load_spec
from orchestrator.stats import holm
from orchestrator.tables import render_csv, render_latex, render_markdown, summarize
from test_tables import METRIC, make_trials

CELLS = {"FCN": [40.0, 41.0, 40.5], "r_IoU": [42.0, 42.5, 43.0], "full": [41.0, 41.8, 41.2],
         "control: random": [41.5, 41.0, 41.9]}


def rows_against(control="control: random"):
    return [{"name": n, "control": None if n in ("FCN", control) else control} for n in CELLS]


def test_rl_rows_get_delta_and_holm_p_against_the_control_row():
    summary = summarize(make_trials(CELLS), METRIC, rows_against())
    by = summary.set_index("row")
    ctrl = np.array(CELLS["control: random"])
    for name in ("r_IoU", "full"):
        assert by.loc[name, "delta_control"] == pytest.approx(np.mean(CELLS[name]) - ctrl.mean())
    raw = [stats.ttest_ind(CELLS[n], ctrl, equal_var=False).pvalue for n in ("r_IoU", "full")]
    assert list(by.loc[["r_IoU", "full"], "p_control"]) == pytest.approx(list(holm(raw)))
    assert np.isnan(by.loc["FCN", "delta_control"]) and np.isnan(by.loc["control: random", "delta_control"])
    # Δ vs the first row is unchanged beside it
    assert by.loc["full", "delta"] == pytest.approx(np.mean(CELLS["full"]) - np.mean(CELLS["FCN"]))


def test_table_shows_the_control_column_only_with_a_control():
    md = render_markdown(summarize(make_trials(CELLS), METRIC, rows_against()), METRIC)
    header = md.splitlines()[0]
    assert "Δ vs control" in header and "p vs control" in header
    assert "spurious-reward control row" in md
    full = next(line for line in md.splitlines() if line.startswith("| full"))
    assert f"{np.mean(CELLS['full']) - np.mean(CELLS['control: random']):+.2f}" in full
    plain = summarize(make_trials(CELLS), METRIC, [{"name": n} for n in CELLS])
    assert "control" not in render_markdown(plain, METRIC).splitlines()[0]
    assert "delta_control" in render_csv(summarize(make_trials(CELLS), METRIC, rows_against())).splitlines()[0]
    assert "vs control" in render_latex(summarize(make_trials(CELLS), METRIC, rows_against()), METRIC)


def row(name, method, control="none", **keys):
    reward = {"control": control} if method != "supervised" else None
    return SimpleNamespace(name=name, config={"method": {"name": method, **({"reward": reward} if reward else {}),
                                                         **keys}})


def test_control_targets_are_the_rl_rows_of_its_method_on_their_real_reward():
    rows = [row("FCN", "supervised"), row("r_IoU", "latent_rl"), row("shuffled", "latent_rl", "shuffled"),
            row("ctrl", "latent_rl", "random"), row("no policy", "latent_rl", policy={"enabled": False}),
            row("clip", "clip_rl")]
    assert control_targets(rows, "ctrl") == {"FCN": None, "r_IoU": "ctrl", "shuffled": None, "ctrl": None,
                                             "no policy": None, "clip": None}
    assert set(control_targets(rows, None).values()) == {None}


def test_clip_rl_and_seg_r1_baseline_rows_are_not_read_against_the_control():
    from orchestrator.spec import resolve
    for spec, rl_rows in (("clip_rl", {"+ RL"}), ("seg_r1", None)):
        plan = resolve(Path(__file__).resolve().parents[1] / "ablations" / f"{spec}.yaml")
        targets = {r["name"]: r["control"] for r in plan.table_rows()}
        compared = {n for n, c in targets.items() if c}
        assert "decoder only" not in compared and "+ curriculum" not in compared
        assert not {n for n in compared if "SFT" in n or "untrained" in n}
        if rl_rows:
            assert compared == rl_rows


def test_shipped_reward_spec_reads_its_rl_rows_against_the_control(tmp_path):
    from orchestrator.spec import resolve
    plan = resolve(Path(__file__).resolve().parents[1] / "ablations" / "reward.yaml")
    targets = {r["name"]: r["control"] for r in plan.table_rows()}
    assert targets["FCN"] is None and targets[plan.spec.control] is None
    assert sum(v == plan.spec.control for v in targets.values()) == 4


def test_a_control_that_names_no_row_is_a_spec_error(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nbase: supervised\ncontrol: nope\nrows:\n  - name: a\n    set: {}\n")
    with pytest.raises(Exception, match="control: expected the name of a row"):
        load_spec(spec)
