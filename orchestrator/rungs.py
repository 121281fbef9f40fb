"""Early stopping that waits for the method: ASHA judges a search trial only once its RL term has been on for the
grace period.

Every clip_rl curriculum defers the RL term (L = f L_seg(s_L) + (1 - f)(... + lambda_RL L_RL), f(0) = 1; `step`
keeps f = 1 for the first half) and latent_rl's `sft_then_rl` regime starts RL at method.rl_start_epoch (default
half way). Plain ASHA with a fixed grace period would judge those configs on their supervised phase. Here the grace
is per trial: a trial's first rung is at rl_start_epoch(config) + grace_period epochs; until then its results do not
reach ASHA. From then on it is ranked at the highest rung it has passed, against what the other trials recorded
there (its value is at least as late as theirs, so the comparison errs in its favour, never against it).
"""
from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from trainers.schedules import curriculum


def rl_start_epoch(config: dict[str, Any]) -> int:
    """The first (0-based) epoch in which the config's RL term is on, i.e. has non-zero weight; 0 for a method or a
    config without a deferred RL phase (supervised, joint / rl_only latent_rl, clip_rl without its agent or with the
    constant curriculum, which never turns RL on: nothing to wait for). An RL phase that never starts within the
    schedule gives `epochs` (the trial is never judged early)."""
    m, epochs = config["method"], config["schedule"]["epochs"]
    if m["name"] == "clip_rl":
        c = m["curriculum"]
        if not m["rl"]["enabled"] or c["shape"] == "constant":
            return 0
        return next((e for e in range(epochs) if curriculum(c["shape"], e, epochs, c["power"]) < 1.0), epochs)
    if m["name"] == "latent_rl" and m["regime"] == "sft_then_rl":
        return m["rl_start_epoch"] if m["rl_start_epoch"] is not None else epochs // 2
    return 0


class MethodAwareASHA(ASHAScheduler):
    """ASHAScheduler over epochs whose first rung for a trial is rl_start_epoch(its config) + grace_period.
    `config_of(tune_config)` gives the trial's full config (the sampled values on the search config)."""

    def __init__(self, *, config_of, grace_period: int, **kwargs):
        super().__init__(grace_period=grace_period, **kwargs)
        self.config_of, self.rl_grace = config_of, grace_period
        self.first_rung: dict[str, int] = {}      # trial_id -> the epoch of its first judgement

    def first_rung_of(self, trial) -> int:
        # No fallback: a trial reaches here only with a result, so config_of already built this config in the trial;
        # an error now is a bug, and judging the trial as if RL began at epoch 0 would hide it (a curriculum trial
        # judged on its supervised phase). It stops the search instead.
        if trial.trial_id not in self.first_rung:
            self.first_rung[trial.trial_id] = rl_start_epoch(self.config_of(trial.config)) + self.rl_grace
        return self.first_rung[trial.trial_id]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) < self.first_rung_of(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
