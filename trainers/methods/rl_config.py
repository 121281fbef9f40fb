"""Config pieces that latent_rl and clip_rl (and Seg-R1's GRPO) share: the reward baseline and the KL penalty to a
reference policy. Each value the papers leave unstated says where its default comes from (README: "Values the
papers leave unstated")."""
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
