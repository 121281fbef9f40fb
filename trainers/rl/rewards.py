"""Per-image segmentation rewards of paper 002 (Reward Design, Eq. 15), batched on the device.

Every reward is computed for each image of the batch at once: no Python loop over images or classes and no
host sync. Pixels whose target is `ignore_index` (or outside [0, num_classes)) never count:
  * iou / dice / ce use the valid pixels only; an image with no valid pixel gets 0 for all three;
  * boundary: paper 002 says only that r^Boundary "measures edge accuracy by comparing predicted and ground-truth
    boundaries"; our reading is the class-wise BF score (Csurka et al. 2013; the DAVIS F measure per class): thin
    1-px boundaries as DAVIS's seg2bmap, matched within a tolerance disk (trainers/rl/boundary.py). A class present
    in only one of prediction and target scores 0 (a uniform wrong-class prediction scores 0). An outline that
    runs through an ignore band (VOC's 255 object outlines) is matched by a predicted edge of the right class
    inside that band and by nothing else; the prediction on other ignore pixels never counts. An image with no
    valid pixel has no boundary term: NaN, which weighted_reward leaves out of that image's reward (batch means of
    the term: torch.nanmean).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainers.rl.boundary import boundary_f1


def _argmax_classes(logits: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 of (B, K, H, W) logits -> (B, H, W) int64, the first maximal class on ties (as
    torch.argmax; a pixel with a NaN logit gets the last class). Through amax and a compare: torch.max(1).indices
    and argmax(1) are 3x and 40x slower on CPU."""
    k = logits.shape[1]
    is_max = logits == logits.amax(1, keepdim=True)
    # weight class c by k-1-c, so the largest weight among the maxima marks the first of them
    rank = torch.arange(k - 1, -1, -1, device=logits.device, dtype=torch.uint8 if k <= 256 else torch.int32)
    return (k - 1) - (is_max * rank.view(1, k, 1, 1)).amax(1).long()


def _valid(target: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid pixel map, target with invalid pixels set to 0)."""
    target = target.long()
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    return valid, target.masked_fill(~valid, 0)


def _overlap(pred: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image IoU and Dice, each the mean over the classes present in prediction or target -> (B,), (B,)."""
    b = pred.shape[0]
    # Per-image confusion counts in one scatter_add on bins (image, target class, predicted class); valid pixels
    # weigh 1, the others 0. B * K^2 bins: 360k for ADE20K's 150 classes at batch 16.
    bins = (torch.arange(b, device=tgt.device).view(b, 1, 1) * k + tgt) * k + pred
    conf = torch.zeros(b * k * k, dtype=torch.long, device=tgt.device)
    conf = conf.scatter_add_(0, bins.flatten(), valid.flatten().long()).view(b, k, k).float()
    inter = conf.diagonal(dim1=1, dim2=2)
    area_g, area_p = conf.sum(2), conf.sum(1)
    union = area_p + area_g - inter
    present = union > 0
    n_present = present.sum(1).clamp_min(1)
    iou = torch.where(present, inter / union.clamp_min(1), 0.0).sum(1) / n_present
    dice = torch.where(present, 2 * inter / (area_p + area_g).clamp_min(1), 0.0).sum(1) / n_present
    has_valid = valid.flatten(1).any(1)
    return torch.where(has_valid, iou, 0.0), torch.where(has_valid, dice, 0.0)


