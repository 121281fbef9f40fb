"""Latent-space Gaussian policy pi_phi of paper 002, Section 3.2 (Eq. 7-12), and its analytic KL (Eq. 5).

The policy sees the encoder latent z (B, d, h, w) and emits one diagonal Gaussian per image over the d
channels; the action s (B, d, h, w) draws i.i.d. noise at every spatial position with the channel's mu, sigma.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class GaussianLatentPolicy(nn.Module):
    """pi_phi(s | z) = prod_{h,w,d} N(s_{d,h,w} | mu_d, sigma_d^2).

    channels:        d, the latent width (kept by every conv block).
    blocks:          L, the number of Conv3x3-BN-ReLU blocks (Eq. 7-8; paper L = 4).
    pool:            (Ph, Pw) of the adaptive average pool before flattening (Eq. 9).
    log_sigma_bound: c in log_sigma = c * tanh(fc(.)) (Eq. 10; paper c = 4); None = unbounded (Table 8 ablation).
    kernel_size:     of the block convs. The paper does not give it; "ConvProj" reads as a projection, so 1 (a 3x3
                     block on a 2048-wide R50-D8 latent at 64 x 64 costs ~150 GMAC per image and block).
    """

    def __init__(self, channels: int, blocks: int = 4, pool: tuple[int, int] = (4, 4),
                 log_sigma_bound: float | None = 4.0, kernel_size: int = 1):
        super().__init__()
        d = channels
        ph, pw = pool
        # Eq. 7-8: ConvProj = B^(L) o ... o B^(1), B = ReLU(BN(Conv(.))), d channels throughout.
        self.conv_proj = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(d),
                          nn.ReLU(inplace=True))
            for _ in range(blocks)
        ])
        self.pool = nn.AdaptiveAvgPool2d((ph, pw))
        # Eq. 10: two linear heads on the flattened (Ph*Pw*d) descriptor of Eq. 9.
        self.fc_mu = nn.Linear(ph * pw * d, d)
        self.fc_logsigma = nn.Linear(ph * pw * d, d)
        self.log_sigma_bound = log_sigma_bound

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d, h, w) -> (mu, log_sigma), each (B, d)."""
        zbar = self.pooled(self.conv_proj(z)).flatten(1)      # Eq. 9: (B, Ph*Pw*d)
        mu = self.fc_mu(zbar)                                  # Eq. 10
        log_sigma = self.fc_logsigma(zbar)
        if self.log_sigma_bound is not None:
            log_sigma = self.log_sigma_bound * torch.tanh(log_sigma)   # Eq. 10: 4 * tanh(.)
        return mu, log_sigma

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 9's adaptive average pool to (Ph, Pw). When (Ph, Pw) divides (h, w) its windows are those of a plain
        average pool, which gives the same values (bitwise) at about half the cost on CPU."""
        (h, w), (ph, pw) = x.shape[-2:], self.pool.output_size
        if h % ph or w % pw:
            return self.pool(x)
        return F.avg_pool2d(x, (h // ph, w // pw))

    @staticmethod
    def sample(mu: torch.Tensor, log_sigma: torch.Tensor, spatial: tuple[int, int],
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 11, reparameterised: s = mu + sigma * eps, eps ~ N(0, 1) of shape (B, d, h, w).

        mu, log_sigma (B, d) broadcast over (h, w) = spatial; gradients flow to mu and log_sigma.
        """
        h, w = spatial
        eps = torch.randn((*mu.shape, h, w), generator=generator, device=mu.device, dtype=mu.dtype)
        return mu[..., None, None] + log_sigma.exp()[..., None, None] * eps


def gaussian_log_prob(s: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                      reduce: bool = True) -> torch.Tensor:
    """Eq. 12: log pi(s) = sum_{h,w,d} log N(s_{d,h,w} | mu_d, sigma_d^2).

    s (B, d, h, w), mu (B, d), log_sigma (B, d) -> (B,); with reduce=False the per-element terms (B, d, h, w).
    """
    ls = log_sigma[..., None, None]
    zscore = (s - mu[..., None, None]) * torch.exp(-ls)
    terms = -0.5 * zscore.pow(2) - ls - _LOG_SQRT_2PI
    return terms.flatten(1).sum(1) if reduce else terms


class SampleMoments(NamedTuple):
    """Per-(image, channel) sums of a sample s (B, d, h, w) about a centre c (B, d): all that the image-level
    log-density of s needs under any Gaussian of the policy family (mu and sigma shared over h, w)."""
    center: torch.Tensor      # c (B, d), constant
    m1: torch.Tensor          # sum_hw (s - c), (B, d)
    m2: torch.Tensor          # sum_hw (s - c)^2, (B, d)
    count: int                # h * w


