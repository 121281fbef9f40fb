"""Search spaces that respect the methods: conditional (define-by-run) parameters, the momentum distribution, null
choices, and ASHA that waits for each trial's RL phase (real Optuna samplers and Ray Tune's ASHA, no Tune run)."""
import math
import textwrap

import optuna
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestrator.cli import sweep_main
from orchestrator.rungs import MethodAwareASHA, rl_start_epoch
from orchestrator.search import make_scheduler, search_trial_config
from orchestrator.spec import SpecError, config_with, resolve
from orchestrator.study import SAMPLED, SpaceSampler, optuna_distributions, sample_space
from orchestrator.space import SearchParam
from trainers.config import flatten

SPEC = textwrap.dedent("""
    name: cond_search
    metric: {name: train/loss, mode: min}
    base: {BASE}
    search: space.yaml
    num_samples: 4
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    confirm: {top_k: 1, seeds: [0]}
""")

LATENT = textwrap.dedent("""
    method: latent_rl
    params:
      method.baseline.kind: {choice: [ema, batch_mean, group]}
      method.baseline.tau: {momentum: [0.5, 0.999], when: {method.baseline.kind: ema}}
      method.baseline.group_size: {int: [2, 8], step: 2, when: {method.baseline.kind: group}}
      method.policy.log_sigma_bound: {choice: [2.0, 4.0, null]}
      method.policy.ema_eta: {momentum: [0.5, 0.999]}
""")


@pytest.fixture
def space_spec(tmp_path):
    def write(space: str = LATENT, base: str = "latent_rl"):
        (tmp_path / "space.yaml").write_text(space)
        (tmp_path / "search.yaml").write_text(SPEC.replace("{BASE}", base))
        return tmp_path / "search.yaml"
    return write


def test_momentum_puts_a_fifth_of_its_mass_at_0_99_and_above():
    p = SearchParam(key="method.baseline.tau", kind="momentum", low=0.5, high=0.999)
    # closed form: 1 - x ~ loguniform[0.001, 0.5]; P(x >= 0.99) = P(1 - x <= 0.01) = ln(0.01/0.001) / ln(0.5/0.001)
    assert math.log(10) / math.log(500) == pytest.approx(0.3705, abs=1e-4)
    draws = [v[p.key] for v in sample_space([p], {}, 3000, seed=0)]
    assert min(draws) >= 0.5 and max(draws) <= 0.999
    share = sum(v >= 0.99 for v in draws) / len(draws)
    assert share >= 0.2 and share == pytest.approx(0.3705, abs=0.03), share
    assert optuna_distributions([p]) == {"1 - method.baseline.tau": optuna.distributions.FloatDistribution(
        0.001, 0.5, log=True)}                                     # the study holds 1 - tau, log-scaled
    uniform = SearchParam(key="x", kind="uniform", low=0.5, high=0.999)
    assert sum(v["x"] >= 0.99 for v in sample_space([uniform], {}, 3000)) / 3000 < 0.05   # the old space: 1.8%


def test_a_conditional_parameter_is_sampled_only_when_its_condition_holds(space_spec):
    plan = resolve(space_spec())
    base = flatten(plan.search_config)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    space = SpaceSampler(plan.params, base)
    for _ in range(60):
        trial = study.ask()
        values = space(trial)[SAMPLED]
        kind = values["method.baseline.kind"]
        assert ("method.baseline.tau" in values) == (kind == "ema")
        assert ("method.baseline.group_size" in values) == (kind == "group")
        assert ("1 - method.baseline.tau" in trial.params) == (kind == "ema")          # the study too
        assert ("method.baseline.group_size" in trial.params) == (kind == "group")
        if kind == "ema":
            assert values["method.baseline.tau"] == pytest.approx(1 - trial.params["1 - method.baseline.tau"])
        study.tell(trial, 0.0)
        config_with(plan.search_config, values)                   # every sampled config validates
    kinds = {t.params["method.baseline.kind"] for t in study.trials}
    bounds = {t.params["method.policy.log_sigma_bound"] for t in study.trials}
    assert kinds == {"ema", "batch_mean", "group"} and None in bounds   # null (unbounded, Table 8) is sampled
    cfg = config_with(plan.search_config, {"method.policy.log_sigma_bound": None})
    assert cfg["method"]["policy"]["log_sigma_bound"] is None


