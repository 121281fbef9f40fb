"""Bad input, generated: whatever spec, search space, YAML bytes or key=value the fuzzer makes, `rlseg-sweep`
exits 0 with a dry-run plan or 2 with one line, never a traceback, and writes nothing (README "Specs", "Search").

The properties run `sweep_main` as the command line does. An input that fails the dry run is run again without
--dry-run: it must fail the same way before anything is created (only inputs known to be invalid are run so, so no
test here starts a sweep). Then explicit regressions, one per bug the fuzzing found.
"""
import contextlib
import io
import json
import math
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.cli import sweep_main
from orchestrator.preflight import local_nodes

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                   HealthCheck.large_base_example])


def sweep(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = sweep_main(list(argv))
        except SystemExit as e:      # argparse's own errors (an unknown --option) exit from inside parse_args
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def assert_clean_exit(spec: Path, *args: str) -> tuple[int, str, str]:
    """The property: dry run -> 0 and a plan, or 2 and one line; nothing written; the same failure without --dry-run."""
    results = spec.parent / "results"
    rc, out, err = sweep(str(spec), "--dry-run", *args, "--results-dir", str(results))
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert err.strip() and err.count("\n") == 1 and err.endswith("\n"), repr(err)
        assert len(err.splitlines()) == 1, repr(err)     # also no \r, \x85, \u2028 ... (str.splitlines splits on them)
        assert "Traceback" not in err and out == "", repr(err)
    else:
        assert "dry run: nothing started, nothing written" in out, out
    assert not results.exists()
    if rc == 2:
        rc_run, out_run, err_run = sweep(str(spec), *args, "--results-dir", str(results))
        assert (rc_run, out_run, err_run) == (rc, out, err)
        assert not results.exists()
    return rc, out, err


def fuzzed(spec: Path, *args: str) -> None:
    rc, _, _ = assert_clean_exit(spec, *args)
    event(f"exit {rc}")          # pytest --hypothesis-show-statistics: how many examples got past validation


# --------------------------------------------------------------------------- strategies

ODD_TEXT = ["", " ", "\t", "\n", "a\nb", "\r\n", "\x00", "a\x00b", "\u202eevil", "\u2028", "\x85", "\ufeff", "😀",
            "שלום", "ﷺ", ".", "..", "a.", ".a", "a..b", "=", "'", '"', "#", "&a", "*a", "!!binary AAAA", "%YAML 1.1",
            "---", "...", "- x", "? x", "{", "[", "}", "]", ",", "~", "null", "yes", "1e400", ".nan", ".inf", "-.inf",
            "-0", "0x10", "1_000", "2001-12-14", "supervised", "latent_rl", "smoke", "../presets/smoke", "x" * 300]
texts = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=10))
HUGE = [10**100, -10**100, 2**63, 2**63 - 1, -2**63, -2**63 - 1, 2**64, 2**32, 2**32 - 1, -1, 0, 10**400]
numbers = st.one_of(st.integers(), st.sampled_from(HUGE), st.floats(),
                    st.sampled_from([0.0, -0.0, 5e-324, 1.7976931348623157e308, float("nan"), float("inf"), -float("inf")]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)

CONFIG_KEYS = ["seed", "data", "data.name", "data.image_size", "data.train_size", "data.root", "data.seed", "model",
               "model.encoder", "model.decoder", "model.pretrained", "method", "method.name", "method.seg_loss",
               "method.seg_loss.dice", "method.policy", "method.policy.ema_eta", "method.policy.blocks",
               "method.loss.lambda_kl", "method.baseline.kind", "method.reward.weights", "method.reward.weights.iou",
               "schedule", "schedule.epochs", "schedule.lr", "schedule.optimizer", "schedule.grad_clip",
               "schedule.eval_every", "schedule.batch_size", "resources", "resources.workers",
               "resources.cpus_per_worker", "resources.gpus_per_worker", "resources.placement",
               "resources.max_failures"]
SPEC_KEYS = ["name", "title", "paper", "metric", "metric.name", "metric.mode", "seeds", "base", "profiles", "rows"]
SEARCH_KEYS = ["search", "num_samples", "trial_seed", "sampler", "sampler.seed", "sampler.n_startup_trials",
               "scheduler", "scheduler.kind", "scheduler.grace_period", "scheduler.reduction_factor", "confirm",
               "confirm.top_k", "confirm.seeds"]
key_names = st.one_of(st.sampled_from(CONFIG_KEYS + SPEC_KEYS + SEARCH_KEYS), texts)
keys = st.one_of(key_names, key_names, st.none(), st.integers(-3, 3), st.booleans(), st.floats())   # YAML keys needn't be strings
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=3)), max_leaves=8)

