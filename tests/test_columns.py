"""Table columns beyond the spec metric, paper numbers per column and per profile, and compare_to
(orchestrator.columns): validation, resolution, the summary's statistics, the renderers and the MLflow row metrics."""
import io
import math
import textwrap

import numpy as np
import pandas as pd
import pytest

from orchestrator.cli import sweep_main
from orchestrator.spec import SpecError, resolve
from orchestrator.tables import column_keys, render_csv, render_latex, render_markdown, summarize
from orchestrator.tracking import row_metrics

CONTINUAL = textwrap.dedent("""
    name: cols
    metric: {name: val/mIoU, mode: max}
    seeds: [0, 1]
    base: supervised
    profiles:
      paper: {schedule: {epochs: 2}}
      other: {schedule: {epochs: 3}}
    columns:
      - {name: "0-4", metric: val/mIoU_old}
      - {name: "5-7", metric: val/mIoU_new}
      - {name: all, metric: val/mIoU}
      - {name: night, metric: val/night/mIoU, profiles: [default]}
      - {name: Dark Zurich, metric: val/dark_zurich/mIoU, profiles: [paper]}
    rows:
      - name: finetune A
        paper: {"0-4": 10.0, "5-7": 20.0, all: 15.0}
      - name: plop A
        set: {schedule.lr: 0.002}
        compare_to: finetune A
        paper: {default: 1.5, paper: {"0-4": 76.2, all: 69.9}}
      - name: finetune B
        set: {schedule.lr: 0.003}
        paper: 42.0
      - name: plop B
        set: {schedule.lr: 0.004}
        compare_to: finetune B
""")


def test_columns_resolve_per_profile_with_their_paper_numbers(write_spec):
    path = write_spec(CONTINUAL)
    plan = resolve(path)
    assert [c["name"] for c in plan.columns] == ["0-4", "5-7", "all", "night"]
    rows = {r["name"]: r for r in plan.table_rows()}
    assert rows["finetune A"]["papers"] == {"0-4": 10.0, "5-7": 20.0, "all": 15.0}
    assert rows["finetune A"]["paper"] == 15.0                    # the spec metric's column
    assert rows["plop A"]["paper"] == 1.5 and rows["plop A"]["papers"] == {"all": 1.5}   # the embedded key
    assert rows["plop A"]["compare_to"] == "finetune A"
    assert rows["finetune B"]["paper"] == 42.0 and rows["plop B"]["paper"] is None
    paper = resolve(path, profile="paper")
    assert [c["name"] for c in paper.columns] == ["0-4", "5-7", "all", "Dark Zurich"]
    rows = {r["name"]: r for r in paper.table_rows()}
    assert rows["plop A"]["papers"] == {"0-4": 76.2, "all": 69.9} and rows["plop A"]["paper"] == 69.9
    other = {r["name"]: r for r in resolve(path, profile="other").table_rows()}
    assert other["plop A"]["paper"] is None and other["plop A"]["papers"] == {}    # no number for that profile


@pytest.mark.parametrize("change, expected", [
    ('compare_to: finetune A', "rows[0] (finetune A).compare_to: expected the name of another row"),
    ('compare_to: nobody', "rows[0] (finetune A).compare_to: expected the name of another row"),
    ('paper: {"0-4": 1.0, paper: 2.0}', "rows[0] (finetune A).paper: key"),
    ('paper: {bogus: 1.0}', "rows[0] (finetune A).paper: key 'bogus' is neither a column nor a profile"),
    ('paper: {paper: {bogus: 1.0}}', "rows[0] (finetune A).paper.paper: no column 'bogus'"),
])
def test_bad_rows_are_one_line(write_spec, change, expected):
    text = CONTINUAL.replace('paper: {"0-4": 10.0, "5-7": 20.0, all: 15.0}', change)
    with pytest.raises(SpecError) as e:
        resolve(write_spec(text))
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, expected", [
    ("profiles: [nope]", "columns[0] (0-4).profiles: no profile 'nope'"),
    ("profiles: []", "columns[0].profiles: List should have at least 1 item"),
])
def test_bad_columns_are_one_line(write_spec, change, expected):
    text = CONTINUAL.replace('{name: "0-4", metric: val/mIoU_old}', '{name: "0-4", metric: val/mIoU_old, ' + change + '}')
    with pytest.raises(SpecError) as e:
        resolve(write_spec(text))
    assert expected in str(e.value)
    with pytest.raises(SpecError, match="names must be distinct"):
        resolve(write_spec(CONTINUAL.replace('name: "5-7"', 'name: "0-4"')))


