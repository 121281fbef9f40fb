"""clip_rl: CLIP-RL, surgical scene segmentation with a frozen CLIP ViT and RL refinement (paper 000, Sec. III).

Read top to bottom beside the paper:
    z = CLIP-ViT(x)                           frozen open_clip tower, patch tokens of several blocks (B, C, 14, 14)
    feats = decoder(z); s_L = cls(feats)      fusion 1x1 conv + 4 ConvTranspose2d(k2, s2) stages -> initial logits
    r = residual(feats)                       residual correction (K channels)
    a ~ pi(. | GAP(z)), alpha = actions[a]    agent: global pool -> MLP -> categorical over residual scales
    O = s_L + alpha * r                       refined output (Sec. III.B)
    reward = IoU(O) - IoU(s_L) per image      REINFORCE, L_RL = -mean(A log pi(a)), A from the shared Baseline
                                              (reward.control: its content replaced before the baseline, ours)
                                              (+ beta_ref k3(pi || pi_ref) with `loss.kl_reference`, Seg-R1)
    f = curriculum(e / E)                     (1 - e/E)^2 in the paper
    L = f L_seg(s_L) + (1 - f) (w_O L_seg(O) + lambda_RL L_RL),  L_seg = CE + Dice, w_O = rl.seg_loss_refined
Evaluation uses the greedy action (argmax pi) unless `eval_sample`. Without the agent (`rl.enabled: false`,
CLIP-RL Table IV "+ curriculum") the refinement is O = s_L + r, trained by L_seg(O) alone. The constant
curriculum (f = 1) is the decoder alone (Table IV row 1): it is evaluated on s_L.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from trainers.config import MethodConfig, SegLossConfig, Strict
from trainers.methods import register_method
from trainers.methods.base import RL_TERM, SegMethod, grad_norm
from trainers.methods.rl_config import BaselineConfig, ReferenceKLConfig, RewardControlConfig
from trainers.models.encoders import conv_bn_relu
from trainers.rl import Baseline, build_reward_control, ema_update, iou_reward, k3_kl
from trainers.rl.reference import reference_policy
from trainers.schedules import SHAPES, curriculum


class ActionsConfig(Strict):
    """The discrete action set of residual scales: `values`, or `count` values `step` apart centred on 0
    (step 0.1, count 3 -> -0.1, 0, +0.1; count 5 -> -0.2 ... +0.2)."""
    step: float = Field(0.1, gt=0)
    count: int = Field(3, ge=2)
    values: list[float] | None = Field(None, min_length=2)

    def action_values(self) -> list[float]:
        if self.values is not None:
            return [float(v) for v in self.values]
        half = (self.count - 1) / 2
        return [round(self.step * (i - half), 10) for i in range(self.count)]


class CurriculumConfig(Strict):
    shape: Literal[SHAPES] = "quadratic"       # trainers/schedules.py; the paper: quadratic
    power: float = Field(2.0, gt=0)            # for shape "power"


class RLConfig(Strict):
    enabled: bool = True                       # False: no agent, O = s_L + r (Table IV "+ curriculum")
    lambda_rl: float = Field(1.0, ge=0)
    agent_hidden: int = Field(256, ge=1)       # the MLP on the pooled encoder features
    # weight of L_seg(O) beside lambda_RL L_RL in the (1 - f) part: the paper names the curriculum's two phases
    # but not whether O itself is supervised; ours: 1. 0 = the RL term alone trains the refinement.
    seg_loss_refined: float = Field(1.0, ge=0)


class ClipRLLossConfig(ReferenceKLConfig):
    reference_eta: float = Field(0.99, ge=0, le=1)   # kl_reference ema: pi_ref <- eta pi_ref + (1 - eta) pi


class ClipRLConfig(MethodConfig):
    name: Literal["clip_rl"] = "clip_rl"
    seg_loss: SegLossConfig = Field(default_factory=lambda: SegLossConfig(ce=1.0, dice=1.0))   # CE + Dice
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)   # the same kinds as latent_rl (+ GRPO)
    # control only (rl_config): r = IoU(O) - IoU(s_L) is signed and mostly near 0, so `random` is Gaussian
    reward: RewardControlConfig = Field(default_factory=RewardControlConfig)
    loss: ClipRLLossConfig = Field(default_factory=ClipRLLossConfig)
    eval_sample: bool = False

    def trains_on_reward(self) -> bool:
        return self.rl.enabled and self.curriculum.shape != "constant"

    @model_validator(mode="after")
    def _distinct_actions(self):
        values = self.actions.action_values()
        if len(set(values)) != len(values):
            raise ValueError(f"actions: values must be distinct, got {values}")
        return self


@register_method("clip_rl", ClipRLConfig)
class ClipRL(SegMethod):
    # rl/grad_share is over the rest: decoder and residual net (the CLIP tower is frozen). L_RL's gradient reaches the
    # agent only (A has none, pi reads GAP(z) of the frozen tower), so there it is exactly 0: the agent shapes the
    # segmentor through the alpha it picks in L_seg(O), not through a gradient.
    POLICY_MODULES = ("agent",)

    def __init__(self, cfg, num_classes: int, ignore_index: int):
        super().__init__(cfg, num_classes, ignore_index)
        m = cfg.method
        decoder = self.segmentor.decoder
        if not hasattr(decoder, "features"):
            raise ValueError(f"method clip_rl needs a decoder with features() (tconv, tconv3), got "
                             f"model.decoder={cfg.model.decoder!r}")
        encoder = self.segmentor.encoder
        if getattr(encoder, "patch_size", None) and getattr(decoder, "scale", None) not in (None, encoder.patch_size):
            raise ValueError(f"model.decoder={cfg.model.decoder!r} upsamples x{decoder.scale} but "
                             f"model.encoder={cfg.model.encoder!r} has patch {encoder.patch_size} (tconv: 16, tconv3: 8)")
        width = decoder.classifier.in_channels
        self.residual = nn.Sequential(conv_bn_relu(width, width), nn.Conv2d(width, num_classes, 1))   # r
        self.refine = m.curriculum.shape != "constant"
        self.agent = None
        if m.rl.enabled:
            d = self.segmentor.encoder.out_channels
            actions = m.actions.action_values()
            self.agent = nn.Sequential(nn.Linear(d, m.rl.agent_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(m.rl.agent_hidden, len(actions)))
            self.register_buffer("actions", torch.tensor(actions), persistent=False)
        elif m.loss.kl_reference != "none":
            raise ValueError("method.loss.kl_reference needs the agent (method.rl.enabled=true)")
        elif m.reward.control != "none":
            raise ValueError("method.reward.control needs the agent (method.rl.enabled=true)")
        # Seg-R1's reference policy for the k3 term (None without one)
        self.ref_agent = (reference_policy(self.agent, m.loss.kl_reference, m.loss.reference_checkpoint, "agent.")
                          if self.agent is not None else None)
        self.baseline = Baseline(m.baseline.kind, m.baseline.tau, (m.baseline.a_min, m.baseline.a_max))
        # spurious-reward control (ours): replaces the reward's content before the baseline; its own RNG stream
        self.reward_control = build_reward_control(m.reward.control, cfg.seed)
        self.group = m.baseline.group_size if m.baseline.kind == "group" else 1
        self.f = 1.0
        # f = 1 (constant) leaves the residual and agent without gradients; DDP must be told
        self.ddp_find_unused_parameters = True

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        c = self.cfg.curriculum
        self.f = curriculum(c.shape, epoch, epochs, c.power)

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (frozen tower), initial logits s_L and residual r at the input size."""
        z = self.segmentor.encode(images)
        feats = self.segmentor.decoder.features(z)
        size = images.shape[-2:]
        s_l = F.interpolate(self.segmentor.decoder.classifier(feats), size=size, mode="bilinear", align_corners=False)
        r = F.interpolate(self.residual(feats), size=size, mode="bilinear", align_corners=False)
        return z, s_l, r

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        m, f = self.cfg, self.f
        z, s_l, r = self.heads(images)
        seg_l = self.seg_loss(s_l, masks)
        out = {f"{k}_sL": v for k, v in seg_l.items()}
        out["curriculum_f"] = s_l.new_tensor(f)
        if not self.refine or f >= 1.0:   # the decoder alone this epoch
            out["loss"] = f * seg_l["loss_seg"]
            return out

        if self.agent is None:            # refinement without the agent: O = s_L + r
            seg_o = self.seg_loss(s_l + r, masks)
            out.update({f"{k}_O": v for k, v in seg_o.items()})
            out["loss"] = f * seg_l["loss_seg"] + (1 - f) * seg_o["loss_seg"]
            return out

        b, g = images.shape[0], self.group
        dist = torch.distributions.Categorical(logits=self.agent(z.mean((2, 3))))   # pi(a | GAP(z))
        a = dist.sample((g,)).T                                                     # (B, G)
        alpha = self.actions[a]                                                     # residual scales
        refined = (s_l.unsqueeze(1) + alpha[..., None, None, None] * r.unsqueeze(1)).flatten(0, 1)   # O, (B*G, K, H, W)
        masks_g = masks.repeat_interleave(g, 0) if g > 1 else masks
        seg_o = self.seg_loss(refined, masks_g)
        with torch.no_grad():
            iou_o = iou_reward(refined, masks_g, self.num_classes, self.ignore_index)
            iou_l = iou_reward(s_l, masks, self.num_classes, self.ignore_index)
            reward = iou_o.view(b, g) - iou_l[:, None]                              # IoU(O) - IoU(s_L)
            used = reward if self.reward_control is None else self.reward_control(reward)   # across all B*G
            adv = self.baseline.advantages(used if g > 1 else used[:, 0]).view(b, g)
        logp = dist.log_prob(a.T).T                                                 # (B, G)
        loss_rl = -(adv * logp).mean()                                              # REINFORCE
        out.update({f"{k}_O": v for k, v in seg_o.items()})
        out.update(loss_rl=loss_rl.detach(), reward=reward.mean(), advantage=adv.mean(),
                   baseline=self.baseline.value.float(), alpha=alpha.float().mean(), entropy=dist.entropy().mean().detach())
        out["loss"] = f * seg_l["loss_seg"] + (1 - f) * (m.rl.seg_loss_refined * seg_o["loss_seg"]
                                                         + m.rl.lambda_rl * loss_rl)
        out[RL_TERM + "policy"] = (1 - f) * m.rl.lambda_rl * loss_rl                  # rl/grad_share
        if self.ref_agent is not None:                                              # k3 per action (token), mean
            with torch.no_grad():
                ref = torch.distributions.Categorical(logits=self.ref_agent(z.mean((2, 3))))
                logp_ref = ref.log_prob(a.T).T
            loss_ref = k3_kl(logp, logp_ref).mean()
            out["loss"] = out["loss"] + (1 - f) * m.loss.beta_ref * loss_ref
            out[RL_TERM + "ref"] = (1 - f) * m.loss.beta_ref * loss_ref
            out["rl/kl_ref"] = loss_ref.detach()
        if self.reward_control is not None:     # train/reward stays the real reward
            out["rl/reward_used"] = used.mean()
        return out

    def grad_stats(self) -> dict[str, torch.Tensor]:
        return {} if self.agent is None else {"rl/policy_grad_norm": grad_norm(self.agent)}

    def after_optimizer_step(self) -> None:
        if self.ref_agent is not None and self.cfg.loss.kl_reference == "ema":
            ema_update(self.ref_agent, self.agent, self.cfg.loss.reference_eta)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        z, s_l, r = self.heads(images)
        if not self.refine:
            return s_l
        if self.agent is None:
            return s_l + r
        logits = self.agent(z.mean((2, 3)))
        a = torch.distributions.Categorical(logits=logits).sample() if self.cfg.eval_sample else logits.argmax(1)
        return s_l + self.actions[a][:, None, None, None] * r
