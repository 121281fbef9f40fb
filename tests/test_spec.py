"""Spec loading, resolution, --dry-run and bad input: one line naming file and key, exit 2, nothing written."""
import textwrap

import pytest

from orchestrator.cli import sweep_main
from orchestrator.spec import SearchPlan, SpecError, resolve
from trainers.overrides import OverrideError, apply_overrides, parse_assignments

GOOD = textwrap.dedent("""
    name: demo
    title: a demo
    metric: {name: val/mIoU, mode: max}
    seeds: [0, 1, 2]
    base: supervised
    profiles:
      quick: {schedule: {epochs: 1}, data: {train_size: 16}}
    rows:
      - name: CE
        set: {}
        paper: 70.1
      - name: CE + Dice
        set: {method.seg_loss: {dice: 1.0}}
""")


def run_cli(capsys, *args):
    rc = sweep_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_resolve_rows_seeds_and_changes(write_spec):
    plan = resolve(write_spec(GOOD))
    assert [r.name for r in plan.rows] == ["CE", "CE + Dice"]
    assert len(plan.trials) == 6
    assert [t.seed for t in plan.trials[:3]] == [0, 1, 2]
    assert plan.rows[0].changes == {}
    assert plan.rows[1].changes == {"method.seg_loss.dice": 1.0}
    assert plan.rows[1].config["method"]["seg_loss"] == {"ce": 1.0, "dice": 1.0, "ce_reduction": "mean"}   # merged
    assert plan.rows[0].paper == 70.1 and plan.rows[1].paper is None
    assert all(t.config["seed"] == t.seed for t in plan.trials)


def test_profile_and_cli_overrides_apply_to_every_row(write_spec):
    plan = resolve(write_spec(GOOD), profile="quick", overrides=["schedule.batch_size=4", "seeds=[7]"])
    for r in plan.rows:
        assert r.config["schedule"]["epochs"] == 1
        assert r.config["data"]["train_size"] == 16
        assert r.config["schedule"]["batch_size"] == 4
    assert [t.seed for t in plan.trials] == [7, 7]


def test_row_wins_over_cli_for_the_keys_it_sets(write_spec):
    plan = resolve(write_spec(GOOD), overrides=["method.seg_loss.dice=0.5"])
    assert plan.rows[0].config["method"]["seg_loss"]["dice"] == 0.5
    assert plan.rows[1].config["method"]["seg_loss"]["dice"] == 1.0


def test_inline_base_mapping(write_spec):
    spec = GOOD.replace("base: supervised", "base: {schedule: {epochs: 3}, method: supervised}")
    plan = resolve(write_spec(spec))
    assert plan.base_config["schedule"]["epochs"] == 3


@pytest.mark.parametrize("text, override, where, key", [
    (GOOD.replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2]\nwhatever: 1"), [], "spec.yaml", "whatever"),
    (GOOD.replace("seeds: [0, 1, 2]", "seeds: [0, x]"), [], "spec.yaml", "seeds[1]"),
    (GOOD.replace("{method.seg_loss: {dice: 1.0}}", "{method.seg_loss: {dice: lots}}"), [], "rows[1] (CE + Dice).set",
     "method.seg_loss.dice"),
    (GOOD.replace("{method.seg_loss: {dice: 1.0}}", "{schedule.epoch: 3}"), [], "rows[1] (CE + Dice).set",
     "schedule.epoch"),
    (GOOD.replace("base: supervised", "base: no_such_preset"), [], "spec.yaml", "base"),
    (GOOD, ["schedule.epochz=3"], "command line", "schedule.epochz"),
    (GOOD, ["schedule.epochs=three"], "command line", "schedule.epochs"),
    (GOOD, ["model.encoder=resnet51"], "command line", "model.encoder"),
    (GOOD, ["schedule.epochs.deeper=1"], "command line", "schedule.epochs"),
    (GOOD, ["novalue"], "command line", "novalue"),
    (GOOD.replace("mode: max", "mode: upward"), [], "spec.yaml", "metric.mode"),
    ("name: demo\nrows: [{name: a}]\nseeds: [1, 1]\n", [], "spec.yaml", "seeds"),
    ("name: demo\nrows: [{name: a}, {name: a}]\n", [], "spec.yaml", "rows"),
    ("name: demo\nrows: [{name: a, set: {method: latent_typo}}]\n", [], "rows[0] (a).set", "method"),
    ("name: demo\nrows: {name: a}\n", [], "spec.yaml", "rows"),
    ("name: [unclosed\n", [], "spec.yaml", "not valid YAML: line"),
    ("- just\n- a list\n", [], "spec.yaml", "mapping"),
])
def test_bad_input_is_one_line_naming_file_and_key(capsys, tmp_path, write_spec, text, override, where, key):
    spec = write_spec(text)
    results = tmp_path / "results"
    rc, out, err = run_cli(capsys, str(spec), *override, "--results-dir", str(results))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert where in lines[0] and key in lines[0], lines[0]
    assert "Traceback" not in err
    assert not results.exists()   # nothing half-written


