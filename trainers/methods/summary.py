"""A row's model built without weights or data, for `rlseg-sweep --dry-run`: the architecture its config names,
its parameter counts, and any error building it raises (a wrong width, a decoder that does not fit its encoder).

The model is built on PyTorch's meta device (shapes, no storage: ViT-L's 304M parameters cost nothing; a library that
moves its model to a device refuses, and is built in memory instead: open_clip) with `model.pretrained` unset, so no checkpoint is read and nothing is downloaded; weight files are checked separately
(orchestrator.preflight.check_pretrained).
"""
from __future__ import annotations

import torch

from trainers.config import Config
from trainers.registry import METHODS


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def model_summary(config: dict, num_classes: int, ignore_index: int = 255) -> str:
    """'mit_b1+segformer_head 13.7M; latent_rl 15.9M (15.9M trained)': the segmentor's parameters, then the whole
    method's (policy, EMA copies, reference models) and how many of them the optimizer trains."""
    tree = {**config, "model": {**config["model"], "pretrained": None}}
    cfg = Config.model_validate(tree)
    cls = METHODS.get(cfg.method.name).build
    arch = f"{cfg.model.encoder}+{cfg.model.decoder}"
    if cls.BUILT_FROM_FILES:
        return f"{arch}: built when a trial starts ({cls.BUILT_FROM_FILES})"
    try:
        with torch.device("meta"):
            method = cls(cfg, num_classes, ignore_index)
    except NotImplementedError:     # a builder that moves its module (open_clip's .to(device)): build it for real
        method = cls(cfg, num_classes, ignore_index)
    segmentor = sum(p.numel() for p in method.segmentor.parameters())
    total = sum(p.numel() for p in method.parameters())
    trained = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return f"{arch} {_millions(segmentor)}; {cfg.method.name} {_millions(total)} ({_millions(trained)} trained)"