ABLATION = {"name": "fuzz", "title": "a fuzzed spec", "metric": {"name": "val/mIoU", "mode": "max"}, "seeds": [0, 1],
            "base": "supervised", "profiles": {"quick": {"schedule": {"epochs": 1}}},
            "rows": [{"name": "CE", "set": {}, "paper": 70.1},
                     {"name": "CE + Dice", "set": {"method.seg_loss.dice": 1.0}, "paper_std": 0.5}]}
ABLATION_PATHS = [("name",), ("title",), ("paper",), ("metric",), ("metric", "name"), ("metric", "mode"), ("seeds",),
                  ("seeds", 0), ("base",), ("profiles",), ("profiles", "quick"), ("profiles", "quick", "schedule"),
                  ("rows",), ("rows", 0), ("rows", 0, "name"), ("rows", 0, "set"), ("rows", 0, "paper"),
                  ("rows", 1, "paper_std"), ("rows", 1, "pending"), ("rows", 1, "note"), ("rows", 1, "set")]

SEARCH = {"name": "fuzz_search", "metric": {"name": "train/loss", "mode": "min"}, "base": "latent_rl",
          "search": "space.yaml", "num_samples": 4, "trial_seed": 0, "sampler": {"seed": 3, "n_startup_trials": 2},
          "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 4},
          "confirm": {"top_k": 1, "seeds": [0, 1]}, "profiles": {"tiny": {"schedule": {"epochs": 2}}}}
SEARCH_PATHS = [("name",), ("metric",), ("metric", "name"), ("base",), ("search",), ("num_samples",), ("trial_seed",),
                ("sampler",), ("sampler", "seed"), ("sampler", "n_startup_trials"), ("sampler", "kind"), ("scheduler",),
                ("scheduler", "kind"), ("scheduler", "grace_period"), ("scheduler", "reduction_factor"), ("confirm",),
                ("confirm", "top_k"), ("confirm", "seeds"), ("profiles", "tiny"), ("rows",), ("seeds",)]
SPACE = {"params": {"method.policy.ema_eta": {"uniform": [0.5, 0.99]}, "method.loss.lambda_kl": {"loguniform": [0.01, 10]},
                    "method.policy.blocks": {"int": [1, 5], "step": 2},
                    "method.baseline.kind": {"choice": ["ema", "batch_mean"]}}}
SPACE_KEYS = ["method.policy.ema_eta", "method.loss.lambda_kl", "method.policy.blocks", "method.baseline.kind",
              "method.reward.weights", "method.reward.weights.iou", "schedule.lr", "schedule.epochs", "seed", "method",
              "method.name", "data.image_size"]

DELETE = object()


def mutations(paths: list[tuple], key_pool: st.SearchStrategy) -> st.SearchStrategy:
    """(path, value) edits of a spec tree: a known path (or a new key under one) set to anything, or deleted."""
    where = st.one_of(st.sampled_from(paths),
                      st.builds(lambda p, k: p + (k,), st.sampled_from([()] + paths), key_pool))
    return st.lists(st.tuples(where, st.one_of(values, st.just(DELETE))), min_size=1, max_size=3)


