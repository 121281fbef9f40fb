"""The frozen reference policy of a KL penalty (Seg-R1 / TRL GRPO: k3 to pi_ref, beta 0.04).

    init            a copy of the policy as initialised (the policy before RL, when RL starts from scratch)
    sft_checkpoint  the policy of a checkpoint file (an SFT run's state.pt, or a plain state_dict)
    ema             an exponential moving average of the policy (the caller updates it with ema_update)

`init` and `sft_checkpoint` copies are rebuilt from the config (the seed fixes the initial weights) and so are
marked `frozen`: method checkpoints leave them out. An `ema` copy changes with training and is checkpointed.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn


def frozen_copy(policy: nn.Module) -> nn.Module:
    """A copy of `policy` that is never trained. BatchNorm layers keep normalising with batch statistics (as the
    policy does in training), and their running statistics no longer move."""
    ref = copy.deepcopy(policy).requires_grad_(False)
    for mod in ref.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = 0.0
    return ref


def load_policy_state(path: str, prefix: str, key: str) -> dict[str, torch.Tensor]:
    """The tensors of one policy from a checkpoint file: an rlseg state.pt (its "model" entry, keys under
    `prefix`, e.g. "policy."), or a plain state_dict of the policy. `key` names the config key in errors."""
    if not os.path.isfile(path):
        raise ValueError(f"{key}: no checkpoint file at {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{key}: {path!r} holds no state_dict")
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return own or state


def reference_policy(policy: nn.Module, kind: str, checkpoint: str | None = None, prefix: str = "policy.",
                     key: str = "method.loss.reference_checkpoint") -> nn.Module | None:
    """The reference for `kind` (none | init | ema | sft_checkpoint); None for none."""
    if kind == "none":
        return None
    ref = frozen_copy(policy)
    if kind == "sft_checkpoint":
        if not checkpoint:
            raise ValueError(f"{key}: kl_reference sft_checkpoint needs a checkpoint path")
        try:
            ref.load_state_dict(load_policy_state(checkpoint, prefix, key))
        except RuntimeError as e:
            raise ValueError(f"{key}: {checkpoint!r} does not fit the policy: {str(e).splitlines()[0]}") from None
    if kind in ("init", "sft_checkpoint"):
        ref.frozen = True
    return ref
