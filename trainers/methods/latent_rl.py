"""latent_rl: Latent-Space Reinforcement Learning for Image Segmentation (paper 002, Sec. 3.2).

Read top to bottom beside the paper:
    z = f_enc(x)                                       state (contextual bandit, Sec. 3.2 "MDP Formulation")
    mu, log_sigma = pi_phi(z)                          Eq. 7-10 (log_sigma = c tanh(.), c = 4; Table 8: unbounded)
    s = mu + sigma * eps                               Eq. 11, eps ~ N(0, 1) of shape (B, d, h, w)
    z_mod = modulation(z, s)                           Eq. 13-14 (Table 7: add, mul, concat, mha)
    logits = f_dec(z_mod)                              -> L_seg (Eq. 2) and the rewards
    r = sum_k lambda_k r^k                             Eq. 15 (Table 5a); reward.control replaces its content (ours:
                                                       random / shuffled / inverted, trainers.rl.control_rewards)
    A = clamp(r - b, a_min, a_max)                     Eq. 16-18 (Table 5b: none, batch mean, EMA; + Seg-R1 GRPO group),
                                                       b from the global batch (all ranks)
    L_Policy = PPO clip with rho = pi_phi / pi_old     Eq. 4, pi_old = EMA of pi_phi (Eq. 19), never trained
               (or Seg-R1's unclipped -exp(logp - sg(logp)) A, `loss.policy_loss: seg_r1`)
    L_KL = KL(pi_old || pi_phi)                        Eq. 5 (analytic, diagonal Gaussians)
    L = L_seg + lambda_Policy L_Policy + lambda_KL L_KL   Eq. 6 (Table 6); regimes of Table 1
        (+ beta_ref k3(pi || pi_ref) with `loss.kl_reference`, Seg-R1)
Evaluation decodes with the policy mean (no sampling) unless `eval_sample`.

PPO health per step (rl/*): clipfrac, approx_kl, log_ratio_abs_mean, zero_grad_frac (terms whose L_Policy gradient
is 0) and, after backward, policy_grad_norm. At paper shapes the image-level log-ratio sums 2048 * 64 * 64 terms;
see the paper preset for what that does to clipfrac.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trainers.config import MethodConfig, Strict
from trainers.losses import segmentation_loss
from trainers.methods import register_method
from trainers.methods.base import RL_TERM, SegMethod, grad_norm
from trainers.methods.rl_config import BaselineConfig, ReferenceKLConfig, RewardControlConfig
from trainers.rl import (Baseline, GaussianLatentPolicy, build_reward_control, ema_update, gaussian_kl,
                         gaussian_log_prob, gaussian_log_ratio_moments, k3_kl, policy_gradient_loss,
                         ppo_clip_objective, ppo_health, sample_moments, segmentation_rewards, weighted_reward)
from trainers.rl.objectives import LOG_RATIO_CAP
from trainers.rl.reference import frozen_copy, reference_policy


class PolicyConfig(Strict):
    enabled: bool = True                       # False: no policy, Eq. 14 -> MHA(z, z, z) (Table 6, "L_seg only")
    blocks: int = Field(4, ge=0)               # L in Eq. 7 (paper: 4)
    kernel_size: Literal[1, 3] = 1             # of the Eq. 8 convs (not in the paper; "ConvProj": a projection)
    pool: tuple[int, int] = (4, 4)             # (Ph, Pw), Eq. 9
    log_sigma_bound: float | None = Field(4.0, gt=0)   # c in Eq. 10; null = unbounded (Table 8)
    ema_eta: float = Field(0.99, ge=0, le=1)   # eta, Eq. 19
    # The paper's policy observes z and is trained through it (the RL terms reach the encoder). True: the policy
    # observes z.detach(), so L_Policy and L_KL train the policy only (beyond the paper; see the preset).
    detach_state: bool = False
    lr_scale: float = Field(1.0, gt=0)         # the policy trains at lr_scale * schedule.lr (the paper: one lr)


class RewardWeights(Strict):                    # lambda_* of Eq. 15 (paper: all 1)
    iou: float = 1.0
    dice: float = 1.0
    ce: float = 1.0
    boundary: float = 1.0


class RewardConfig(RewardControlConfig):   # + control: none | random | shuffled | inverted (rl_config)
    weights: RewardWeights = Field(default_factory=RewardWeights)
    # r^Boundary (trainers/rl/boundary.py): paper 002 says only that it "measures edge accuracy by comparing
    # predicted and ground-truth boundaries"; the class-wise BF score (Csurka et al. 2013; DAVIS F) is our reading.
    # Tolerance: DAVIS's rule (pixels when >= 1, else a fraction of the diagonal), the radius of the matching disk,
    # 1 px; band (ours): how far (px, through ignore pixels) a VOC-style 255 band may carry an outline (VOC's ~5 px).
    boundary_tolerance: float = Field(1.0, gt=0)
    boundary_band: int = Field(8, ge=0)


class LossConfig(ReferenceKLConfig):
    lambda_policy: float = Field(1.0, ge=0)    # Eq. 6 (Table 6 right: 1.0 best)
    lambda_kl: float = Field(1.0, ge=0)
    ppo_eps: float = Field(0.2, gt=0)          # epsilon of Eq. 4 (paper: unstated; PPO's 0.2)
    # image: rho and KL of the whole action, log pi summed over d*h*w (Eq. 4, 5, 12: the paper).
    # element: one ratio per (d, h, w) element and the per-element KL, both averaged (token-level PPO as in
    # LLM RL; beyond the paper: the image-level ratio of d*h*w terms leaves [1 - eps, 1 + eps] after one step).
    ratio_level: Literal["image", "element"] = "image"
    # element only: how an image's d*h*w terms of L_Policy, L_KL (and k3) combine. mean: the token mean above; sum:
    # Eq. 12's sum over d*h*w (the image level's scale; the clip stays per element). train/loss_policy follows it.
    element_reduction: Literal["mean", "sum"] = "mean"
    # |log rho| past which rho continues linearly (objectives.soft_capped_ratio): finite and never a zero gradient.
    log_ratio_cap: float = Field(LOG_RATIO_CAP, gt=0)
    # ppo_clip: Eq. 4. seg_r1: Seg-R1 as released, -mean(exp(logp - sg(logp)) A) without ratio clip, a mean over
    # the terms of ratio_level (element: the token mean).
    policy_loss: Literal["ppo_clip", "seg_r1"] = "ppo_clip"


class LatentRLConfig(MethodConfig):
    name: Literal["latent_rl"] = "latent_rl"
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    modulation: Literal["add", "mul", "concat", "mha"] = "mha"
    attention_heads: int = Field(4, ge=1)           # of the Eq. 14 MHA (paper: unstated)
    alpha_init: float = 0.1                          # the learnable scale alpha of z_mod (Sec. 3.2; paper: unstated)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    regime: Literal["joint", "sft_then_rl", "rl_only"] = "joint"   # Table 1
    rl_start_epoch: int | None = Field(None, ge=0)   # sft_then_rl: first RL epoch (0-based; default: half way)
    eval_sample: bool = False                        # evaluate with a sampled s instead of the mean

    def trains_on_reward(self) -> bool:
        return self.policy.enabled and (self.loss.lambda_policy > 0 or self.loss.lambda_kl > 0)


class Modulation(nn.Module):
    """Injects the policy signal s (B, d, h, w) into z (B, d, h, w); Table 7 and Eq. 13-14, 20-22."""

    @staticmethod
    def output_width(kind: str, channels: int) -> int:
        """The decoder sees [z, s] (concat) or [z, alpha z_mod] (mha): 2d channels; else d."""
        return 2 * channels if kind in ("concat", "mha") else channels

    def __init__(self, kind: str, channels: int, heads: int, alpha_init: float = 0.1):
        super().__init__()
        self.kind = kind
        if kind == "mha":
            if channels % heads:
                raise ValueError(f"method.attention_heads={heads} must divide the latent width {channels}")
            self.project = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                         nn.ReLU(inplace=True))                       # Eq. 13
            self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)  # parameters; see attend
            self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))                 # learnable scale (Sec. 3.2)

    def forward(self, z: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "add":
            return z + s                                     # Eq. 20
        if self.kind == "mul":
            return z * (1 + torch.tanh(s))                   # Eq. 21
        if self.kind == "concat":
            return torch.cat([z, s], dim=1)                  # Eq. 22
        b, d, h, w = z.shape
        query = z if s is None else z - self.project(s)      # Eq. 14 query z - s'; Table 6: MHA(z, z, z) without s
        z_mod = self.attend(query.flatten(2).transpose(1, 2), z.flatten(2).transpose(1, 2))   # (B, h*w, d)
        return torch.cat([z.flatten(2), self.alpha * z_mod.transpose(1, 2)], dim=1).view(b, 2 * d, h, w)

    def attend(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """self.attention(query, tokens, tokens) (B, L, d) -> (B, L, d), written out batch-first on the module's own
        parameters (no dropout, no mask, as it is configured): its forward goes sequence-first and back, copies and
        checks worth ~10% of the attention's train-step time on the embedded default."""
        att = self.attention
        b, n, d = query.shape
        heads = att.num_heads
        w_q, w_kv = att.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = att.in_proj_bias.split([d, 2 * d])
        q = F.linear(query, w_q, b_q).view(b, n, heads, d // heads).transpose(1, 2)              # (B, heads, L, d_h)
        k, v = F.linear(tokens, w_kv, b_kv).view(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return att.out_proj(out)


@register_method("latent_rl", LatentRLConfig)
class LatentRL(SegMethod):
    POLICY_MODULES = ("policy",)     # pi_phi; rl/grad_share is over the rest (encoder, modulation, decoder)

    def __init__(self, cfg, num_classes: int, ignore_index: int):
        m = cfg.method
        if not m.policy.enabled and m.modulation != "mha":
            raise ValueError("method.policy.enabled=false only makes sense with method.modulation=mha (Table 6)")
        super().__init__(cfg, num_classes, ignore_index,
                         decoder_in_channels=lambda d: Modulation.output_width(m.modulation, d))
        d = self.segmentor.encoder.out_channels      # latent width
        self.modulation = Modulation(m.modulation, d, m.attention_heads, m.alpha_init)
        self.policy = self.old_policy = self.ref_policy = None
        if m.policy.enabled:
            self.policy = GaussianLatentPolicy(d, m.policy.blocks, tuple(m.policy.pool), m.policy.log_sigma_bound,
                                               m.policy.kernel_size)
            # phi_old, Eq. 19: batch statistics like phi, running stats only by the EMA rule
            self.old_policy = frozen_copy(self.policy)
            # Seg-R1's reference: `ema` is phi_old itself; init / sft_checkpoint are frozen copies
            if m.loss.kl_reference != "ema":
                self.ref_policy = reference_policy(self.policy, m.loss.kl_reference, m.loss.reference_checkpoint)
        elif m.loss.kl_reference != "none":
            raise ValueError("method.loss.kl_reference needs a policy (method.policy.enabled=true)")
        elif m.reward.control != "none":
            raise ValueError("method.reward.control needs a policy (method.policy.enabled=true)")
        self.baseline = Baseline(m.baseline.kind, m.baseline.tau, (m.baseline.a_min, m.baseline.a_max))
        self.group = m.baseline.group_size if m.baseline.kind == "group" else 1
        self.weights = m.reward.weights.model_dump()
        # spurious-reward control (ours): replaces r's content before the baseline; its own RNG stream
        self.reward_control = build_reward_control(m.reward.control, cfg.seed)
        self.rl_phase = m.regime != "sft_then_rl"
        self.seg_phase = m.regime != "rl_only"
        # rl_only / sft_then_rl leave some parameters without gradients in some steps
        self.ddp_find_unused_parameters = m.regime != "joint" or not m.policy.enabled

    def lr_scales(self) -> dict[str, float]:
        return {"policy": self.cfg.policy.lr_scale}

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        m = self.cfg
        if m.regime == "sft_then_rl":   # Table 1 row 1: SFT, then RL only
            start = m.rl_start_epoch if m.rl_start_epoch is not None else epochs // 2
            self.rl_phase, self.seg_phase = epoch >= start, epoch < start

    def seg_loss_and_pixel_ce(self, logits: torch.Tensor, masks: torch.Tensor
                              ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """L_seg (Eq. 2) as self.seg_loss, and when it is plain CE also the per-pixel CE (B, H, W) that r^CE reuses
        (one log-softmax for both). With a Dice term: self.seg_loss and None."""
        if self.cfg.seg_loss.dice > 0:
            return self.seg_loss(logits, masks), None
        out = segmentation_loss(logits, masks, self.cfg.seg_loss, self.ignore_index, pixel_ce=True)
        return out, out.pop("pixel_ce")

    def decode(self, z: torch.Tensor, s: torch.Tensor | None, size) -> torch.Tensor:
        return self.segmentor.decode(self.modulation(z, s), size)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        m, size = self.cfg, images.shape[-2:]
        z = self.segmentor.encode(images)                                   # (B, d, h, w)
        if self.policy is None:                                             # Table 6: L_seg only
            out = self.seg_loss(self.decode(z, None, size), masks)
            out["loss"] = out["loss_seg"]
            return out
        h, w = z.shape[-2:]
        state = z.detach() if m.policy.detach_state else z
        mu, log_sigma = self.policy(state)                                  # Eq. 10, (B, d)
        with torch.no_grad():
            mu_old, log_sigma_old = self.old_policy(state)
        # GRPO: G samples per image; everything per sample is repeated G times (G = 1 otherwise)
        z_g, masks_g, mu_g, log_sigma_g, mu_old_g, log_sigma_old_g = (
            (t.repeat_interleave(self.group, 0) if self.group > 1 else t)
            for t in (z, masks, mu, log_sigma, mu_old, log_sigma_old))
        s = self.policy.sample(mu_g, log_sigma_g, (h, w))                   # Eq. 11, reparameterised
        logits = self.decode(z_g, s, size)
        out, pixel_ce = self.seg_loss_and_pixel_ce(logits, masks_g)         # L_seg, Eq. 2

        with torch.no_grad():
            rewards = segmentation_rewards(logits, masks_g, self.num_classes, self.ignore_index, pixel_ce=pixel_ce,
                                           boundary_tolerance=m.reward.boundary_tolerance,
                                           boundary_band=m.reward.boundary_band)
            r = weighted_reward(rewards, self.weights)                      # Eq. 15
            r_used = r if self.reward_control is None else self.reward_control(r)   # control: across all B*G samples
            adv = self.baseline.advantages(                                 # Eq. 16-18
                r_used.view(-1, self.group) if self.group > 1 else r_used).reshape(-1)
        kl = gaussian_kl(mu_old, log_sigma_old, mu, log_sigma, spatial=h * w)         # Eq. 5, KL(old || phi), (B,)
        # Eq. 12: log-density of the constant action s under phi and phi_old
        s = s.detach()
        # log rho = log pi_phi(s) - log pi_old(s), gradient through pi_phi; d log rho / d phi = d log pi_phi / d phi,
        # so Seg-R1's unclipped loss takes it in place of log pi_phi (its value exp(x - sg(x)) = 1 either way)
        if m.loss.ratio_level == "element":   # per-element ratios against the image's advantage; KL per element
            with torch.no_grad():
                logp_old = gaussian_log_prob(s, mu_old_g, log_sigma_old_g, reduce=False).flatten(1)
            log_ratio = gaussian_log_prob(s, mu_g, log_sigma_g, reduce=False).flatten(1) - logp_old
            adv_t = adv[:, None]
            if m.loss.element_reduction == "mean":     # sum: kl is already the sum over d*h*w (Eq. 5)
                kl = kl / log_ratio.shape[1]
        else:   # the sum over d*h*w terms from s's per-channel moments, each channel's difference formed first
            log_ratio = gaussian_log_ratio_moments(sample_moments(s, center=mu_g), mu_g, log_sigma_g,
                                                   mu_old_g, log_sigma_old_g)
            adv_t = adv
        if m.loss.policy_loss == "seg_r1":    # Seg-R1 as released: no ratio clip, mean over the terms
            loss_policy = policy_gradient_loss(log_ratio, adv_t)
        else:
            loss_policy = ppo_clip_objective(log_ratio, adv_t, m.loss.ppo_eps, m.loss.log_ratio_cap)  # Eq. 4
        sum_terms = m.loss.ratio_level == "element" and m.loss.element_reduction == "sum"
        if sum_terms:                         # the mean over (B, d*h*w) terms times d*h*w: per image sums, mean over B
            loss_policy = loss_policy * log_ratio.shape[1]
        loss_kl = kl.mean()

        loss = logits.new_zeros(())
        if self.seg_phase:
            loss = loss + out["loss_seg"]
        terms = {}                            # the RL terms as they enter the loss (RL_TERM, rl/grad_share)
        if self.rl_phase:
            terms.update(policy=m.loss.lambda_policy * loss_policy, kl=m.loss.lambda_kl * loss_kl)
            loss = loss + terms["policy"] + terms["kl"]                     # Eq. 6
        if m.loss.kl_reference != "none":
            loss_ref = self.reference_kl(state, s, mu_g, log_sigma_g, (mu_old_g, log_sigma_old_g),
                                         image_level=m.loss.ratio_level == "image" or sum_terms)
            if self.rl_phase:
                terms["ref"] = m.loss.beta_ref * loss_ref
                loss = loss + terms["ref"]
            out["rl/kl_ref"] = loss_ref.detach()
        stats = ppo_health(log_ratio, m.loss.ppo_eps, adv_t)
        out.update(
            loss=loss, loss_policy=loss_policy.detach(), loss_kl=loss_kl.detach(), reward=r.mean(),
            advantage=adv.mean(), baseline=self.baseline.value.detach().float(), log_sigma=log_sigma.detach().mean(),
            **{f"rl/{k}": v for k, v in stats.items()}, **{f"reward_{k}": v.nanmean() for k, v in rewards.items()},
            **{RL_TERM + k: v for k, v in terms.items()})
        if self.modulation.kind == "mha":
            out["alpha"] = self.modulation.alpha.detach()
        if self.reward_control is not None:     # train/reward stays the real reward
            out["rl/reward_used"] = r_used.mean()
        return out

    def reference_kl(self, state: torch.Tensor, s: torch.Tensor, mu_g: torch.Tensor, log_sigma_g: torch.Tensor,
                     old_g: tuple[torch.Tensor, torch.Tensor], image_level: bool) -> torch.Tensor:
        """Seg-R1's k3 estimate of KL(pi_phi || pi_ref) at the sample s (B*G, d, h, w), per element (token): their
        sum per image at the image level (the KL of the whole action, like L_KL), their mean at the element level;
        then the mean over samples. old_g: pi_old's (mu, log_sigma) per sample, the reference for `ema`."""
        with torch.no_grad():
            if self.ref_policy is None:                                     # ema: pi_ref = pi_old
                mu_ref, log_sigma_ref = old_g
            else:
                mu_ref, log_sigma_ref = self.ref_policy(state)
                if self.group > 1:
                    mu_ref, log_sigma_ref = (t.repeat_interleave(self.group, 0) for t in (mu_ref, log_sigma_ref))
            logp_ref = gaussian_log_prob(s, mu_ref, log_sigma_ref, reduce=False).flatten(1)
        logp = gaussian_log_prob(s, mu_g, log_sigma_g, reduce=False).flatten(1)
        k3 = k3_kl(logp, logp_ref, self.cfg.loss.log_ratio_cap)             # (B*G, d*h*w)
        return k3.sum(1).mean() if image_level else k3.mean()

    def grad_stats(self) -> dict[str, torch.Tensor]:
        return {} if self.policy is None else {"rl/policy_grad_norm": grad_norm(self.policy)}

    def after_optimizer_step(self) -> None:
        if self.old_policy is not None:
            ema_update(self.old_policy, self.policy, self.cfg.policy.ema_eta)   # Eq. 19

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        z = self.segmentor.encode(images)
        if self.policy is None:
            return self.decode(z, None, images.shape[-2:])
        mu, log_sigma = self.policy(z)
        h, w = z.shape[-2:]
        s = (self.policy.sample(mu, log_sigma, (h, w)) if self.cfg.eval_sample
             else mu[:, :, None, None].expand(-1, -1, h, w))
        return self.decode(z, s, images.shape[-2:])