@torch.no_grad()
def sample_moments(s: torch.Tensor, center: torch.Tensor) -> SampleMoments:
    """Moments of a constant sample s (B, d, h, w) about center (B, d). Take the mean that s was drawn with as the
    centre: s - c is then sigma * eps, and the sums below stay well conditioned (no cancellation when |mu| >>
    sigma, which sum_hw s^2 - 2 mu sum_hw s + hw mu^2 about 0 would suffer in float32)."""
    c = center.detach()
    dev = (s.detach() - c[..., None, None]).flatten(2)
    return SampleMoments(c, dev.sum(-1), dev.square().sum(-1), dev.shape[-1])


def gaussian_log_prob_moments(moments: SampleMoments, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Eq. 12 from the moments of s: equals gaussian_log_prob(s, mu, log_sigma) up to float rounding -> (B,).

    sum_hw (s - mu)^2 = m2 + 2 a m1 + hw a^2 with a = c - mu, so each policy costs (B, d) work instead of
    (B, d, h, w); gradients reach mu and log_sigma as through the element-wise form.
    """
    m, n = moments, moments.count
    a = m.center - mu
    sq = m.m2 + 2.0 * a * m.m1 + n * a.square()                             # sum_hw (s - mu)^2, (B, d)
    return (-0.5 * sq * torch.exp(-2.0 * log_sigma) - n * (log_sigma + _LOG_SQRT_2PI)).sum(-1)


def gaussian_log_ratio_moments(moments: SampleMoments, mu: torch.Tensor, log_sigma: torch.Tensor,
                               mu_old: torch.Tensor, log_sigma_old: torch.Tensor) -> torch.Tensor:
    """Eq. 4's image-level log rho = log pi(s | mu, log_sigma) - log pi(s | mu_old, log_sigma_old) -> (B,), with
    gradients to mu and log_sigma only (the old policy is a constant).

    Not the difference of two gaussian_log_prob_moments: each of those sums d per-channel terms of size ~h*w (at
    paper shapes 2048 terms of ~4096), and their float32 difference keeps ~1e-1 of error in a log rho of ~10. Here
    each channel's difference is formed first (the log sqrt(2 pi) constant cancels exactly) and the (B, d) work runs
    in float64, so the only float32 error left is that of the moments m1, m2 times the small difference of the two
    policies' coefficients.
    """
    m, n = moments, moments.count
    f64 = torch.float64
    m1, m2, c = m.m1.to(f64), m.m2.to(f64), m.center.to(f64)

    def sq_over_var(mu_, log_sigma_):                  # sum_hw (s - mu)^2 / sigma^2, (B, d)
        a = c - mu_.to(f64)
        return (m2 + 2.0 * a * m1 + n * a.square()) * torch.exp(-2.0 * log_sigma_.to(f64))

    per_channel = (-0.5 * (sq_over_var(mu, log_sigma) - sq_over_var(mu_old.detach(), log_sigma_old.detach()))
                   - n * (log_sigma.to(f64) - log_sigma_old.detach().to(f64)))
    return per_channel.sum(-1).to(mu.dtype)


def gaussian_kl(mu_p: torch.Tensor, log_sigma_p: torch.Tensor, mu_q: torch.Tensor, log_sigma_q: torch.Tensor,
                spatial: int | tuple[int, int] = 1) -> torch.Tensor:
    """KL(p || q) of diagonal Gaussians over d channels, analytic; all inputs (B, d) -> (B,).

    Per dimension: log(sigma_q / sigma_p) + (sigma_p^2 + (mu_p - mu_q)^2) / (2 sigma_q^2) - 1/2, summed over d.
    The action is i.i.d. over the h*w positions, so the KL of the joint is `spatial` (= h*w, or (h, w)) times that.
    Eq. 5 uses KL(pi_old || pi_phi): pass the old policy as p and the current one as q.
    Near p = q every term is a small difference of O(1) numbers: with x = 2 (log sigma_p - log sigma_q),
    sigma_p^2 / sigma_q^2 - 1 - x is written expm1(x) - x (no 1 - 1 cancellation), and the (B, d) work runs in
    float64 before the sum over d and the factor h*w (at paper shapes 2048 x 4096 terms).
    """
    if isinstance(spatial, (tuple, list)):
        spatial = math.prod(spatial)
    f64 = torch.float64
    x = 2.0 * (log_sigma_p.to(f64) - log_sigma_q.to(f64))
    mean_term = (mu_p.to(f64) - mu_q.to(f64)).pow(2) * torch.exp(-2.0 * log_sigma_q.to(f64))
    kl = 0.5 * (torch.expm1(x) - x + mean_term)
    return (spatial * kl.sum(-1)).to(mu_q.dtype)
