"""The frozen segmenter's checkpoint for seg_r1, without user steps.

`method.segmenter.checkpoint` set: that file. Unset (the embedded default): the checkpoint of the pretraining run
`method.pretrain.preset` (trainers/presets/promptable_pretrain.yaml) with the RL run's data and segmenter shape,
trained on first use into

    <cache_dir>/promptable/<sha256 of the resolved pretraining config, 16 hex>/segmenter.pt

cache_dir: method.pretrain.cache_dir, else $RLSEG_CACHE_DIR, else ~/.cache/rlseg. An exclusive file lock (fcntl)
on `<hash>.lock` makes concurrent trials (Ray workers, other sweeps) train it once: the first trains, the others
wait, then load. The pretraining runs in-process with its own fixed seed; the caller's RNG state (torch, numpy,
random) and thread count are restored afterwards, so a trial that trained the segmenter and one that loaded it draw
the same numbers. The same config always yields the same file name; a changed preset yields a new one.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import yaml


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("RLSEG_CACHE_DIR") or Path.home() / ".cache" / "rlseg").expanduser()


def pretrain_config(method_cfg, data_cfg) -> dict:
    """The resolved pretraining config tree: the preset, with the RL run's data and segmenter shape."""
    from trainers.config import Config

    name = method_cfg.pretrain.preset
    text = resources.files("trainers.presets").joinpath(f"{name}.yaml")
    if not text.is_file():
        raise ValueError(f"method.pretrain.preset: no preset {name!r} in trainers/presets")
    tree = yaml.safe_load(text.read_text()) or {}
    tree["data"] = {**tree.get("data", {}), "name": data_cfg.name, "image_size": data_cfg.image_size,
                    "train_size": data_cfg.train_size, "val_size": data_cfg.val_size, "seed": data_cfg.seed,
                    "root": data_cfg.root}
    tree["method"]["segmenter"] = method_cfg.segmenter.model_dump(exclude={"checkpoint"})
    tree["seed"] = method_cfg.pretrain.seed
    tree["resources"] = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    return Config.model_validate(tree).model_dump(mode="json")


def config_hash(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def segmenter_checkpoint(method_cfg, data_cfg) -> str:
    """Path of the frozen segmenter's weights (a state_dict of the segmenter), training them on first use."""
    seg = method_cfg.segmenter
    if seg.checkpoint:
        if not os.path.isfile(seg.checkpoint):
            raise ValueError(f"method.segmenter.checkpoint: no file at {seg.checkpoint!r}")
        return seg.checkpoint
    if seg.name != "promptable_tiny":
        raise ValueError(f"method.segmenter.checkpoint: {seg.name} needs a local checkpoint file")
    tree = pretrain_config(method_cfg, data_cfg)
    folder = cache_root(method_cfg.pretrain.cache_dir) / "promptable" / config_hash(tree)
    path = folder / "segmenter.pt"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # held until the file is written; others wait, then find it
        if not path.is_file():
            _train(tree, path)
    return str(path)


def _train(tree: dict, path: Path) -> None:
    from trainers.loop import fit

    print(f"seg_r1: training the promptable segmenter once into {path} (python -m trainers.loop "
          f"trainers/presets/promptable_pretrain.yaml)", file=sys.stderr, flush=True)
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_num_threads())
    final: dict = {}
    t0 = time.perf_counter()
    try:
        metrics = fit(tree, lambda m, state: final.update(state=state))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        torch.set_num_threads(saved[3])
    weights = {k.removeprefix("segmenter."): v for k, v in final["state"]["model"].items()
               if k.startswith("segmenter.")}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(weights, tmp)
    os.replace(tmp, path)                          # atomic: a reader never sees half a file
    info = {"config": tree, "metrics": metrics, "train_s": time.perf_counter() - t0}
    path.with_name("pretrain.json").write_text(json.dumps(info, indent=1, default=float))
