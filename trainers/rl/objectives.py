"""PPO clipped objective (paper 002 Eq. 4), its diagnostics, and the EMA old policy update (Eq. 19)."""
from __future__ import annotations

import torch
import torch.nn as nn


LOG_RATIO_CAP = 20.0


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """Eq. 4: L = -mean(min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)), rho = exp(logp - logp_old).

    logp, logp_old, adv: (B,), or per element (B, N) with adv (B, 1) broadcast (the element-level variant).
    logp_old (the EMA old policy) and adv are constants; returns a scalar (the mean over all terms).
    """
    logp_old, adv = logp_old.detach(), adv.detach()
    # log pi sums d*h*w terms (Eq. 12), so the log-ratio can reach the hundreds; exp would overflow to inf and
    # 0 * inf gives NaN gradients. Capping it at +-LOG_RATIO_CAP (rho <= 4.8e8) changes nothing below that.
    ratio = torch.exp((logp - logp_old).clamp(-LOG_RATIO_CAP, LOG_RATIO_CAP))
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - eps, 1.0 + eps) * adv
    return -torch.min(surr1, surr2).mean()


@torch.no_grad()
def ppo_stats(logp: torch.Tensor, logp_old: torch.Tensor, eps: float = 0.2) -> dict[str, torch.Tensor]:
    """Diagnostics as in CleanRL: clipfrac = mean(|rho - 1| > eps), approx_kl = mean((rho - 1) - log rho) (k3)."""
    logratio = (logp.detach() - logp_old.detach()).clamp(-LOG_RATIO_CAP, LOG_RATIO_CAP)
    ratio = logratio.exp()
    return {
        "clipfrac": ((ratio - 1.0).abs() > eps).float().mean(),
        "approx_kl": ((ratio - 1.0) - logratio).mean(),
    }


@torch.no_grad()
def ema_update(target_module: nn.Module, source_module: nn.Module, eta: float) -> None:
    """Eq. 19: phi_old <- eta * phi_old + (1 - eta) * phi, in place on `target_module`.

    Floating buffers (BN running stats) are averaged the same way; integer buffers (num_batches_tracked) are
    copied. The target must be frozen (requires_grad_(False)): it is the old policy, never trained.
    """
    trainable = [n for n, p in target_module.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"ema_update target must have requires_grad False; trainable: {trainable[:3]}")
    src_params, src_bufs = dict(source_module.named_parameters()), dict(source_module.named_buffers())
    olds = [p for _, p in target_module.named_parameters()]
    news = [src_params[name].detach() for name, _ in target_module.named_parameters()]
    for name, b_old in target_module.named_buffers():
        if b_old.is_floating_point():
            olds.append(b_old)
            news.append(src_bufs[name].detach())
        else:
            b_old.copy_(src_bufs[name])
    if olds and olds[0].device.type == "cpu":
        # on CPU the out-of-place torch._foreach_mul costs ~4x this loop (0.7 vs 0.15 ms for the policy)
        for old, new in zip(olds, news):
            old.mul_(eta).add_((1.0 - eta) * new)
    else:                                              # eta * old + (1 - eta) * new, a few fused calls per step
        torch._foreach_mul_(olds, eta)
        torch._foreach_add_(olds, torch._foreach_mul(news, 1.0 - eta))