def test_dry_run_shows_the_columns_and_paper_numbers(capsys, write_spec):
    # the plan check wants the columns' metrics reported: a continual task (old / new), no extra eval sets
    text = (CONTINUAL.replace("base: supervised", "base: {preset: supervised, continual: {task: 5-3}}")
            .replace("  - {name: night, metric: val/night/mIoU, profiles: [default]}\n", "")
            .replace("  - {name: Dark Zurich, metric: val/dark_zurich/mIoU, profiles: [paper]}\n", ""))
    rc = sweep_main([str(write_spec(text)), "--dry-run", "--profile", "paper"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "columns: 0-4 = val/mIoU_old, 5-7 = val/mIoU_new, all = val/mIoU" in out
    assert "paper (0-4 / 5-7 / all)" in out and "76.2 / — / 69.9" in out


# --------------------------------------------------------------------------- the summary and its renderers

OLD = {"ft": [50.0, 52.0], "plop": [60.0, 64.0], "ft2": [40.0, 40.0], "plop2": [45.0, 47.0]}
NEW = {"ft": [30.0, 31.0], "plop": [20.0, 22.0], "ft2": [10.0, 12.0], "plop2": [11.0, 11.0]}
ALL = {k: [(o + n) / 2 for o, n in zip(OLD[k], NEW[k])] for k in OLD}
COLUMNS = [{"name": "old", "metric": "val/mIoU_old"}, {"name": "new", "metric": "val/mIoU_new"},
           {"name": "all", "metric": "val/mIoU"}]
ROWS = [{"name": "ft", "paper": 40.0, "papers": {"old": 50.0, "all": 40.0}},
        {"name": "plop", "paper": 42.0, "papers": {"all": 42.0}, "compare_to": "ft"},
        {"name": "ft2", "paper": None, "papers": {}},
        {"name": "plop2", "paper": None, "papers": {}, "compare_to": "ft2"}]


def trials() -> pd.DataFrame:
    records = []
    for i, row in enumerate(OLD):
        for seed in range(2):
            records.append({"trial_id": f"{i}-{seed}", "row": row, "seed": seed, "status": "ok",
                            "val/mIoU_old": OLD[row][seed], "val/mIoU_new": NEW[row][seed], "val/mIoU": ALL[row][seed]})
    return pd.DataFrame(records)


@pytest.fixture
def summary():
    return summarize(trials(), "val/mIoU", [dict(r, compare_to=r.get("compare_to")) for r in ROWS], columns=COLUMNS)


def test_each_row_is_compared_with_its_reference(summary):
    assert list(summary["reference"]) == ["ft", "ft", "ft2", "ft2"]
    mean = {k: np.mean(v) for k, v in ALL.items()}
    assert math.isnan(summary["delta"][0]) and math.isnan(summary["delta"][2])    # reference rows
    assert summary["delta"][1] == pytest.approx(mean["plop"] - mean["ft"])
    assert summary["delta"][3] == pytest.approx(mean["plop2"] - mean["ft2"])     # not against the first row
    assert summary["p_welch"].notna().sum() == 2
    old, new = column_keys("old"), column_keys("new")
    assert summary[old["mean"]].tolist() == pytest.approx([51.0, 62.0, 40.0, 46.0])
    assert summary[old["delta"]][3] == pytest.approx(6.0) and summary[new["delta"]][1] == pytest.approx(-9.5)
    assert summary[old["std"]][0] == pytest.approx(np.std([50.0, 52.0], ddof=1))
    assert summary[old["paper"]][0] == 50.0 and math.isnan(summary[old["paper"]][1])


def test_renderers_show_each_column_once(summary):
    md = render_markdown(summary, "val/mIoU", columns=COLUMNS)
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header == ["row", "n", "old (mean ± std)", "new (mean ± std)", "all (mean ± std)", "Δ all vs reference",
                      "p (Welch, Holm)", "paper (old / new / all)", "failed"]
    ft = [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| ft ")).strip("|").split("|")]
    assert ft[2] == "51.00 ± 1.41" and ft[-2] == "50.0 / — / 40.0"
    plop2 = [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| plop2 ")).strip("|").split("|")]
    assert plop2[2] == "46.00 ± 1.41 (+6.00)" and plop2[3] == "11.00 ± 0.00 (+0.00)"   # each column's Δ vs its reference
    assert plop2[4] == "28.50 ± 0.71"                           # the spec metric's Δ has its own column
    assert "Δ and p of each row against its reference row: plop vs ft, plop2 vs ft2" in md
    tex = render_latex(summary, "val/mIoU", columns=COLUMNS)
    assert r"$\Delta$ all vs reference" in tex and r"Paper (old / new / all)" in tex
    assert r"\textbf{" in next(l for l in tex.splitlines() if l.startswith("plop &"))   # the best all-mIoU mean
    back = pd.read_csv(io.StringIO(render_csv(summary)))
    assert "old: mean" in back.columns and back["all: delta"].iloc[1] == pytest.approx(summary["delta"][1])


def test_mlflow_row_metrics_carry_each_column(summary):
    metrics = row_metrics(summary)
    assert metrics["row/00_ft/old/mean"] == pytest.approx(51.0)
    assert metrics["row/01_plop/new/delta"] == pytest.approx(-9.5)
    assert "row/00_ft/old/delta" not in metrics          # NaN for a reference row: not logged


def test_a_profile_may_name_a_preset_and_set_keys_over_it(write_spec):
    text = CONTINUAL.replace("other: {schedule: {epochs: 3}}",
                             "other: {preset: smoke, schedule: {epochs: 3}, data: {val_size: 8}}")
    cfg = resolve(write_spec(text), profile="other").base_config
    smoke = resolve(write_spec(CONTINUAL.replace("other: {schedule: {epochs: 3}}", "other: smoke")),
                    profile="other").base_config
    assert cfg["schedule"]["epochs"] == 3 and cfg["data"]["val_size"] == 8
    assert cfg["data"]["train_size"] == smoke["data"]["train_size"]          # the rest is the preset's
    with pytest.raises(SpecError, match=r"profiles.other.preset: no preset 'nope'"):
        resolve(write_spec(CONTINUAL.replace("other: {schedule: {epochs: 3}}", "other: {preset: nope}")),
                profile="other")
    base = resolve(write_spec(CONTINUAL.replace("base: supervised", "base: {preset: latent_rl, schedule: {epochs: 4}}")))
    assert base.base_config["method"]["name"] == "latent_rl" and base.base_config["schedule"]["epochs"] == 4


def test_a_row_may_set_more_keys_in_one_profile(write_spec):
    text = CONTINUAL.replace("    set: {schedule.lr: 0.003}\n",
                             "    set: {schedule.lr: 0.003}\n    profiles: {paper: {schedule.lr: 0.3}, "
                             "default: {schedule.epochs: 7}}\n")
    assert text != CONTINUAL
    rows = {r.name: r for r in resolve(write_spec(text)).rows}
    assert rows["finetune B"].config["schedule"]["epochs"] == 7 and rows["finetune B"].config["schedule"]["lr"] == 0.003
    paper = {r.name: r for r in resolve(write_spec(text), profile="paper").rows}
    assert paper["finetune B"].config["schedule"]["lr"] == 0.3 and paper["finetune B"].changes["schedule.lr"] == 0.3
    assert paper["plop B"].config["schedule"]["lr"] == 0.004                        # other rows untouched
    with pytest.raises(SpecError, match=r"rows\[2\] \(finetune B\).profiles: no profile 'nope'"):
        resolve(write_spec(text.replace("profiles: {paper:", "profiles: {nope:")))


# --------------------------------------------------------------------------- the plan check (orchestrator.preflight)

CHECKED = textwrap.dedent("""
    name: checked
    seeds: [0]
    base: supervised
    columns:
      - {name: all, metric: val/mIoU}
      - {name: extra, metric: METRIC}
    rows:
      - name: a
""")


@pytest.mark.parametrize("metric, base, expected", [
    ("val/mIoU_old", "supervised", "columns (extra).metric: no trial reports 'val/mIoU_old' (evaluation reports "
                                   "val/mIoU, val/pixel_acc and val/IoU/<class> for the classes of synthetic_surgical"),
    ("val/night/mIoU", "supervised", "columns (extra).metric: no trial reports 'val/night/mIoU'"),
    ("val/night/mIoU", "{preset: supervised, eval: {datasets: {night: {name: dark_zurich, root: /nonexistent}}}}",
     "rows[0] (a): eval.datasets.night: data.root: /nonexistent"),
    ("val/night/mIoU", "{preset: supervised, eval: {datasets: {night: {name: synthetic_cod}}}}",
     "rows[0] (a): eval.datasets.night: no class in common with the trial's"),
])
def test_columns_and_eval_sets_are_checked_before_anything_starts(capsys, write_spec, metric, base, expected):
    text = CHECKED.replace("METRIC", metric).replace("base: supervised", f"base: {base}")
    assert sweep_main([str(write_spec(text)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
    if metric == "val/mIoU_old":
        assert "val/mIoU_old and val/mIoU_new only with a continual.task" in err


def test_a_reported_eval_set_column_passes(capsys, write_spec):
    text = CHECKED.replace("METRIC", "val/night/mIoU").replace(
        "base: supervised", "base: {preset: supervised, eval: {datasets: {night: {shift: {low_light: 0.5}}}}}")
    assert sweep_main([str(write_spec(text)), "--dry-run"]) == 0, capsys.readouterr().err