def mutated(tree: dict, edits) -> dict:
    tree = json.loads(json.dumps(tree))
    for path, value in edits:
        node = tree
        try:
            for part in path[:-1]:
                node = node[part]
            if value is DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):   # an earlier edit replaced a node on the way: skip this one
            pass
    return tree


def dump(tree, style) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=style[0], default_flow_style=style[1])


dump_styles = st.tuples(st.booleans(), st.sampled_from([False, True, None]))

# edits of the YAML text itself: what a hand-edited file gets wrong
FRAGMENTS = ["\t", "  ", "&a ", "*a", "*nope", "<<: *a\n", "---\n", "...\n", "\x00", "\ufeff", "name: other\n",
             "rows: []\n", "? [1]\n: 2\n", "[" * 60, "{a: " * 40 + "1" + "}" * 40, "!!python/object:os.system\n",
             "!!binary AAAA", "%TAG ! tag:x,2000:\n", "\r", "\x85", "\u2028", "😀", "\u202e", "- ", ": ", "'", '"',
             "#", "\n", "{", "}", "[", "]", ",", ".inf", "1e400", str(10**100), "9" * 5000, "yes", "~"]
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf0\x9f\x98", b"\x00"]
DEEP = "[" * 1200      # beyond the recursion limit: PyYAML raised RecursionError
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
WHOLE_FILES = [b"", b"\n", b"   \n", b"~\n", b"[]\n", b"- a\n- b\n", b"42\n", b"'text'\n", b"--- \n...\n",
               b"name: a\n---\nname: b\n", DEEP.encode(), ("- " * 3000 + "x").encode(), ALIAS_BOMB.encode(),
               ("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 40))).encode(), b"\xff\xfe\x00n\x00a", b"\x00" * 8]


@st.composite
def spliced(draw, text: str) -> bytes:
    """`text` with a few fragments inserted or characters replaced, sometimes with invalid UTF-8 bytes."""
    data = text.encode()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        piece = draw(st.one_of(st.sampled_from(FRAGMENTS).map(str.encode), st.sampled_from(BAD_BYTES),
                               st.text(max_size=4).map(str.encode)))
        data = data[:at] + piece + data[at + cut:]
    return data


def file_bytes(valid: str) -> st.SearchStrategy:
    return st.one_of(spliced(valid), st.sampled_from(WHOLE_FILES), st.binary(max_size=40))


# --------------------------------------------------------------------------- the properties


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="rlseg-fuzz-")


@settings(max_examples=100, **FUZZ)
@given(edits=mutations(ABLATION_PATHS, st.one_of(keys, st.sampled_from(CONFIG_KEYS))), style=dump_styles)
def test_any_ablation_spec_exits_0_or_2_in_one_line(edits, style):
    with workdir() as d:
        spec = Path(d) / "spec.yaml"
        spec.write_text(dump(mutated(ABLATION, edits), style), encoding="utf-8")
        fuzzed(spec)


@settings(max_examples=60, **FUZZ)
@given(edits=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS + ["x", "a..b", "schedule.", "", "😀\n"]), values),
                      min_size=1, max_size=3),
       where=st.sampled_from(["row", "profile", "base"]))
def test_any_config_keys_in_rows_profiles_and_inline_base(edits, where):
    tree = json.loads(json.dumps(ABLATION))
    assignments = {k: v for k, v in edits}
    args = []
    if where == "row":
        tree["rows"][1]["set"] = assignments
    elif where == "profile":
        tree["profiles"]["quick"] = assignments
        args = ["--profile", "quick"]
    else:
        tree["base"] = assignments
    with workdir() as d:
        spec = Path(d) / "spec.yaml"
        spec.write_text(dump(tree, (True, None)), encoding="utf-8")
        fuzzed(spec, *args)


@settings(max_examples=100, **FUZZ)
@given(data=file_bytes(dump(ABLATION, (False, False))))
def test_any_bytes_as_a_spec_file(data):
    with workdir() as d:
        spec = Path(d) / "spec.yaml"
        spec.write_bytes(data)
        fuzzed(spec)


