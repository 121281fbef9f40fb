"""rl/grad_share: does the RL objective reach the segmentor's own weights at all? (a diagnostic, never a target)

    rl/grad_share = ||grad_theta L_RL|| / ||grad_theta L_seg||,  theta = SegMethod.segmentor_parameters()
                    (every trainable parameter outside the method's POLICY_MODULES)

L_RL is the sum of the RL terms a method's forward puts into out["loss"], each also under an RL_TERM key
(trainers.methods.base), weights included: latent_rl lambda_Policy L_Policy, lambda_KL L_KL (+ beta_ref k3); clip_rl
(1 - f) lambda_RL L_RL (+ (1 - f) beta_ref k3). L_seg = out["loss"] - L_RL: everything else (L_seg itself, the aux
head, a curriculum's weights). Per term `rl/grad_norm_<name>_term`; `rl/grad_norm_rl`, `rl/grad_norm_seg`. No share
when L_seg has no gradient on theta (latent_rl rl_only: the norms only); no metrics at all in a step whose loss has
no RL term (sft_then_rl's SFT phase, clip_rl at f = 1) or for a method without a policy (supervised; seg_r1, whose
segmenter is frozen).

trainers.loop measures it once per epoch, after the epoch's timed steps, on the epoch's first batch: one forward in
train mode (as the steps ran it) and one torch.autograd.grad per loss, which fills no .grad and steps no optimizer.
What a train-mode forward changes is put back exactly (`unchanged_state`: every buffer - BatchNorm running
statistics, the EMA baseline -, every module's extra state - the reward control's step count - and this rank's RNG
streams), so a trial's other metrics are bitwise those of a run without the measurement.
DDP: each rank measures on its own local batch with the unwrapped module (no DDP gradient hooks or gradient
all-reduce); the forward's own collectives (the baseline's global reward mean, SyncBatchNorm's batch statistics) run
on every rank in step, as in a training step. The epoch's report carries rank 0's figures.
Mixed precision: the forward runs under the training step's autocast (bf16 / fp16); the gradients are taken without
the fp16 GradScaler's loss scale (small fp16 gradients may underflow there; bf16 has the range of fp32).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from trainers.checkpoint import rng_state, set_rng_state
from trainers.methods.base import RL_TERM


@contextlib.contextmanager
def unchanged_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Puts back on exit what a forward in train mode changes: every buffer (BatchNorm running statistics and
    num_batches_tracked, the EMA baseline b and its flag), every module's extra state (RewardControl's step count)
    and this rank's RNG streams (python, numpy, torch, CUDA)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    extra = {m: copy.deepcopy(m.get_extra_state()) for m in model.modules()
             if type(m).get_extra_state is not nn.Module.get_extra_state}
    rng = rng_state(device)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for m, state in extra.items():
            m.set_extra_state(state)
        set_rng_state(rng, device)


def _norm(grads: list[torch.Tensor | None]) -> float:
    grads = [g for g in grads if g is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def grad_share(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, autocast=contextlib.nullcontext,
               device: torch.device | None = None) -> dict[str, float]:
    """{rl/grad_share, rl/grad_norm_seg, rl/grad_norm_rl, rl/grad_norm_<term>_term} of `model` (the unwrapped
    SegMethod, in train mode) on one batch, images (B, 3, H, W) and masks (B, H, W) on its device; {} for a method or
    a step without RL terms. `autocast`: the training step's autocast context factory. Leaves the model's state,
    its .grad and the RNG streams as they were."""
    params = model.segmentor_parameters()
    if not params:
        return {}
    device = device or images.device
    with unchanged_state(model, device):
        with autocast():
            out = model(images, masks)
        terms = {k[len(RL_TERM):]: v for k, v in out.items() if k.startswith(RL_TERM)}
        if not terms:
            return {}
        rl = sum(terms.values())
        losses = {"seg": out["loss"] - rl, **terms}      # autograd is linear: the RL paths of L_seg's get exactly 0
        norms: dict[str, float] = {}
        grad_rl: list[torch.Tensor | None] = [None] * len(params)      # the sum of the terms' gradients
        for i, (name, loss) in enumerate(losses.items()):
            grads = (torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
                     if loss.requires_grad else [None] * len(params))
            norms[name] = _norm(grads)
            if name != "seg":
                grad_rl = [a if b is None else b if a is None else a + b for a, b in zip(grad_rl, grads)]
    norm_rl = _norm(grad_rl)
    metrics = {"rl/grad_share": norm_rl / norms["seg"]} if norms["seg"] > 0 else {}
    metrics.update({"rl/grad_norm_seg": norms["seg"], "rl/grad_norm_rl": norm_rl})
    metrics.update({f"rl/grad_norm_{name}_term": norms[name] for name in terms})
    return metrics
