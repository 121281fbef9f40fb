"""seg_r1: Seg-R1 (papers/001, arXiv 2506.22624) in miniature. A prompt policy writes a box and labelled points;
a FROZEN promptable segmenter (SAM 2.1 in the paper; promptable_tiny here) turns them into a mask; the mask's quality
is the reward; GRPO trains the policy, no critic. Read top to bottom beside the paper and its release (papers/README):

    emb = segmenter.embed_image(x)                     frozen, no gradient, once per image
    a_1..a_G ~ pi(. | emb)                             G prompts per image (release: 4), token by token (prompt_policy)
    mask_g = OR_m segmenter(emb, box_m, points_m)      masks of several boxes OR-ed (release)
    r_g = valid_g (w_iou IoU + w_s S-measure) + w_format valid_g     (release: 0.7, 0.3; format reward 0 / 1, and a
                                                       prompt that fails it gets no mask reward; reward.control
                                                       replaces r's content, ours)
    A_g = (r_g - mean_G r) / (std_G r + 1e-4)          trainers.rl.group_advantages (unbiased std, as TRL)
    L = token-mean( -exp(logp - sg(logp)) A + beta k3(pi || pi_ref) )   release: no ratio clip, beta 0.04
        (policy_loss ppo_clip: TRL's clipped form; with one update per rollout the ratio is 1 and the clip inactive)
    pi_ref = the policy before RL (`init`) or an SFT checkpoint (`sft_checkpoint`)

regime: grpo (the paper: pure RL from the untrained policy), sft (teacher-forced prompts from the ground truth: its
box, K positive points inside it; the SFT baseline), none (the untrained policy; its parameters get lr 0).
Validation: the greedy prompt (argmax tokens / Gaussian means) -> mask -> S-measure, wF, mean E, MAE, IoU
(trainers.sod_metrics) and the share of prompts that pass the format check.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from trainers.config import MethodConfig, Strict
from trainers.methods import register_method
from trainers.methods.base import grad_norm
from trainers.methods.prompt_policy import PromptPolicy, parse
from trainers.methods.promptable_pretrain import ForegroundMethod, SegmenterConfig, mask_boxes, sample_pixels
from trainers.methods.rl_config import BaselineConfig, ReferenceKLConfig, RewardControlConfig
from trainers.methods.segmenter_cache import segmenter_checkpoint
from trainers.models.promptable import build_promptable
from trainers.rl import Baseline, build_reward_control, k3_kl, policy_gradient_loss, ppo_clip_loss, ppo_stats
from trainers.rl.reference import reference_policy
from trainers.sod_metrics import binary_iou, s_measure


class PolicyConfig(Strict):
    kind: Literal["tokens", "gaussian"] = "tokens"   # tokens: the paper's next-token form over quantised coordinates
    boxes: int = Field(1, ge=1)                      # M boxes per prompt (their masks are OR-ed)
    points: int = Field(2, ge=0)                     # K labelled points per box (0: box only)
    bins: int = Field(16, ge=4)                      # coordinate quantisation (tokens) and score-map size
    hidden: int = Field(32, ge=8)
    init_log_sigma: float = -2.0                     # gaussian: initial log sigma of every coordinate
    min_box: float = Field(1 / 32, ge=0)             # a box narrower than this (image fraction) is degenerate


class RewardWeights(RewardControlConfig):            # Seg-R1 release: 0.7 IoU + 0.3 S-measure, plus the format reward
    # + control (rl_config): r in [0, 2] (valid (0.7 IoU + 0.3 S) + format), so `random` is Gaussian
    iou: float = Field(0.7, ge=0)
    s_measure: float = Field(0.3, ge=0)
    format: float = Field(1.0, ge=0)


class GRPOLossConfig(ReferenceKLConfig):
    kl_reference: Literal["none", "init", "sft_checkpoint"] = "init"   # the policy before RL (release)
    policy_loss: Literal["seg_r1", "ppo_clip"] = "seg_r1"
    ppo_eps: float = Field(0.2, gt=0)


class PretrainSource(Strict):
    """Where a missing segmenter checkpoint comes from (trainers/methods/segmenter_cache.py)."""
    preset: str = "promptable_pretrain"
    cache_dir: str | None = None       # null: $RLSEG_CACHE_DIR or ~/.cache/rlseg
    seed: int = 0                      # one segmenter for every trial seed, as one SAM 2 serves every run


class SegR1Config(MethodConfig):
    name: Literal["seg_r1"] = "seg_r1"
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    pretrain: PretrainSource = Field(default_factory=PretrainSource)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    reward: RewardWeights = Field(default_factory=RewardWeights)
    baseline: BaselineConfig = Field(default_factory=lambda: BaselineConfig(kind="group", group_size=4))
    loss: GRPOLossConfig = Field(default_factory=GRPOLossConfig)
    regime: Literal["grpo", "sft", "none"] = "grpo"
    eval_sample: bool = False          # validate with a sampled prompt instead of the greedy one

    def trains_on_reward(self) -> bool:
        return self.regime == "grpo"


def repeat_embedding(emb, n: int):
    """Repeat an image embedding (a tensor, or SAM 2's (embedding, [high-res maps])) n times per image."""
    if isinstance(emb, torch.Tensor):
        return emb.repeat_interleave(n, 0)
    return type(emb)(repeat_embedding(e, n) for e in emb)


@register_method("seg_r1", SegR1Config)
class SegR1(ForegroundMethod):
    VAL_METRICS = ForegroundMethod.VAL_METRICS + ("val/format_valid",)   # + the share of valid prompts
    BUILT_FROM_FILES = "its frozen segmenter is read from a checkpoint"

    def __init__(self, cfg, num_classes: int, ignore_index: int):
        super().__init__(cfg, num_classes, ignore_index)
        m = cfg.method
        if m.baseline.kind != "group":
            raise ValueError(f"method.baseline.kind: seg_r1 is GRPO (group), got {m.baseline.kind!r}")
        self.segmenter = build_promptable(m.segmenter)
        if m.segmenter.name == "promptable_tiny":
            state = torch.load(segmenter_checkpoint(m, cfg.data), map_location="cpu", weights_only=True)
            self.segmenter.load_state_dict(state)
        self.segmenter.requires_grad_(False).eval()
        self.segmenter.frozen = True        # rebuilt from its checkpoint, never trained, left out of checkpoints
        self.policy = PromptPolicy(getattr(self.segmenter, "embed_channels", m.segmenter.dim), m.policy.kind,
                                   m.policy.boxes, m.policy.points, m.policy.bins, m.policy.hidden,
                                   m.policy.init_log_sigma)
        self.ref_policy = reference_policy(self.policy, m.loss.kl_reference, m.loss.reference_checkpoint)
        self.baseline = Baseline("group", clip=(m.baseline.a_min, m.baseline.a_max))
        # spurious-reward control (ours): replaces r's content before the group baseline; its own RNG stream
        self.reward_control = build_reward_control(m.reward.control, cfg.seed)
        self.group = m.baseline.group_size
        self.ddp_find_unused_parameters = True       # box-only policies leave the label head unused

    def train(self, mode: bool = True):
        super().train(mode)
        self.segmenter.eval()                        # frozen: never in training mode
        return self

    def lr_scales(self) -> dict[str, float]:
        return {"policy": 0.0} if self.cfg.regime == "none" else {}

    def _features(self, policy: PromptPolicy, emb) -> torch.Tensor:
        main = emb if isinstance(emb, torch.Tensor) else emb[0]
        return policy.features(main.detach())

    @torch.no_grad()
    def masks_for(self, emb, values: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (N, T) on images whose embedding emb is (N, ...) -> binary masks (N, H, W) (boxes OR-ed; a prompt
        that fails the format check yields an empty mask) and the format flags (N,)."""
        p = self.cfg.policy
        prompt = parse(values, p.boxes, p.points, p.min_box)
        n = values.shape[0]
        emb_m = repeat_embedding(emb, p.boxes)
        points = prompt.points.reshape(n * p.boxes, p.points, 2).clamp(0, 1) if p.points else None
        labels = prompt.labels.reshape(n * p.boxes, p.points) if p.points else None
        logits = self.segmenter.decode(emb_m, prompt.boxes.reshape(-1, 4).clamp(0, 1), points, labels, size)
        fg = (logits > 0).view(n, p.boxes, *logits.shape[-2:]).any(1)
        return fg & prompt.valid[:, None, None], prompt.valid

    def sft_targets(self, gt: torch.Tensor) -> torch.Tensor:
        """Ground-truth prompts (B, T): the mask's box, K positive points inside it, for every box slot."""
        p = self.cfg.policy
        box = mask_boxes(gt).clamp(0, 1 - 1e-6)
        pts = sample_pixels(gt.float(), p.points * p.boxes).view(-1, p.boxes, p.points, 2)
        per_box = torch.cat([box[:, None].expand(-1, p.boxes, 4),
                             torch.cat([pts, torch.ones_like(pts[..., :1])], -1).flatten(2)], 2)
        return per_box.flatten(1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        m, g = self.cfg, self.group
        gt = masks == 1
        with torch.no_grad():
            emb = self.segmenter.embed_image(images)
        feats = self._features(self.policy, emb)
        if m.regime == "sft":
            logp = self.policy.log_prob(feats, self.sft_targets(gt))
            loss = -logp.mean()
            return {"loss": loss, "loss_sft": loss.detach()}

        # rollout: G prompts per image (no gradient), their masks and rewards
        values = self.policy.act(feats, g)
        emb_g = repeat_embedding(emb, g)
        pred, valid = self.masks_for(emb_g, values, masks.shape[-2:])
        gt_g = gt.repeat_interleave(g, 0)
        iou = binary_iou(pred, gt_g)
        s = s_measure(pred.float(), gt_g)
        fmt = valid.float()
        r = fmt * (m.reward.iou * iou + m.reward.s_measure * s) + m.reward.format * fmt
        used = r if self.reward_control is None else self.reward_control(r)     # across all B*G (other images)
        adv = self.baseline.advantages(used.view(-1, g)).reshape(-1)            # (r - mean_G) / (std_G + 1e-4)

        # the update: per-token log pi of the sampled prompts (teacher-forced), token mean
        logp = self.policy.log_prob(feats, values)                               # (B*G, T)
        if m.loss.policy_loss == "seg_r1":
            loss_policy = policy_gradient_loss(logp, adv[:, None])
        else:
            loss_policy = ppo_clip_loss(logp, logp.detach(), adv[:, None], m.loss.ppo_eps)
        out = {"loss_policy": loss_policy.detach()}
        loss = loss_policy
        if self.ref_policy is not None:
            with torch.no_grad():
                logp_ref = self.ref_policy.log_prob(self._features(self.ref_policy, emb), values)
            kl = k3_kl(logp, logp_ref).mean()                                   # k3, token mean
            loss = loss + m.loss.beta_ref * kl
            out["rl/kl_ref"] = kl.detach()
        if m.regime == "none":
            loss = loss * 0.0                       # the untrained policy: a graph, no update (lr 0 as well)
        out.update({"loss": loss, "rl/reward": r.mean(), "rl/reward_iou": iou.mean(), "rl/reward_s": s.mean(),
                    "rl/format_valid": fmt.mean(), "rl/reward_std_group": r.view(-1, g).std(1).mean(),
                    "rl/adv_abs_mean": adv.abs().mean(), "rl/logp_mean": logp.detach().mean()})
        out.update({f"rl/{k}": v for k, v in ppo_stats(logp, logp.detach(), m.loss.ppo_eps, adv[:, None]).items()})
        if self.reward_control is not None:     # rl/reward stays the real reward
            out["rl/reward_used"] = used.mean()
        return out

    # No rl/grad_share (POLICY_MODULES stays empty): the segmenter is frozen, so no segmentor weight gets a gradient
    # from anything, and the policy never has an SFT term beside its RL terms (regime sft is SFT alone, grpo RL alone).
    def grad_stats(self) -> dict[str, torch.Tensor]:
        return {"rl/policy_grad_norm": grad_norm(self.policy)}

    @torch.no_grad()
    def prompt_masks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.segmenter.embed_image(images)
        values = self.policy.act(self._features(self.policy, emb), greedy=not self.cfg.eval_sample)
        return self.masks_for(emb, values, images.shape[-2:])

    def predict_masks(self, images, masks):
        pred, valid = self.prompt_masks(images)
        return pred, {"format_valid": valid.float()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) logits of the greedy prompt's binary mask (+-1)."""
        fg = self.prompt_masks(images)[0].float() * 2 - 1
        return torch.stack([-fg, fg], 1)