def test_missing_file_and_profile(capsys, tmp_path, write_spec):
    rc, _, err = run_cli(capsys, str(tmp_path / "nope.yaml"), "--results-dir", str(tmp_path / "r"))
    assert rc == 2 and "nope.yaml: no such file" in err
    rc, _, err = run_cli(capsys, str(write_spec(GOOD)), "--profile", "paper", "--dry-run")
    assert rc == 2 and "profiles" in err and "quick" in err   # names the profiles that exist


def test_unknown_key_lists_the_expected_keys(write_spec):
    with pytest.raises(SpecError) as e:
        resolve(write_spec(GOOD), overrides=["data.imagesize=32"])
    assert "data.imagesize: unknown key (expected one of:" in str(e.value)
    assert "image_size" in str(e.value)


def test_dry_run_prints_matrix_and_writes_nothing(capsys, tmp_path, write_spec, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, str(write_spec(GOOD)), "--dry-run", "schedule.epochs=3")
    assert rc == 0, err
    assert "rows: 2   trials: 6" in out
    assert "CE + Dice" in out and "method.seg_loss.dice=1.0" in out and "70.1" in out
    assert "epochs=3" in out
    assert not (tmp_path / "results").exists()


def test_shipped_specs_dry_run(capsys, repo):
    specs = sorted((repo / "ablations").glob("*.yaml"))
    assert {"hybrid", "reward", "baseline", "objective", "lambda", "modulation", "logsigma", "backbones"} <= {
        s.stem for s in specs}
    for spec in specs:
        rc, out, err = run_cli(capsys, str(spec), "--dry-run")
        assert rc == 0, f"{spec.name}: {err}"
        plan = resolve(spec)
        if plan.spec.profiles:   # each profile resolves too (the paper one: FCN-R50-D8 on VOC aug, SGD)
            for name in plan.spec.profiles:
                resolved = resolve(spec, profile=name)
                assert resolved.params if isinstance(resolved, SearchPlan) else resolved.rows


def test_paper_profile_is_the_papers_setting(repo):
    plan = resolve(repo / "ablations" / "reward.yaml", profile="paper", overrides=["data.root=/data/VOCdevkit"])
    cfg = plan.rows[-1].config
    assert cfg["data"]["name"] == "voc2012_aug" and cfg["data"]["root"] == "/data/VOCdevkit"
    assert cfg["data"]["image_size"] == 512 and cfg["data"]["train_size"] is None
    assert cfg["model"]["encoder"] == "resnet50c_d8" and cfg["model"]["decoder"] == "fcn"   # SSSegmentation v1c
    s = cfg["schedule"]
    assert (s["epochs"], s["optimizer"], s["lr"], s["momentum"], s["weight_decay"]) == (60, "sgd", 0.01, 0.9, 5e-4)
    assert s["batch_size"] * cfg["resources"]["workers"] == 16
    assert cfg["method"]["policy"]["detach_state"] is False and cfg["method"]["policy"]["lr_scale"] == 1.0
    # per-element PPO ratios: the image-level one is inert at these shapes (measured; the preset says so)
    assert cfg["method"]["loss"]["ratio_level"] == "element"
    assert plan.rows[0].config["method"] == {"name": "supervised",
                                             "seg_loss": {"ce": 1.0, "dice": 0.0, "ce_reduction": "mean"}}


PENDING = GOOD + textwrap.indent(textwrap.dedent("""
    - name: future backbone
      set: {model.encoder: mit_b9}
      paper: 80.5
      paper_std: 0.5
      pending: no mit_b9 yet
    - name: marked pending but resolves
      set: {model.encoder: tiny_cnn}
      pending: stale note
"""), "  ")