override_keys = st.one_of(
    st.sampled_from(CONFIG_KEYS + SPEC_KEYS + SEARCH_KEYS + ["", ".", "..", "a..b", "schedule.", ".schedule",
                                                             "schedule..epochs", "x" * 300, ".".join(["a"] * 40)]),
    texts)


def yaml_flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).removesuffix("\n...\n").strip()


override_values = st.one_of(
    texts, values.map(yaml_flow), numbers.map(str),
    st.sampled_from(["[1", "{a: ", "{a: 1}", "[0, 1]", "'3'", '"3"', "&a 1", "*a", "!!binary AAAA",
                     "!!python/name:os.system", "1\n---\n2", "a: b", "- 1", "'unclosed", "[" * 3000,
                     "{a: " * 40 + "1" + "}" * 40, "3 # comment", "%YAML 1.1", "@x", "`x", "9" * 5000]))
GOOD_OVERRIDES = ["schedule.epochs=3", "seeds=[7]", "metric.mode=min", "method.seg_loss.dice=0.5", "num_samples=6",
                  "scheduler=none", "confirm.top_k=1", "schedule={batch_size: 4}", "data.train_size=null", "title=x",
                  "resources.workers=3", "resources.workers=0", "resources.gpus_per_worker=1",
                  "resources.cpus_per_worker=0.5", "schedule.batch_size=1000", "scheduler.grace_period=5",
                  "schedule.epochs=1", "data.train_size=8", "metric.name=val/IoU/thread"]
override_args = st.one_of(
    st.sampled_from(GOOD_OVERRIDES),
    st.builds(lambda k, sep, v: k + sep + v, override_keys, st.sampled_from(["=", "=", "=", "", "==", " = ", "=\n"]),
              override_values).filter(lambda a: not a.startswith("-")))   # `-x`/`--x`: options (argparse: below)


@settings(max_examples=120, **FUZZ)
@given(overrides=st.lists(override_args, min_size=1, max_size=3), search=st.booleans())
def test_any_key_value_overrides(overrides, search):
    with workdir() as d:
        if search:
            (Path(d) / "space.yaml").write_text(dump(SPACE, (False, None)))
        spec = Path(d) / "spec.yaml"
        spec.write_text(dump(SEARCH if search else ABLATION, (False, None)))
        fuzzed(spec, *overrides)


@settings(max_examples=50, **FUZZ)
@given(args=st.lists(st.one_of(st.sampled_from(["--profile", "--max-concurrent", "--resume", "--address", "--list",
                                                 "-v", "--", "-x=1", "--x\ny", "--max-concurrent=x\ny",
                                                 "--max-concurrent=0", "--profile=\x00", "--profile=\u2028"]),
                               override_args), min_size=1, max_size=3))
def test_any_options_on_the_command_line(args):
    with workdir() as d:
        spec = Path(d) / "spec.yaml"
        spec.write_text(dump(ABLATION, (False, None)))
        if "--list" not in args:     # --resume: no run folder here, so it is one line (or a dry run of nothing)
            fuzzed(spec, *args)
            return
        results = Path(d) / "results"      # --list prints the registries and ignores the rest, if it parses
        rc, out, err = sweep(str(spec), *args, "--results-dir", str(results))
        assert not results.exists()
        if rc == 0:
            assert err == "" and "presets:" in out and "methods:" in out, (out, err)
        else:
            assert rc == 2 and err.count("\n") == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err


# resources and scheduler values: a plan that passes the dry run must fit this machine and its own schedule
MACHINE = local_nodes()[0]
counts = st.one_of(st.integers(0, 5), st.sampled_from(HUGE))
amounts = st.one_of(st.sampled_from([0.25, 0.5, 1, 2, 3, 64]), st.floats(0, 8), numbers)
PLAN_VALUES = ["workers", "cpus", "gpus", "batch", "train", "epochs", "grace", "factor"]


