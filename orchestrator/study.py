"""The Optuna side of a search: the space as a define-by-run function, the seeded sampler, and what the finished
study says (fANOVA parameter importances, Optuna's history / importance / slice / contour / Pareto plots).

A search trial's Tune config holds the Optuna values (`1 - <path>` for a momentum) and, under SAMPLED, the config
values they stand for: {config path: value} for exactly the parameters whose condition held.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from orchestrator.space import SearchParam

STUDY_DB = "optuna.db"
SAMPLED = "sampled"     # Tune config key: {config path: value} of the parameters this trial used


def study_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / STUDY_DB).resolve()}"


def optuna_distribution(p: SearchParam):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if p.kind == "choice":
        return CategoricalDistribution(p.choices)
    if p.kind == "int":
        return IntDistribution(int(p.low), int(p.high), step=p.step or 1)
    if p.kind == "momentum":   # x in [low, high] as 1 - x log-uniform on [1 - high, 1 - low]: 0.99 is as near as 0.9
        return FloatDistribution(_complement(p.high), _complement(p.low), log=True)
    return FloatDistribution(float(p.low), float(p.high), log=p.kind == "loguniform")


def _complement(x: float) -> float:
    return float(f"{1.0 - float(x):.12g}")     # 1 - 0.999 is 0.0010000000000000009 in floats: the study shows 0.001


def optuna_distributions(params: list[SearchParam]) -> dict[str, Any]:
    """The space as Optuna distributions, named as in the study (the config path; `1 - path` for a momentum)."""
    return {p.optuna_name: optuna_distribution(p) for p in params}


class SpaceSampler:
    """Optuna's define-by-run space (OptunaSearch calls it with each new trial): parameters in file order, each only
    when its `when:` holds for the values sampled so far (or, for a key not sampled, the search config's value).
    A module-level class, so Tune can pickle the searcher for --resume."""

    def __init__(self, params: list[SearchParam], base_flat: dict[str, Any]):
        self.params, self.base_flat = params, base_flat

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values, self.base_flat):
                values[p.key] = p.to_config(self.suggest(trial, p))
        return {SAMPLED: values}

    @staticmethod
    def suggest(trial, p: SearchParam) -> Any:
        d = optuna_distribution(p)
        if p.kind == "choice":
            return trial.suggest_categorical(p.optuna_name, d.choices)
        if p.kind == "int":
            return trial.suggest_int(p.optuna_name, d.low, d.high, step=d.step)
        return trial.suggest_float(p.optuna_name, d.low, d.high, log=d.log)


def sample_space(params: list[SearchParam], base_flat: dict[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n configs' sampled values drawn at random from the space (the dry run's and the tests' view of it)."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = SpaceSampler(params, base_flat)
    return [space(study.ask())[SAMPLED] for _ in range(n)]


def load(run_dir: Path, study_name: str):
    import optuna

    return optuna.load_study(study_name=study_name, storage=study_uri(run_dir))


def importances(study, objectives: list[str]) -> dict[str, dict[str, float]]:
    """{objective: {parameter: fANOVA importance}} over the completed trials (Optuna's default evaluator family;
    fANOVA scores the parameters every completed trial used, so a conditional one counts where its condition always
    held). Empty for an objective with too few trials."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    out = {}
    for i, name in enumerate(objectives):
        target = (lambda t, i=i: t.values[i]) if len(objectives) > 1 else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), target=target)
        except (ValueError, RuntimeError):   # e.g. fewer than two completed trials, or no varying parameter
            scores = {}
        out[name] = {k: float(v) for k, v in scores.items()}
    return out


def save_importances(run_dir: Path, scores: dict[str, dict[str, float]]) -> Path:
    path = run_dir / "importances.json"
    path.write_text(json.dumps(scores, indent=2) + "\n")
    return path


def save_plots(run_dir: Path, study, objectives: list[str],
               scores: dict[str, dict[str, float]]) -> tuple[list[Path], list[str]]:
    """Optuna's matplotlib plots in run_dir/plots: history, importances, slice (every parameter), contour (the
    two most important), and the Pareto front of a multi-objective study. Returns (made, problems)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from orchestrator.table_plots import save_figure

    multi = len(objectives) > 1
    first = {"target": (lambda t: t.values[0]), "target_name": objectives[0]} if multi else {}
    top = list(scores.get(objectives[0], {}))[:2]
    plots = [("optuna_history", lambda: ovm.plot_optimization_history(study, **first)),
             ("optuna_importances", lambda: ovm.plot_param_importances(study, **first)),
             ("optuna_slice", lambda: ovm.plot_slice(study, **first))]
    if len(top) == 2:
        plots.append(("optuna_contour", lambda: ovm.plot_contour(study, params=top, **first)))
    if multi:
        plots.append(("optuna_pareto", lambda: ovm.plot_pareto_front(study, target_names=objectives)))
    made, problems = [], []
    for name, plot in plots:
        path = run_dir / "plots" / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # ExperimentalWarning of the matplotlib backend
                ax = plot()
            fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
            save_figure(fig, path)
            made.append(path)
        except Exception as e:   # e.g. importances need >= 2 complete trials with varying values
            problems.append(f"{name}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            plt.close("all")
    return made, problems
