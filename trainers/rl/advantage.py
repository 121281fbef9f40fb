"""Baselines and advantages: paper 002 Eq. 16-18 (EMA baseline + clamp, Table 5b) and Seg-R1 / TRL GRPO."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

KINDS = ("none", "batch_mean", "ema", "group")


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO (Seg-R1, TRL): rewards (B, G), G samples per image -> (r - mean_G) / (std_G + 1e-4), (B, G).

    std_G is the unbiased torch.std over the group; a constant group gives zeros. G = 1 gives zeros (no spread).
    The (B, G) arithmetic runs in float64: a float32 mean of G equal rewards need not equal them (3 x 0.048 / 3 is
    off by 4e-9), and the 1e-4 floor of the denominator turns that into an advantage of ~4e-5 for a group that has
    no spread.
    """
    dtype, rewards = rewards.dtype, rewards.detach().double()
    if rewards.dim() != 2:
        raise ValueError(f"group advantages need rewards of shape (B, G), got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards, dtype=dtype)
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True)
    return ((rewards - mean) / (std + 1e-4)).to(dtype)


def global_mean(r: torch.Tensor) -> torch.Tensor:
    """mean r over the global batch: every rank's rewards, when a torch.distributed group of several ranks runs
    (one all-reduce of (sum, count)); the local mean otherwise. The same value on every rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return r.mean()
    stats = torch.stack([r.sum(), torch.tensor(float(r.numel()), device=r.device, dtype=r.dtype)])
    dist.all_reduce(stats)
    return stats[0] / stats[1]


class Baseline(nn.Module):
    """Reward baseline b and advantage A = clamp(r - b, a_min, a_max) (Eq. 3, 16-18).

    kind: "none" (b = 0), "batch_mean" (b = mean r), "ema" (Eq. 16, b initialised to the first batch's mean),
          "group" (GRPO over (B, G) rewards, group by group). clip: (a_min, a_max) for Eq. 18, or None; either
          bound may be None (no clamp on that side; GRPO as released has none).
    Under data parallelism "mean r" is over the global batch (global_mean: an all-reduce), as Eq. 16 reads, so b is
    identical on every rank. b and the initialised flag are buffers: saved in (and restored from) the state_dict,
    and broadcast from rank 0 before each forward by DDP (broadcast_buffers), which is then a no-op.
    """

    def __init__(self, kind: str = "ema", tau: float = 0.9, clip: tuple[float | None, float | None] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown baseline kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind, self.tau, self.clip = kind, float(tau), clip
        self.register_buffer("b", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def value(self) -> torch.Tensor:
        """Current baseline b, a 0-dim tensor (for logging; "batch_mean"/"group": the last batch's mean reward)."""
        return self.b.detach()

    @torch.no_grad()
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """rewards (B,) (or (B, G) for "group") -> advantages of the same shape, no gradient."""
        r = rewards.detach()
        r_bar = None if self.kind == "none" else global_mean(r)
        if self.kind == "none":
            adv = r.clone()                                          # b = 0
        elif self.kind == "group":
            adv = group_advantages(r)
            self.b.copy_(r_bar)                                      # logged only
        elif self.kind == "batch_mean":
            self.b.copy_(r_bar)
            adv = r - r_bar
        else:  # "ema"
            # First call: b <- mean r (in-place on the device, no sync: torch.where on the flag).
            self.b.copy_(torch.where(self.initialised, self.b, r_bar.to(self.b)))
            self.initialised.fill_(True)
            self.b.mul_(self.tau).add_((1.0 - self.tau) * r_bar.to(self.b))   # Eq. 16
            adv = r - self.b.to(r)                                           # Eq. 17
        if self.clip is not None and (self.clip[0] is not None or self.clip[1] is not None):
            adv = adv.clamp(self.clip[0], self.clip[1])                      # Eq. 18
        return adv

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, tau={self.tau}, clip={self.clip}"