@settings(max_examples=80, **FUZZ)
@given(workers=st.integers(0, 3), cpus=st.sampled_from([0.5, 1, 2]), gpus=st.sampled_from([0, 0, 0, 0.5, 1]),
       batch=st.integers(1, 40), train=st.integers(1, 64), epochs=st.integers(1, 4), grace=st.integers(1, 4),
       factor=st.sampled_from([2, 3.5]), search=st.booleans(),
       wild=st.one_of(st.none(), st.tuples(st.sampled_from(PLAN_VALUES), st.one_of(counts, amounts, st.none()))))
def test_any_resources_and_scheduler_values(workers, cpus, gpus, batch, train, epochs, grace, factor, search, wild):
    """Plausible values, one of them (`wild`) anything."""
    if wild is not None:
        name, value = wild
        workers, cpus, gpus, batch, train, epochs, grace, factor = (
            value if n == name else v for n, v in zip(PLAN_VALUES, (workers, cpus, gpus, batch, train, epochs,
                                                                     grace, factor)))
    overrides = [f"resources.workers={yaml_flow(workers)}", f"resources.cpus_per_worker={yaml_flow(cpus)}",
                 f"resources.gpus_per_worker={yaml_flow(gpus)}", f"schedule.batch_size={yaml_flow(batch)}",
                 f"data.train_size={yaml_flow(train)}", f"schedule.epochs={yaml_flow(epochs)}"]
    if search:
        overrides += [f"scheduler.grace_period={yaml_flow(grace)}", f"scheduler.reduction_factor={yaml_flow(factor)}"]
    with workdir() as d:
        if search:
            (Path(d) / "space.yaml").write_text(dump(SPACE, (False, None)))
        spec = Path(d) / "spec.yaml"
        spec.write_text(dump(SEARCH if search else ABLATION, (False, None)))
        rc, _, err = assert_clean_exit(spec, *overrides)
        event(f"exit {rc}")
        if rc != 0:
            return
    # an independent account of what the plan check promises for a plan it lets through
    ranks = max(workers, 1)
    assert ranks * cpus <= MACHINE["CPU"] + 1e-9 and ranks * gpus <= MACHINE["GPU"] + 1e-9, err
    if train is not None:
        assert batch <= math.ceil(train / ranks)
    if search:
        assert grace <= epochs and factor > 1


@st.composite
def distributions(draw):
    kind = draw(st.sampled_from(["uniform", "loguniform", "int", "choice", "odd"]))
    if kind == "choice":
        dist = {"choice": draw(st.one_of(st.lists(scalars, max_size=4), values))}
    elif kind == "odd":
        return draw(values)
    else:
        good = st.floats(0.01, 1) if kind != "int" else st.integers(1, 8)
        low, high = draw(st.one_of(good, numbers)), draw(st.one_of(good, numbers))
        dist = {kind: draw(st.one_of(st.lists(good, min_size=2, max_size=2, unique=True).map(sorted),
                                     st.just([low, high]), st.just(_ordered(low, high)), values))}
        if kind == "int" and draw(st.booleans()):
            dist["step"] = draw(st.one_of(st.integers(-1, 4), scalars))
    extra = draw(st.one_of(st.none(), st.tuples(keys, values)))
    if extra:
        dist[extra[0]] = extra[1]                # an extra key: a second distribution, `step`, anything
    return dist


def _ordered(low, high) -> list:
    try:
        return sorted([low, high])
    except TypeError:
        return [low, high]


spaces = st.one_of(
    st.builds(lambda key, dist: {"params": {**SPACE["params"], key: dist}}, st.sampled_from(SPACE_KEYS), distributions()),
    st.builds(lambda params, extra: {**extra, "params": params},
              st.dictionaries(st.one_of(st.sampled_from(SPACE_KEYS), keys), distributions(), min_size=1, max_size=3),
              st.dictionaries(st.one_of(st.sampled_from(["name", "description", "method"]), keys), values, max_size=2)))


