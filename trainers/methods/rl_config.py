"""Config pieces that latent_rl and clip_rl (and Seg-R1's GRPO) share: the reward baseline, the reward control and
the KL penalty to a reference policy. Each value the papers leave unstated says where its default comes from (README:
"Values the papers leave unstated")."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainers.config import Strict


class BaselineConfig(Strict):
    kind: Literal["none", "batch_mean", "ema", "group"] = "ema"
    tau: float = Field(0.9, ge=0, le=1)        # Eq. 16; paper 002 gives no value
    group_size: int = Field(4, ge=2)           # G samples per image for `group` (Seg-R1: 4)
    # Eq. 18's clamp [a_min, a_max]; paper 002 gives no values. null = no clamp on that side (the default, and GRPO
    # as released); the latent_rl / clip_rl presets set -1, 1.
    a_min: float | None = None
    a_max: float | None = None

    @model_validator(mode="after")
    def _ordered(self):
        if self.a_min is not None and self.a_max is not None and self.a_min >= self.a_max:
            raise ValueError(f"a_min ({self.a_min}) must be below a_max ({self.a_max})")
        return self


class RewardControlConfig(Strict):
    """`method.reward.control` (ours; no seed paper has it; Shao et al. 2025, "Spurious Rewards"): keep everything but
    the reward's content (sampling, baseline, KL, schedule). It acts on the per-sample scalar reward that feeds the
    baseline (trainers.rl.control_rewards); train/reward and the reward terms stay the real reward, rl/reward_used is
    the controlled one. random: i.i.d. with the previous step's batch mean and std (Bernoulli at that mean when every
    reward is 0 or 1; why the previous step's: trainers.rl.rewards.RewardControl); shuffled: the batch's rewards
    permuted (across groups for GRPO); inverted: -r. What r is per method:
    latent_rl sum_k lambda_k r^k (Eq. 15, in [0, sum lambda]); clip_rl IoU(O) - IoU(s_L) (signed, mostly near 0);
    seg_r1 valid (0.7 IoU + 0.3 S) + valid (format), in [0, 2]. None of them is 0/1, so random is Gaussian."""
    control: Literal["none", "random", "shuffled", "inverted"] = "none"


class ReferenceKLConfig(Strict):
    """beta_ref * KL(pi || pi_ref) by the k3 estimator, token mean (Seg-R1 as released: beta 0.04, pi_ref the
    policy before RL)."""
    kl_reference: Literal["none", "ema", "init", "sft_checkpoint"] = "none"
    beta_ref: float = Field(0.04, ge=0)         # Seg-R1 / TRL GRPO default
    reference_checkpoint: str | None = None     # for sft_checkpoint: an rlseg state.pt or a policy state_dict

    @model_validator(mode="after")
    def _checkpoint_named(self):
        if self.kl_reference == "sft_checkpoint" and not self.reference_checkpoint:
            raise ValueError("kl_reference sft_checkpoint needs reference_checkpoint (a checkpoint file)")
        return self
