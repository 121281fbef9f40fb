"""Training methods by name. A method is an nn.Module the loop drives:

    out = method(images, masks)      # train step: dict of scalar tensors, out["loss"] is minimised
    logits = method.predict(images)  # evaluation
    method.on_epoch_start(epoch, epochs); method.after_optimizer_step()

Each method registers its config class (a `MethodConfig` subclass) with it, so `method.<key>` in a
spec is validated by the method that reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainers.registry import METHODS


@dataclass(frozen=True)
class MethodEntry:
    config: type
    build: type


def register_method(name: str, config: type):
    def add(cls):
        METHODS.register(name, MethodEntry(config=config, build=cls))
        return cls
    return add


def build_method(cfg, num_classes: int, ignore_index: int):
    """cfg: the whole Config (methods build their own segmentor from cfg.model)."""
    return METHODS.get(cfg.method.name).build(cfg, num_classes, ignore_index)


from trainers.methods import clip_rl, latent_rl, supervised  # noqa: E402,F401  (registers)
from trainers.methods import promptable_pretrain, seg_r1  # noqa: E402,F401  (registers)
