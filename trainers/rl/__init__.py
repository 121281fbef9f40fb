"""RL maths for latent-space RL (paper 002, Section 3.2, Eq. 3-19) and GRPO (Seg-R1): policy, rewards,
advantages and objectives. Pure functions and small modules; the methods in trainers/methods use them."""
from trainers.rl.advantage import Baseline, global_mean, group_advantages
from trainers.rl.boundary import boundary_f1
from trainers.rl.objectives import (ema_update, k3_kl, policy_gradient_loss, ppo_clip_loss, ppo_clip_objective,
                                    ppo_health, ppo_stats, soft_capped_ratio)
from trainers.rl.policy import (GaussianLatentPolicy, SampleMoments, gaussian_kl, gaussian_log_prob,
                               gaussian_log_prob_moments, gaussian_log_ratio_moments, sample_moments)
from trainers.rl.rewards import (CONTROLS, RewardControl, build_reward_control, control_rewards, iou_reward,
                                 reward_stats, segmentation_rewards, weighted_reward)

__all__ = [
    "Baseline", "global_mean", "group_advantages",
    "boundary_f1",
    "ema_update", "k3_kl", "policy_gradient_loss", "ppo_clip_loss", "ppo_clip_objective", "ppo_health", "ppo_stats",
    "soft_capped_ratio",
    "GaussianLatentPolicy", "SampleMoments", "gaussian_kl", "gaussian_log_prob", "gaussian_log_prob_moments",
    "gaussian_log_ratio_moments", "sample_moments",
    "CONTROLS", "RewardControl", "build_reward_control", "control_rewards", "iou_reward", "reward_stats",
    "segmentation_rewards", "weighted_reward",
]