@settings(max_examples=70, **FUZZ)
@given(space=st.one_of(spaces, values), edits=st.one_of(st.just([]), st.just([]), mutations(SEARCH_PATHS, keys)),
       style=dump_styles)
def test_any_search_spec_and_space(space, edits, style):
    with workdir() as d:
        (Path(d) / "space.yaml").write_text(dump(space, style), encoding="utf-8")
        spec = Path(d) / "search.yaml"
        spec.write_text(dump(mutated(SEARCH, edits), style), encoding="utf-8")
        fuzzed(spec)


@settings(max_examples=50, **FUZZ)
@given(data=file_bytes(dump(SPACE, (False, None))))
def test_any_bytes_as_a_search_space_file(data):
    with workdir() as d:
        (Path(d) / "space.yaml").write_bytes(data)
        spec = Path(d) / "search.yaml"
        spec.write_text(dump(SEARCH, (False, None)))
        fuzzed(spec)


run_json = st.one_of(st.binary(max_size=20), values.map(json.dumps),
                     st.fixed_dictionaries({"phase": st.sampled_from(["search", "confirm", "sweep"])},
                                           optional={"profile": scalars, "overrides": values}).map(json.dumps))


@settings(max_examples=40, **FUZZ)
@given(state=run_json, resolved=st.one_of(st.none(), st.binary(max_size=20), values.map(lambda v: dump(v, (True, None)))),
       latest=st.booleans())
def test_any_damaged_run_folder_for_resume(state, resolved, latest):
    with workdir() as d:
        spec = Path(d) / "spec.yaml"
        spec.write_text(dump(ABLATION, (False, None)))
        run = Path(d) / "runs" / "fuzz" / "2024-01-01_000000"
        run.mkdir(parents=True)
        (run / "run.json").write_bytes(state if isinstance(state, bytes) else state.encode())
        if resolved is not None:
            (run / "spec.resolved.yaml").write_bytes(resolved if isinstance(resolved, bytes) else resolved.encode())
        resume = ["--resume"] if latest else ["--resume", str(run)]
        rc, out, err = sweep(str(spec), "--dry-run", *resume, "--results-dir", str(Path(d) / "runs"))
        assert rc == 2, (rc, err)          # a generated spec.resolved.yaml never matches the spec's plan
        assert err.count("\n") == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, repr(err)


# --------------------------------------------------------------------------- regressions: one per bug found

GOOD = textwrap.dedent("""\
    name: demo
    seeds: [0]
    rows:
      - name: a
        set: {}
""")
SEARCH_SPEC = "name: s\nbase: latent_rl\nsearch: space.yaml\n"
SEARCH_SPACE = "params:\n  method.policy.ema_eta: {uniform: [0.5, 0.99]}\n"


def one_error(tmp_path, text, *args, space=None) -> str:
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(text if isinstance(text, bytes) else text.encode())
    if space is not None:
        (tmp_path / "space.yaml").write_text(space)
    rc, _, err = assert_clean_exit(spec, *args)
    assert rc == 2, err
    return err.strip()


