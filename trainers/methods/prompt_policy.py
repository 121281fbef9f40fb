"""Seg-R1's prompt policy, small: image features -> M boxes, each with K labelled points.

Seg-R1 (papers/001) has an LMM write the prompt as text, token by token. `tokens` keeps that form: a sequence of
T = M (4 + 3K) discrete tokens, sampled autoregressively,

    per box: x1, y1, x2, y2, then K times (x, y, label)      coordinates quantised into `bins` values in [0, 1]

with a GRU state carrying what was emitted so far. A coordinate token's logits are spatially grounded: a query from
the state scores every cell of the feature map (bins x bins), and the x (y) logits are the log-sum-exp of the scores
over rows (columns); a label token reads the features at the point just placed. `gaussian` is the continuous
alternative: each coordinate ~ N(mu, sigma^2) with mu the soft-argmax of its own score map and a learned log sigma
per coordinate, each label ~ Bernoulli(features at the point's mean). Either way log pi is per token (the
Gaussian's per coordinate / label), so GRPO's token mean and k3 KL apply unchanged.

The state is the frozen segmenter's image embedding (detached; the LMM of the paper has its own vision tower, here
the segmenter's features are the cheap stand-in) plus two coordinate channels, through two trainable convs.
An action is returned as (values (N, T) float: coordinate values / labels, tokens (N, T) long: bin indices / labels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Prompt:
    boxes: torch.Tensor       # (N, M, 4) x1, y1, x2, y2
    points: torch.Tensor      # (N, M, K, 2)
    labels: torch.Tensor      # (N, M, K) 0 / 1
    valid: torch.Tensor       # (N,) bool: Seg-R1's format check (every box non-degenerate, everything in the image)


def layout(boxes: int, points: int) -> list[str]:
    """Token kinds in order: 'x', 'y' (coordinates) and 'l' (a point's label)."""
    return (["x", "y", "x", "y"] + ["x", "y", "l"] * points) * boxes


def parse(values: torch.Tensor, boxes: int, points: int, min_size: float) -> Prompt:
    """values (N, T) -> Prompt. Valid: x2 - x1 >= min_size and y2 - y1 >= min_size for every box, every coordinate in
    [0, 1] (the format reward; Seg-R1 as released: a prompt that does not parse gets no mask reward)."""
    n = values.shape[0]
    per = values.view(n, boxes, 4 + 3 * points)
    b = per[..., :4]
    pts = per[..., 4:].reshape(n, boxes, points, 3)
    coords = torch.cat([b.reshape(n, -1), pts[..., :2].reshape(n, -1)], 1)
    ok = ((b[..., 2] - b[..., 0] >= min_size) & (b[..., 3] - b[..., 1] >= min_size)).all(1)
    ok = ok & ((coords >= 0) & (coords <= 1)).all(1)
    return Prompt(b, pts[..., :2], pts[..., 2].round().long(), ok)


class PromptPolicy(nn.Module):
    def __init__(self, in_channels: int, kind: str = "tokens", boxes: int = 1, points: int = 2, bins: int = 32,
                 hidden: int = 64, init_log_sigma: float = -2.0):
        super().__init__()
        self.kind, self.boxes, self.points, self.bins, self.hidden = kind, boxes, points, bins, hidden
        self.kinds = layout(boxes, points)
        t = len(self.kinds)
        self.trunk = nn.Sequential(nn.Conv2d(in_channels + 2, hidden, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU())
        self.h0 = nn.Linear(hidden, hidden)
        self.role = nn.Parameter(torch.randn(t, hidden) * 0.1)       # one query offset per token position
        self.query = nn.Linear(hidden, hidden)
        self.label_head = nn.Linear(hidden, 1)
        if kind == "tokens":
            self.coord_embed = nn.Linear(16, hidden)                   # Fourier features of an emitted coordinate
            self.label_embed = nn.Embedding(2, hidden)
            self.gru = nn.GRUCell(hidden, hidden)
        else:
            self.log_sigma = nn.Parameter(torch.full((t,), float(init_log_sigma)))

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, hidden, bins, bins)."""
        b, _, h, w = emb.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=emb.device), torch.linspace(-1, 1, w, device=emb.device),
                                indexing="ij")
        x = torch.cat([emb, torch.stack([xs, ys]).expand(b, 2, h, w).to(emb.dtype)], 1)
        return F.interpolate(self.trunk(x), size=(self.bins, self.bins), mode="bilinear", align_corners=False)

    def _scores(self, feats: torch.Tensor, state: torch.Tensor, t: int) -> torch.Tensor:
        """(N, bins, bins) score map of token t's query; feats (B, C, bins, bins) of the B images, state (N, C) of
        their N = B * G samples (G consecutive rows per image): one bmm, the features are never repeated."""
        b, c, h, w = feats.shape
        q = self.query(state + self.role[t]).view(b, -1, c)
        return torch.bmm(q, feats.view(b, c, h * w)).view(-1, h, w) / math.sqrt(self.hidden)

    def _point_logit(self, feats: torch.Tensor, state: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Label logit (N,) from the features at xy (N, 2) in [0, 1] (bilinear)."""
        b, c = feats.shape[:2]
        grid = (xy.clamp(0, 1) * 2 - 1).view(b, -1, 1, 2)
        at = F.grid_sample(feats, grid, align_corners=False)[..., 0].transpose(1, 2).reshape(-1, c)   # (N, C)
        return self.label_head(at + state).squeeze(1)

    def _initial_state(self, feats: torch.Tensor, n: int) -> torch.Tensor:
        h = torch.tanh(self.h0(feats.mean((2, 3))))
        return h.repeat_interleave(n // feats.shape[0], 0)

    def _fourier(self, v: torch.Tensor) -> torch.Tensor:
        f = v[:, None] * (math.pi * 2.0 ** torch.arange(8, device=v.device))
        return torch.cat([f.sin(), f.cos()], 1)

    def _token_step(self, feats, state, t):
        """Log-probs (N, V) of token t."""
        kind = self.kinds[t]
        if kind == "l":
            prev = self._prev_xy
            logit = self._point_logit(feats, state, prev)
            logp = F.logsigmoid(torch.stack([-logit, logit], 1))
        else:
            s = self._scores(feats, state, t)
            logp = torch.log_softmax(torch.logsumexp(s, 1 if kind == "x" else 2), 1)
        return logp

    def _advance(self, state, t, token):
        kind = self.kinds[t]
        if kind == "l":
            e = self.label_embed(token)
        else:
            v = (token.to(state.dtype) + 0.5) / self.bins
            e = self.coord_embed(self._fourier(v))
            if kind == "x":
                self._pending_x = v
            else:
                self._prev_xy = torch.stack([self._pending_x, v], 1)
        return self.gru(e, state)

    def run_tokens(self, feats: torch.Tensor, n: int, forced: torch.Tensor | None, greedy: bool = False):
        """Autoregressive pass over N = B * G samples of the B images of feats: sample (forced None) or
        teacher-force `forced` (N, T) tokens. Returns (tokens (N, T) long, logp (N, T))."""
        state = self._initial_state(feats, n)
        tokens, logps = [], []
        self._prev_xy = self._pending_x = None
        for t in range(len(self.kinds)):
            logp = self._token_step(feats, state, t)
            if forced is not None:
                tok = forced[:, t]
            elif greedy:
                tok = logp.argmax(1)
            else:
                tok = torch.multinomial(logp.exp(), 1).squeeze(1)
            tokens.append(tok)
            logps.append(logp.gather(1, tok[:, None]).squeeze(1))
            state = self._advance(state, t, tok)
        return torch.stack(tokens, 1), torch.stack(logps, 1)

    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens -> values: bin centres for coordinates, 0 / 1 for labels."""
        is_label = torch.tensor([k == "l" for k in self.kinds], device=tokens.device)
        return torch.where(is_label, tokens.float(), (tokens.float() + 0.5) / self.bins)

    # ---- gaussian ----
    def gaussian_params(self, feats: torch.Tensor, n: int):
        """mu (N, T) per token for N = B * G samples: the soft-argmax of each coordinate token's score map (0 for
        labels), and the state (N, C)."""
        state = self._initial_state(feats, n)
        grid = (torch.arange(self.bins, device=feats.device, dtype=feats.dtype) + 0.5) / self.bins
        mus = []
        for t, kind in enumerate(self.kinds):
            if kind == "l":
                mus.append(torch.zeros(n, device=feats.device, dtype=feats.dtype))
                continue
            s = self._scores(feats, state, t)
            p = torch.softmax(torch.logsumexp(s, 1 if kind == "x" else 2), 1)
            mus.append((p * grid).sum(1))
        return torch.stack(mus, 1), state

    def gaussian_logp(self, feats, values, mu, state):
        """Per-token log-probs (N, T) of values under the Gaussian coordinates and Bernoulli labels."""
        is_label = [k == "l" for k in self.kinds]
        ls = self.log_sigma
        coord_lp = -0.5 * ((values - mu) / ls.exp()) ** 2 - ls - 0.5 * math.log(2 * math.pi)
        out = []
        for t, lab in enumerate(is_label):
            if lab:
                xy = values[:, t - 2:t]
                logit = self._point_logit(feats, state, xy)
                out.append(torch.where(values[:, t] > 0.5, F.logsigmoid(logit), F.logsigmoid(-logit)))
            else:
                out.append(coord_lp[:, t])
        return torch.stack(out, 1)

    def act(self, feats: torch.Tensor, group: int = 1, greedy: bool = False) -> torch.Tensor:
        """Sampled (or greedy) action values (B * group, T), `group` samples per image of feats, no gradient."""
        n = feats.shape[0] * group
        with torch.no_grad():
            if self.kind == "tokens":
                return self.values(self.run_tokens(feats, n, None, greedy)[0])
            mu, state = self.gaussian_params(feats, n)
            is_label = torch.tensor([k == "l" for k in self.kinds], device=feats.device)
            coords = mu if greedy else mu + self.log_sigma.exp() * torch.randn_like(mu)
            vals = torch.where(is_label, torch.zeros_like(coords), coords)
            labels = []
            for t, k in enumerate(self.kinds):
                if k == "l":
                    p = torch.sigmoid(self._point_logit(feats, state, vals[:, t - 2:t]))
                    labels.append((p > 0.5).float() if greedy else torch.bernoulli(p))
                    vals = vals.clone()
                    vals[:, t] = labels[-1]
            return vals

    def log_prob(self, feats: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Per-token log pi (N, T) of the action values (N = B * G rows, G per image of feats), with gradient."""
        n = values.shape[0]
        if self.kind == "tokens":
            is_label = torch.tensor([k == "l" for k in self.kinds], device=values.device)
            tokens = torch.where(is_label, values.round(), (values * self.bins - 0.5).round().clamp(0, self.bins - 1)).long()
            return self.run_tokens(feats, n, tokens)[1]
        mu, state = self.gaussian_params(feats, n)
        return self.gaussian_logp(feats, values, mu, state)
