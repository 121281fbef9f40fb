"""report.html as a reviewer gets it: `rlseg-table RUN_DIR` on a hand-made run folder with real Parquet, read back
with the stdlib's HTML parser (every row, every figure, every cell's rerun line, no external URL)."""

import base64
import contextlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib import image as mpimg

from orchestrator import report, results
from orchestrator.cli import table_main

METRIC = "val/mIoU"
ROWS = [{"name": "FCN", "paper": 67.8, "paper_std": None},
        {"name": "r_IoU only", "paper": 77.1, "paper_std": None},
        {"name": "r_IoU + r_Dice <b>", "paper": 78.5, "paper_std": 0.43}]   # HTML in a name must stay text
CLASSES = ["background", "instrument-shaft", "thread"]
CHANGES = [{"method.name": "supervised"}, {"method.reward.weights.dice": 0},
           {"method.reward.weights.dice": 1}]


def make_run(run_dir: Path, with_env: bool = True) -> dict:
    """A run folder as a sweep leaves it: 3 rows x 3 seeds, one cell failed, one reused, one stopped early."""
    rng = np.random.default_rng(0)
    meta = {"spec": "reward", "title": "Table 5(a)", "paper": "papers/002 Table 5a", "metric": METRIC, "mode": "max",
            "seeds": [0, 1, 2], "rows": ROWS, "sweep_id": "abc", "notes": [], "reused": 1}
    trials, epochs = [], []
    for i, row in enumerate(ROWS):
        for seed in range(3):
            tid = f"t{i}{seed}"
            failed = (i, seed) == (1, 2)
            early = (i, seed) == (2, 0)
            n_epochs = 0 if failed else (1 if early else 3)
            for epoch in range(1, n_epochs + 1):
                e = {"trial_id": tid, "row": row["name"], "row_index": i, "seed": seed, "epoch": epoch,
                     METRIC: 60 + 5 * i + 2 * epoch + rng.normal()}
                e.update({f"val/IoU/{c}": 30 + 10 * k + i + rng.normal() for k, c in enumerate(CLASSES)})
                if i > 0:    # the RL rows report their diagnostics
                    e.update({"train/reward_iou": 0.1 * epoch, "train/reward_dice": 0.05 * epoch * (i - 1),
                              "rl/clipfrac": 0.2, "rl/approx_kl": 0.01 / epoch, "train/alpha": 0.1,
                              "train/log_sigma": -0.07 * epoch})
                epochs.append(e)
            trials.append({
                "trial_id": tid, "row": row["name"], "row_index": i, "seed": seed,
                "status": "failed" if failed else "ok", "error": "TrainingDiverged: loss became nan" if failed else None,
                "epochs": n_epochs, "wall_s": 12.5, "reused": (i, seed) == (0, 1), "stopped_early": early,
                "source_run": "20261130T000000Z-aaaaaa" if (i, seed) == (0, 1) else None, "device": "cpu",
                "rerun_command": f"rlseg-rerun {run_dir} '{row['name']}' {seed}",
                METRIC: None if failed else epochs[-1][METRIC]})
    run_dir.mkdir(parents=True)
    results.write_parquet(run_dir / "trials.parquet", trials, results.TRIAL_COLUMNS, meta)
    results.write_parquet(run_dir / "epochs.parquet", epochs, results.EPOCH_COLUMNS, meta)
    base = {"method": {"name": "latent_rl", "reward": {"weights": {"iou": 1, "dice": 0}}}}
    resolved = {"spec": {"name": "reward", "base": "latent_rl"}, "profile": "smoke", "overrides": ["seeds=[0,1,2]"],
                "rows": [], "pending": []}
    for row, changes in zip(ROWS, CHANGES):
        config = json.loads(json.dumps(base))
        if "method.name" in changes:
            config["method"] = {"name": "supervised"}
        else:
            config["method"]["reward"]["weights"]["dice"] = changes["method.reward.weights.dice"]
        real_changes = {k: v for k, v in changes.items() if k != "method.reward.weights.dice" or v != 0}
        resolved["rows"].append({"name": row["name"], "paper": row["paper"], "changes": real_changes, "config": config})
    (run_dir / "spec.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    if with_env:
        (run_dir / "env.json").write_text(json.dumps({
            "python": "3.11.7", "platform": "Linux", "host": "vm", "cpu_count": 2, "cuda": False, "cuda_devices": [],
            "packages": {"torch": "2.14.1", "mlflow": "3.17.2"}, "git_sha": "0123456789abcdef0123456789abcdef01234567",
            "git_dirty": False, "argv": ["rlseg-sweep", "ablations/reward.yaml"], "code_version": "880ab251cab8249c",
            "ray_address": "local"}))
    return {"trials": trials, "meta": meta}


class Page(HTMLParser):
    """What a reviewer's browser would fetch or show: every URL-bearing attribute, images, ids, text per section."""

    def __init__(self):
        super().__init__()
        self.urls, self.images, self.ids, self.text, self.tags = [], [], set(), [], []
        self.table_rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        for name in ("src", "href", "action", "data", "poster", "srcset"):
            if attrs.get(name):
                self.urls.append(attrs[name])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "tr":
            self.table_rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.table_rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    # once for the module: drawing the figures is most of the time
    run_dir = tmp_path_factory.mktemp("report") / "results" / "reward" / "20261201T000000Z-abcdef"
    made = make_run(run_dir)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert table_main([str(run_dir)]) == 0
    out = stdout.getvalue()
    page = Page()
    page.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    return run_dir, made, page, out


def test_report_is_one_offline_file(rendered):
    run_dir, _, page, out = rendered
    assert "report.html" in out
    # nothing to fetch: every URL is an in-page anchor or an inline image
    assert all(u.startswith(("#", "data:image/png;base64,")) for u in page.urls), page.urls
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "http://" not in (run_dir / "report.html").read_text() and "https://" not in (run_dir / "report.html").read_text()


def test_every_figure_is_in_the_page_and_not_blank(rendered):
    run_dir, _, page, _ = rendered
    expected = {"fig-bars_val_mIoU", "fig-curves_val_mIoU", "fig-seeds_val_mIoU", "fig-class_iou", "fig-rl_diagnostics"}
    assert expected <= page.ids
    assert len(page.images) == len(expected)
    for src in page.images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.05          # a drawn figure, not a blank canvas
    # the same PNGs are in plots/ (and go to MLflow)
    assert {p.stem for p in (run_dir / "plots").glob("*.png")} == {i[len("fig-"):] for i in expected}


def test_table_has_every_row_with_its_statistics(rendered):
    run_dir, _, page, _ = rendered
    summary = pd.read_csv(run_dir / "table.csv")
    header = next(r for r in page.table_rows if r and r[0] == "row" and "95% CI of mean" in r)
    lines = {r[0]: dict(zip(header, r)) for r in page.table_rows if len(r) == len(header) and r is not header}
    for rec in summary.to_dict("records"):
        name = next(k for k in lines if k.startswith(rec["row"]))      # the name, then its marks
        line = lines[name]
        assert line["n"] == str(rec["n"])
        assert line["95% CI of mean"] == f"[{rec['ci_low']:.2f}, {rec['ci_high']:.2f}]"
    riou = next(v for k, v in lines.items() if k.startswith("r_IoU only"))
    assert riou["paper"] == "77.1" and riou["paper Δ"] == "+9.30" and riou["failed"] == "1"
    fcn = lines["FCN"]
    assert fcn["reused"] == "1" and fcn[f"Δ vs FCN"] == "—"
    assert next(v for k, v in lines.items() if k.startswith("r_IoU + r_Dice"))["stopped early"] == "1"
    assert any("r_IoU + r_Dice <b>" in r[0] for r in page.table_rows)    # escaped, shown as text
    # table.json holds the same numbers
    js = json.loads((run_dir / "table.json").read_text())
    assert [r["row"] for r in js] == [r["name"] for r in ROWS]
    assert js[1]["ci_low"] == pytest.approx(summary.loc[1, "ci_low"])


def test_cells_changes_and_environment_are_shown(rendered):
    run_dir, made, page, _ = rendered
    text = " ".join(" ".join(page.text).split())
    for rec in made["trials"]:
        assert " ".join(rec["rerun_command"].split()) in text
    cells = [r for r in page.table_rows if len(r) == 9 and r[0] != "row"]
    status = {(r[0], r[1]): r[2] for r in cells}
    assert status[("r_IoU only", "2")] == "failed failed"
    assert "TrainingDiverged" in text
    assert status[("FCN", "1")] == "ok reused" and "from run 20261130T000000Z-aaaaaa" in text
    assert status[("r_IoU + r_Dice <b>", "0")] == "ok stopped early"
    changes = [r for r in page.table_rows if len(r) == 4 and r[0] != "row"]
    assert ["FCN", "method.name", '"latent_rl"', '"supervised"'] in changes
    assert ["r_IoU + r_Dice <b>", "method.reward.weights.dice", "0", "1"] in changes
    for fact in ["0123456789abcdef0123456789abcdef01234567", "880ab251cab8249c", "CPU only", "package torch",
                 "seeds=[0,1,2]"]:
        assert fact in text, fact
    # the per-class table and the RL diagnostics by row
    assert {"background", "instrument-shaft", "thread"} <= {c for r in page.table_rows for c in r}
    assert any(r[:1] == ["row"] and "rl/clipfrac" in r and "train/log_sigma" in r for r in page.table_rows)


def test_a_folder_without_env_or_class_iou_still_gets_a_page(tmp_path):
    run_dir = tmp_path / "r"
    make_run(run_dir, with_env=False)
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    trials, _, meta = results.read_run(run_dir)
    from orchestrator.tables import summarize

    slim = epochs[[c for c in epochs.columns if not c.startswith(("val/IoU/", "train/", "rl/"))]]
    path, plots = report.write_report(run_dir, summarize(trials, METRIC, ROWS), trials, slim, meta, [])
    text = path.read_text()
    assert "env.json is not in this run folder" in text and "No val/IoU/&lt;class&gt; columns" in text
    assert "No RL diagnostics" in text and [p.stem for p in plots] == ["seeds_val_mIoU"]