@pytest.mark.parametrize("params, expected", [
    ("  method.baseline.tau: {momentum: [0.5, 1.0]}", "params.method.baseline.tau: momentum: expected 0 <= low < high < 1"),
    ("  method.baseline.tau: {uniform: [0.5, 0.9], when: {method.baseline.kind: ema}}\n"
     "  method.baseline.kind: {choice: [ema, none]}", "when.method.baseline.kind: method.baseline.kind is sampled after"),
    ("  method.loss.ppo_eps: {uniform: [0.1, 0.3]}\n"
     "  method.baseline.tau: {uniform: [0.5, 0.9], when: {method.loss.ppo_eps: 0.2}}", "expected a choice parameter"),
    ("  method.baseline.kind: {choice: [ema, none]}\n"
     "  method.baseline.tau: {uniform: [0.5, 0.9], when: {method.baseline.kind: group}}", "'group' is not one of its"),
    ("  method.baseline.tau: {uniform: [0.5, 0.9], when: {method.regime: rl_only}}",
     "when.method.regime: never true: method.regime is 'joint' in the base config"),
    ("  method.baseline.tau: {uniform: [0.5, 0.9], when: {method.regime: sometimes}}", "'sometimes' is not a valid"),
    ("  method.baseline.tau: {uniform: [0.5, 0.9], when: {method.nope: 1}}", "expected a config key"),
    ("  method.baseline.tau: {uniform: [0.5, 0.9], when: {method.baseline.tau: 0.6}}", "conditioned on itself"),
    ("  method.baseline.tau: {uniform: [0.5, 0.9], when: [ema]}", "when: expected a mapping"),
    ("  method.baseline.tau: {uniform: [0.5, 0.9], iff: {method.regime: joint}}", "iff: unknown key"),
    ("  method.loss.ppo_eps: {choice: [0.2, null]}", "None is not a valid value here"),   # null only where allowed
])
def test_bad_conditions_and_momenta_are_one_line_errors(space_spec, capsys, tmp_path, params, expected):
    spec = space_spec(space=f"params:\n{params}\n")
    rc = sweep_main([str(spec), "--dry-run", "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "space.yaml: params." in err and expected in err, err
    assert not (tmp_path / "results").exists()


def test_a_condition_on_a_fixed_key_that_holds_is_accepted(space_spec):
    plan = resolve(space_spec(space="params:\n  method.baseline.tau: {momentum: [0.5, 0.99], "
                                    "when: {method.regime: [joint, rl_only]}}\n"))
    assert plan.params[0].when == {"method.regime": ["joint", "rl_only"]}


@pytest.mark.parametrize("method, epochs, expected", [
    # the first epoch e with curriculum weight f(e) < 1, i.e. (1 - f) lambda_RL L_RL on, computed by hand for E = 8
    ({"name": "clip_rl", "curriculum": {"shape": "quadratic"}}, 8, 1),   # (1 - 1/8)^2 < 1
    ({"name": "clip_rl", "curriculum": {"shape": "cosine"}}, 8, 1),
    ({"name": "clip_rl", "curriculum": {"shape": "step"}}, 8, 4),        # f = 1 while e < E/2
    ({"name": "clip_rl", "curriculum": {"shape": "step"}}, 7, 4),        # 3/7 < 0.5, 4/7 >= 0.5
    ({"name": "clip_rl", "curriculum": {"shape": "step"}}, 1, 1),        # never within the schedule
    ({"name": "clip_rl", "curriculum": {"shape": "constant"}}, 8, 0),    # no RL term at all: nothing to wait for
    ({"name": "clip_rl", "rl": {"enabled": False}}, 8, 0),
    ({"name": "latent_rl", "regime": "sft_then_rl"}, 8, 4),
    ({"name": "latent_rl", "regime": "sft_then_rl", "rl_start_epoch": 3}, 8, 3),
    ({"name": "latent_rl", "regime": "joint"}, 8, 0),
    ({"name": "supervised"}, 8, 0),
])
def test_rl_start_epoch_from_the_curriculum_and_the_regime(method, epochs, expected):
    cfg = config_with({"method": {"name": "supervised"}}, {"method": method, "schedule.epochs": epochs})
    assert rl_start_epoch(cfg) == expected


def _feed(scheduler, trials, curves, epochs):
    """Each epoch, each live trial's result (in the given order), as Tune would; returns {trial: stopped at}."""
    for t in trials:
        scheduler.on_trial_add(None, t)
    stopped = {}
    for it in range(1, epochs + 1):
        for t in trials:
            if t.trial_id in stopped:
                continue
            action = scheduler.on_trial_result(None, t, {"training_iteration": it, "val/mIoU": curves[t.trial_id](it)})
            if action == TrialScheduler.STOP and it < epochs:
                stopped[t.trial_id] = it
    return stopped


def test_asha_never_stops_a_step_curriculum_trial_before_its_rl_phase_ran_for_the_grace_period(space_spec):
    """Four quadratic-curriculum trials (RL on from epoch 1) and two `step` trials (RL off for epochs 0-3, then on),
    which score 0 while supervised and best once RL runs. Plain ASHA (grace 1) stops the step trials at epoch 1;
    the search's scheduler judges them from epoch 4 + 1 = 5 on, and still prunes the weak quadratic trial."""
    space = "params:\n  method.curriculum.shape: {choice: [quadratic, step]}\n"
    plan = resolve(space_spec(space=space, base="clip_rl"), overrides=["schedule.epochs=8", "scheduler.grace_period=1",
                                                                         "metric={name: val/mIoU, mode: max}"])

    def trials_and_curves():
        trials, curves = [], {}
        for shape, score in [("quadratic", 40), ("quadratic", 30), ("quadratic", 20), ("quadratic", 10),
                             ("step", None), ("step", None)]:
            t = Trial("__fake", config={"trial": {"config": plan.search_config},
                                        SAMPLED: {"method.curriculum.shape": shape}}, stub=True)
            curves[t.trial_id] = (lambda it, s=score: float(s)) if score else (lambda it: 0.0 if it <= 4 else 100.0)
            trials.append(t)
        return trials, curves

    trials, curves = trials_and_curves()
    assert {rl_start_epoch(search_trial_config(t.config)) for t in trials[4:]} == {4}
    plain = ASHAScheduler(time_attr="training_iteration", metric="val/mIoU", mode="max", max_t=8, grace_period=1,
                          reduction_factor=2)
    stopped = _feed(plain, trials, curves, 8)
    assert [stopped.get(t.trial_id) for t in trials[4:]] == [1, 1]          # judged on the supervised phase

    aware = make_scheduler(plan)
    assert isinstance(aware, MethodAwareASHA)
    trials, curves = trials_and_curves()
    stopped = _feed(aware, trials, curves, 8)
    assert all(stopped.get(t.trial_id, 99) >= 5 for t in trials[4:]), stopped   # never before RL epoch 4 + grace 1
    assert stopped.get(trials[3].trial_id) == 2                                 # ASHA still prunes: RL epoch 1 + 1


def test_asha_stops_the_search_when_it_cannot_tell_a_trials_rl_phase(space_spec):
    """config_of failing (a bug: here a trial config that lost its search config) is an error of the search, never a
    trial judged as if its RL phase began at epoch 0 (a step-curriculum trial on its supervised epochs)."""
    space = "params:\n  method.curriculum.shape: {choice: [quadratic, step]}\n"
    plan = resolve(space_spec(space=space, base="clip_rl"), overrides=["schedule.epochs=8", "scheduler.grace_period=1",
                                                                         "metric={name: val/mIoU, mode: max}"])
    aware = make_scheduler(plan)
    broken = Trial("__fake", config={SAMPLED: {"method.curriculum.shape": "step"}}, stub=True)   # no "trial" key
    aware.on_trial_add(None, broken)
    with pytest.raises(KeyError, match="trial"):
        aware.on_trial_result(None, broken, {"training_iteration": 1, "val/mIoU": 0.0})