@pytest.mark.parametrize("text, args, expected", [
    # was RecursionError from PyYAML, deepcopy or pydantic
    (DEEP, [], "spec.yaml: not valid YAML: line 1, column 33: nested more than 32 levels deep"),
    ("name: demo\nrows: [{name: a, set: " + "{a: " * 40 + "1" + "}" * 40 + "}]\n", [], "line 2, column 136: nested more than 32 levels deep"),
    (GOOD, ["schedule=" + "[" * 3000], "command line: schedule: value '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[...' is not valid YAML (nested more than 32 levels deep)"),
    (GOOD, ["schedule=" + "{a: " * 40 + "1" + "}" * 40], "command line: schedule: value '{a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: {a: ...' is not valid YAML (nested more than 32 levels deep)"),
    (ALIAS_BOMB + GOOD, [], "more than 100000 values (after expanding aliases)"),
    # was: the last of two equal keys silently won
    ("name: demo\nname: other\nrows: [{name: a}]\n", [], "not valid YAML: line 2, column 1: duplicate key 'name'"),
    ("name: demo\nrows: [{name: a, set: {}, set: {schedule.epochs: 2}}]\n", [], "duplicate key 'set'"),
    # was: a message over two lines (the newline, U+2028, NUL or RTL override printed raw)
    (GOOD.replace("set: {}", 'set: {"a\\nb": 1}'), [], "rows[0] (a).set: a\\nb: unknown key"),
    (GOOD.replace("name: a", 'name: "x\\u2028y"').replace("set: {}", "set: {nope: 1}"), [], "rows[0] (x\\u2028y).set"),
    (GOOD, ["a\u2028b=1"], "command line: a\\u2028b: unknown key"),
    (GOOD, ["\u202e\x00=1"], "command line: \\u202e\\x00: unknown key"),
    (GOOD, ["--x\ny"], "command line: unrecognized arguments: --x\\ny"),
    # was accepted: NaN and infinity (the table shows nan; a trial trains to NaN)
    (GOOD + "    paper: .nan\n", [], "rows[0].paper: Input should be a finite number"),
    (GOOD + "    paper_std: .inf\n", [], "rows[0].paper_std: Input should be a finite number"),
    (GOOD, ["schedule.lr=.inf"], "command line: schedule.lr: expected a finite number, got inf"),
    (GOOD, ["method=latent_rl", "method.reward.weights.iou=.nan"], "method.reward.weights.iou: expected a finite number"),
    # was accepted: integers torch, numpy and Parquet cannot hold (every trial would fail)
    (GOOD, [f"seeds=[{10**100}]"], "command line: seeds[0]: Input should be less than or equal to 9223372036854775807"),
    (GOOD, [f"schedule.epochs={10**100}"], "command line: schedule.epochs: expected a whole number within 64 bits"),
    # was ValueError from int(): more digits than Python converts
    (GOOD.replace("seeds: [0]", "seeds: [" + "9" * 5000 + "]"), [], "line 2, column 9: a number of 5000 digits; too long"),
    (GOOD, ["schedule.epochs=" + "9" * 5000], "is not valid YAML (a number of 5000 digits; too long)"),
    (GOOD.replace("set: {}", f"set: {{data.seed: {2**64}}}"), [], "rows[0] (a).set: data.seed: expected a whole number"),
    # was: an empty part of a dotted key was a key '' of the config
    (GOOD.replace("set: {}", "set: {schedule..epochs: 1}"), [], "'schedule..epochs': expected a dotted key (no empty part)"),
    (GOOD.replace("set: {}", "set: {1: 2}"), [], "rows[0].set: key 1: Input should be a valid string"),
    # was OSError (file name too long) or a preset read from outside trainers/presets
    ("name: demo\nrows: [{name: a}]\nbase: " + "x" * 5000 + "\n", [], "base: no preset 'xxxx"),
    ("name: demo\nrows: [{name: a}]\nbase: ../presets/smoke\n", [], "base: no preset '../presets/smoke'"),
])
def test_regression_spec_and_override_errors(tmp_path, text, args, expected):
    assert expected in one_error(tmp_path, text, *args)