@torch.no_grad()
def iou_reward(logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """r^IoU alone (as segmentation_rewards(...)["iou"], without the other terms' work) -> (B,)."""
    valid, tgt = _valid(target, num_classes, ignore_index)
    return _overlap(_argmax_classes(logits), tgt, valid, logits.shape[1])[0]


@torch.no_grad()
def segmentation_rewards(logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
                         pixel_ce: torch.Tensor | None = None, boundary_tolerance: float = 1.0,
                         boundary_band: int = 8) -> dict[str, torch.Tensor]:
    """logits (B, K, H, W), target (B, H, W) int64 -> dict(iou, dice, ce, boundary), each (B,) float32 in [0, 1].

    Prediction = argmax of the logits. iou / dice: mean over the classes present in the prediction or the target
    of that image; ce: exp(-mean pixel cross-entropy) (r^CE, the "inverse" of CE); boundary: the class-wise BF score
    (boundary_f1, with `boundary_tolerance` and `boundary_band`), NaN for an image with no valid pixel. No gradient:
    these are rewards, not losses.
    pixel_ce: the per-pixel cross-entropy (B, H, W) of these logits against target, when the caller has it
    already (L_seg with reduction="none"); its values on invalid pixels are not read. None: computed here.
    """
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    valid, tgt = _valid(target, num_classes, ignore_index)
    pred = _argmax_classes(logits)
    n_valid = valid.flatten(1).sum(1)                                      # (B,)
    iou, dice = _overlap(pred, tgt, valid, logits.shape[1])

    # r^CE = exp(-mean CE over the valid pixels).
    if pixel_ce is None:
        pixel_ce = F.cross_entropy(logits.float(), tgt, reduction="none")
    ce_sum = torch.where(valid, pixel_ce.detach().float(), 0.0).flatten(1).sum(1)
    ce = torch.where(n_valid > 0, torch.exp(-ce_sum / n_valid.clamp_min(1)), 0.0)

    boundary = boundary_f1(pred, tgt, valid, logits.shape[1], boundary_tolerance, boundary_band)
    return {"iou": iou, "dice": dice, "ce": ce, "boundary": boundary}


def weighted_reward(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Eq. 15: r = sum_k lambda_k r_k over the keys whose weight is non-zero -> (B,), never NaN.

    A term that is NaN for an image (r^Boundary of an image with no valid pixel) is not part of that image's
    reward: the image gets the weighted sum of the terms it has, rescaled by (sum of all non-zero weights) / (sum
    of the weights of its terms), so its reward stays on the scale of the others (with the default weights, all 1:
    (iou + dice + ce) * 4 / 3). An image with none of the weighted terms gets 0. With every term present this is
    the plain sum of Eq. 15.
    """
    used = [(float(wt), rewards[name]) for name, wt in weights.items() if wt != 0]
    if not used:
        return torch.zeros_like(next(iter(rewards.values())))
    total = sum(wt * r.nan_to_num() for wt, r in used)                   # Python weights: no host-to-device copy
    weight_had = sum(wt * ~r.isnan() for wt, r in used)
    complete = torch.stack([~r.isnan() for _, r in used]).all(0)
    scale = torch.where(complete, 1.0, sum(wt for wt, _ in used) / weight_had)   # exactly 1 with every term
    return torch.where(weight_had != 0, total * scale, 0.0)


# Spurious-reward controls (ours; no seed paper has them). Shao et al. 2025, "Spurious Rewards: Rethinking Training
# Signals in RLVR" (arXiv 2506.10947): GRPO with random rewards still gained on MATH-500, so an RL row is read against
# the same method trained on a reward without the content.
CONTROLS = ("none", "random", "shuffled", "inverted")


def reward_stats(r: torch.Tensor) -> torch.Tensor:
    """(mean, population std, 1 if every reward is 0 or 1 else 0) of r over all its elements -> (3,) float32."""
    x = r.detach().reshape(-1).float()
    return torch.stack([x.mean(), x.std(correction=0), ((x == 0) | (x == 1)).all().float()])


@torch.no_grad()
def control_rewards(r: torch.Tensor, control: str, generator: torch.Generator | None = None,
                    stats: torch.Tensor | None = None) -> torch.Tensor:
    """The per-sample reward r (any shape: (N,), or GRPO's (B, G)) with its content replaced; same shape and dtype.

    none      r itself
    random    i.i.d. draws with the mean and std of `stats` (reward_stats; default: r's own); Bernoulli at that mean
              when those rewards are all 0 or 1 (Shao et al.'s random reward)
    shuffled  r permuted over all its elements: for (B, G) a group's rewards come from other images' samples
    inverted  -r
    Draws come only from `generator` (on r's device), never from the global RNG, so the policy's sampling stream is
    the real-reward run's. Vectorised, no host sync.
    """
    if control not in CONTROLS:
        raise ValueError(f"unknown reward control {control!r}; expected one of {', '.join(CONTROLS)}")
    if control == "none":
        return r
    if control == "inverted":
        return -r
    flat = r.detach().reshape(-1)
    if control == "shuffled":
        return flat[torch.randperm(flat.numel(), generator=generator, device=r.device)].view_as(r)
    mean, std, binary = (reward_stats(r) if stats is None else stats.to(r.device, torch.float32)).unbind()
    normal = mean + std * torch.randn(flat.shape, generator=generator, device=r.device)
    coin = torch.bernoulli(mean.clamp(0, 1).expand(flat.shape), generator=generator)
    return torch.where(binary > 0, coin, normal).to(r.dtype).view_as(r)    # chosen on the device: no sync


class RewardControl(nn.Module):
    """`method.reward.control` of one method: control_rewards on its own generator, reseeded every step from
    (trial seed, rank, step), so the policy's sampling (global RNG) is untouched.

    `random` draws with the previous step's batch statistics (the first step: its own). Drawn around the current
    batch's mean, the draws would carry that mean, and with an EMA baseline (or none) A = r_random - b then
    reinforces every sample of a batch whose real mean beat b: REINFORCE on the batch-mean reward, a real-reward
    signal (measured on clip_rl, 6 seeds: the real reward rose in all six; zero-mean noise and lagged statistics do
    not). `shuffled` keeps that batch mean by definition: read it against a batch_mean or group baseline.

    State: the step count (extra state, a CPU int64 tensor, equal on every rank) and the previous batch's statistics
    (buffers; under DDP broadcast from rank 0 before each forward), both in the method's state_dict, so a resumed
    run draws what the uninterrupted one drew. Under DDP each rank controls its own local batch (its permutation,
    its draws); the baseline then sees the controlled rewards of every rank. Methods build it only for a control other
    than none, so their state_dict is unchanged without one."""

    def __init__(self, control: str, seed: int):
        super().__init__()
        if control not in CONTROLS:
            raise ValueError(f"unknown reward control {control!r}; expected one of {', '.join(CONTROLS)}")
        self.control, self.seed, self.steps = control, int(seed), 0
        self._generator: torch.Generator | None = None
        self.register_buffer("last_stats", torch.zeros(3))
        self.register_buffer("has_last", torch.zeros((), dtype=torch.bool))

    def generator(self, device: torch.device) -> torch.Generator:
        """This step's generator on `device`; advances the step count."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = np.random.SeedSequence([self.seed % 2**64, rank, self.steps]).generate_state(1, np.uint64)[0]
        self.steps += 1
        return self._generator.manual_seed(int(seed))

    @torch.no_grad()
    def forward(self, r: torch.Tensor) -> torch.Tensor:
        now = reward_stats(r)
        stats = torch.where(self.has_last, self.last_stats, now)
        out = control_rewards(r, self.control, self.generator(r.device), stats)
        self.last_stats.copy_(now)
        self.has_last.fill_(True)
        return out

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.steps, dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.steps = int(state)

    def extra_repr(self) -> str:
        return f"control={self.control!r}, seed={self.seed}"


def build_reward_control(control: str, seed: int) -> RewardControl | None:
    """A method's RewardControl for `method.reward.control`, None for "none" (its state_dict then stays as without
    one)."""
    return None if control == "none" else RewardControl(control, seed)