def test_pending_row_is_shown_and_tabulated_but_not_run(capsys, write_spec):
    path = write_spec(PENDING)
    plan = resolve(path)
    assert [r.name for r in plan.rows] == ["CE", "CE + Dice", "marked pending but resolves"]
    assert {t.row for t in plan.trials} == {r.name for r in plan.rows} and len(plan.trials) == 9
    (p,) = plan.pending
    assert (p.index, p.reason, p.paper, p.paper_std) == (2, "no mit_b9 yet", 80.5, 0.5)
    assert "model.encoder" in p.error and "mit_b9" in p.error
    assert [r["name"] for r in plan.table_rows()] == ["CE", "CE + Dice", "future backbone", "marked pending but resolves"]
    assert plan.table_rows()[2]["pending"] == "no mit_b9 yet"
    rc, out, err = run_cli(capsys, str(path), "--dry-run")
    assert rc == 0, err
    assert "rows: 3 (+1 pending)   trials: 9" in out
    line = next(l for l in out.splitlines() if "future backbone" in l)
    assert "PENDING" in line and "no mit_b9 yet" in line and "80.5 ± 0.5" in line
    # without `pending` the same row is an error naming the row and the key
    rc, _, err = run_cli(capsys, str(write_spec(PENDING.replace("pending: no mit_b9 yet", "note: x"))), "--dry-run")
    assert rc == 2 and "rows[2] (future backbone).set: model.encoder" in err


def test_profile_may_name_a_preset(write_spec):
    path = write_spec(GOOD.replace("quick: {schedule: {epochs: 1}, data: {train_size: 16}}", "quick: smoke"))
    cfg = resolve(path, profile="quick").rows[0].config
    assert cfg["schedule"]["epochs"] == 2 and cfg["data"]["train_size"] == 64
    with pytest.raises(SpecError, match=r"profiles.quick: no preset 'nope'"):
        resolve(write_spec(GOOD.replace("quick: {schedule: {epochs: 1}, data: {train_size: 16}}", "quick: nope")),
                profile="quick")


def test_overrides_merge_replace_and_method_switch():
    tree = {"method": {"name": "supervised", "seg_loss": {"ce": 1.0}}, "schedule": {"epochs": 2}}
    apply_overrides(tree, {"method.seg_loss": {"dice": 1.0}, "schedule.epochs": 5})
    assert tree["method"]["seg_loss"] == {"ce": 1.0, "dice": 1.0}
    assert tree["schedule"]["epochs"] == 5
    apply_overrides(tree, {"method": "other"})         # another method: its keys start afresh
    assert tree["method"] == {"name": "other"}
    apply_overrides(tree, {"data": {"a.b": 1}})         # dotted keys inside mappings expand
    assert tree["data"] == {"a": {"b": 1}}
    with pytest.raises(OverrideError, match="schedule.epochs"):
        apply_overrides(tree, {"schedule.epochs.x": 1})


def test_parse_assignments_types():
    assert parse_assignments(["a.b=3", "c=0.5", "d=[1, 2]", "e=null", "f=text", "g={x: 1}"]) == [
        ("a.b", 3), ("c", 0.5), ("d", [1, 2]), ("e", None), ("f", "text"), ("g", {"x": 1})]
    for bad in ["=3", "a..b=1", "novalue", "a=[unclosed"]:
        with pytest.raises(OverrideError):
            parse_assignments([bad])


def test_resume_keeps_the_runs_max_concurrent_unless_given_anew(write_spec, tmp_path, capsys):
    import yaml

    from orchestrator import results
    from orchestrator.sweep import run_state

    spec = write_spec(GOOD)
    plan = resolve(spec, profile="quick")
    run = tmp_path / "results" / "demo" / "20260101T000000Z-abcdef"
    run.mkdir(parents=True)
    results.update_state(run, **run_state(plan, 3), kind="ablation", phase="sweep")   # as the first start wrote it
    (run / "spec.resolved.yaml").write_text(yaml.safe_dump(plan.resolved(), sort_keys=False))
    common = (str(spec), "--resume", str(run), "--dry-run", "--results-dir", str(tmp_path / "results"))
    rc, out, err = run_cli(capsys, *common)
    assert rc == 0 and "max concurrent trials (local): 3" in out, err
    rc, out, err = run_cli(capsys, *common, "--max-concurrent", "1")
    assert rc == 0 and "max concurrent trials (local): 1" in out, err