@pytest.mark.parametrize("spec, space, expected", [
    # was OverflowError in the dry run ([config] * num_samples)
    (SEARCH_SPEC + f"num_samples: {10**100}\n", SEARCH_SPACE, "num_samples: Input should be less than or equal to 100000"),
    # was accepted, then TPESampler raised when the search started (after the run folder was made)
    (SEARCH_SPEC + "sampler: {seed: -1}\n", SEARCH_SPACE, "sampler.seed: Input should be greater than or equal to 0"),
    (SEARCH_SPEC + f"sampler: {{seed: {2**32}}}\n", SEARCH_SPACE, "sampler.seed: Input should be less than or equal to"),
    (SEARCH_SPEC + "scheduler: {reduction_factor: .inf}\n", SEARCH_SPACE, "scheduler.reduction_factor: Input should be a finite"),
    # was OSError: file name too long
    (SEARCH_SPEC.replace("space.yaml", "x" * 5000), SEARCH_SPACE, "search: no search space file 'xxx"),
    # was OverflowError formatting or averaging the bounds
    (SEARCH_SPEC, f"params:\n  method.policy.ema_eta: {{uniform: [0.5, {10**400}]}}\n", "two finite numbers"),
    (SEARCH_SPEC, f"params:\n  method.policy.blocks: {{int: [1, {10**100}]}}\n", "params.method.policy.blocks: int: expected"),
    # was TypeError sorting keys of mixed types
    (SEARCH_SPEC, "3: x\nfoo: y\n" + SEARCH_SPACE, "space.yaml: 3: unknown key (expected one of: name, description"),
    (SEARCH_SPEC, "params:\n  method.policy.ema_eta: {uniform: [0.5, 0.9], 3: x, foo: y}\n",
     "params.method.policy.ema_eta: 3: unknown key"),
    # was: 'params.None: ... None: unknown key' and the like
    (SEARCH_SPEC, "params:\n  null: {uniform: [0, 1]}\n", "params: None: expected a config path"),
    (SEARCH_SPEC, "params:\n  method..policy: {uniform: [0, 1]}\n", "params: 'method..policy': expected a config path"),
    # was: the second ema_eta silently replaced the first
    (SEARCH_SPEC, SEARCH_SPACE + "  method.policy.ema_eta: {uniform: [0.1, 0.2]}\n", "duplicate key 'method.policy.ema_eta'"),
    (SEARCH_SPEC, "params: " + "{a: " * 300 + "1" + "}" * 300 + "\n", "space.yaml: not valid YAML: line 1, column 130: nested more than 32 levels deep"),
])
def test_regression_search_errors(tmp_path, spec, space, expected):
    assert expected in one_error(tmp_path, spec, space=space)


def test_merge_keys_may_still_be_overridden(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: demo\nrows:\n  - &d {name: a, set: {schedule.epochs: 2}}\n  - <<: *d\n    name: b\n")
    rc, out, err = assert_clean_exit(spec)
    assert rc == 0, err
    assert "rows: 2" in out


@pytest.mark.parametrize("state, resolved, expected", [
    ("garbage{", None, "run.json cannot be read (JSONDecodeError"),           # was JSONDecodeError
    ("[1]", None, "run.json: not as rlseg-sweep writes it"),                   # was AttributeError (both ways)
    ('{"phase": "sweep", "overrides": 3}', None, "run.json: not as rlseg-sweep writes it"),   # was TypeError
    ('{"phase": "sweep"}', None, "spec.resolved.yaml cannot be read (FileNotFoundError"),     # was FileNotFoundError
    ('{"phase": "sweep"}', "[1]", "spec.resolved.yaml: not as rlseg-sweep writes it"),        # was TypeError
])
@pytest.mark.parametrize("latest", [False, True])
def test_regression_damaged_run_folder(tmp_path, state, resolved, expected, latest):
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD)
    run = tmp_path / "runs" / "demo" / "2024-01-01_000000"
    run.mkdir(parents=True)
    (run / "run.json").write_text(state)
    if resolved is not None:
        (run / "spec.resolved.yaml").write_text(resolved)
    resume = ["--resume"] if latest else ["--resume", str(run)]
    rc, _, err = sweep(str(spec), "--dry-run", *resume, "--results-dir", str(tmp_path / "runs"))
    assert rc == 2 and len(err.splitlines()) == 1, err
    if latest and state in ("garbage{", "[1]"):      # found while looking for the newest unfinished run
        expected = "--resume: a run folder under"
    assert expected in err, err
