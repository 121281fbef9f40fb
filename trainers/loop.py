"""The per-worker train loop.

    fit(config, report)      plain Python, no Ray (unit tests, `python -m trainers.loop cfg.yaml k=v`)
    train_worker(config)     the Ray Train worker function; the only code in trainers/ that touches ray.train

Both run `_train` with a Runtime that says how to place the model and the data and how to report.
Data order is a function of (seed, epoch) (DistributedSampler with set_epoch), so a run resumed from
an epoch checkpoint sees the same batches as one never interrupted.

Checkpoint files and rank records: trainers.checkpoint; the Runtimes: trainers.runtime; validation:
trainers.evaluation; optimizer and LR schedule: trainers.optim (their names are re-exported here).

`debug.fault` (trainers.config.FaultConfig) injects a failure for fault-tolerance tests: it is checked
with one int comparison per step and fires only in an attempt that started without a checkpoint.
"""
from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from trainers.checkpoint import (CHECKPOINT_FILE, DIVERGED, DIVERGED_FILE, LIST_INDICES_UP_TO,  # noqa: F401
                                 RANK_RECORD, RANKS_DIR, RNG_DIR, TrainingDiverged, indices_record,
                                 rank_record, read_checkpoint, rng_state, set_rng_state, tensors_sha256,
                                 write_checkpoint)
from trainers.config import Config
from trainers.data import build_dataset
from trainers.accel import Accel, loader_kwargs, prepare_model
from trainers.evaluation import ShardSampler, build_eval_sets, build_val_loader, evaluate, evaluate_sets  # noqa: F401
from trainers.grad_share import grad_share
from trainers.methods import build_method
from trainers.methods.base import RL_TERM
from trainers.optim import build_lr_schedule, build_optimizer  # noqa: F401
from trainers.runtime import RayTrainRuntime, Runtime  # noqa: F401

Report = Callable[[dict[str, float], dict[str, Any]], None]


class InjectedFaultError(RuntimeError):
    """debug.fault.kind = raise: the failure a test asked for."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(config: Config | dict, report: Report | None = None, *, state: dict | None = None) -> dict[str, float]:
    """Train `config` in this process; `report(metrics, state)` is called once per epoch.
    `state`: a checkpoint dict from an earlier report, to resume after its epoch. Returns the last metrics."""
    cfg = config if isinstance(config, Config) else Config.model_validate(config)
    use_cuda = cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available()
    rt = Runtime(device=torch.device("cuda" if use_cuda else "cpu"))
    return _train(cfg, rt, report or (lambda metrics, state: None), state)


def train_worker(config: dict) -> None:
    """Ray Train entry point (TorchTrainer(train_loop_per_worker=train_worker)); resumes from Ray's checkpoint."""
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config)
    ctx = ray.train.get_context()
    rt = RayTrainRuntime(device=ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                         world_size=ctx.get_world_size(), node_id=ray.get_runtime_context().get_node_id())
    try:
        state = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = read_checkpoint(d, rt.rank)   # a restored run that had diverged: TrainingDiverged again
        _train(cfg, rt, rt.report, state)
    except TrainingDiverged as e:
        # Ray Train restarts the workers from the latest checkpoint after any worker error, and resuming is exact:
        # a diverged run would diverge again, max_failures times. Every rank gets here in the same epoch (the
        # epoch's loss is all-reduced), so each reports the reason instead and ends normally; the trial raises
        # it (orchestrator.trial). The report carries a checkpoint because Ray Train's Result.metrics are those
        # of the latest checkpointed report.
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, DIVERGED_FILE), "w") as f:
                f.write(str(e))
            ray.train.report({DIVERGED: str(e)}, checkpoint=ray.train.Checkpoint.from_directory(d))


def _train(cfg: Config, rt: Runtime, report: Report, state: dict | None) -> dict[str, float]:
    if cfg.continual.task is not None:     # one trial = one continual task sequence (paper 002 Table 3)
        from trainers.continual.loop import train_continual
        return train_continual(cfg, rt, report, state)
    seed_everything(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    model = build_method(cfg, train_set.num_classes, train_set.ignore_index).to(rt.device)
    model = prepare_model(model, cfg, rt.world_size, rt.device)    # SyncBN, channels_last, fp32 islands (accel)
    accel = Accel.from_config(cfg.schedule, rt.device)

    bs = cfg.schedule.batch_size
    sampler = DistributedSampler(train_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(train_set, batch_size=bs, sampler=sampler, drop_last=True,
                              **loader_kwargs(cfg.data, rt.device))
    val_loader = build_val_loader(val_set, cfg, rt)
    eval_sets = build_eval_sets(cfg, train_set.classes, train_set.ignore_index, rt)   # eval.datasets: other domains
    if len(train_loader) == 0:
        raise ValueError(f"schedule.batch_size {bs} is larger than a rank's share of data.train_size")
    optimizer = build_optimizer(cfg.schedule, model)
    lr_schedule = build_lr_schedule(cfg.schedule, optimizer, cfg.schedule.epochs * len(train_loader))

    start_epoch = 0
    if state is not None:
        model.load_checkpoint_state(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        set_rng_state(state["rng"], rt.device)
        accel.load_state_dict(state.get("grad_scaler"))
        start_epoch = state["epoch"]
    fault = cfg.debug.fault
    # debug.fault fires only in an attempt that started without a checkpoint (FaultConfig)
    fault_armed = fault.kind != "none" and state is None and rt.rank == fault.rank
    if fault_armed and fault.step >= len(train_loader):
        raise ValueError(f"debug.fault.step: {fault.step} but an epoch has only {len(train_loader)} steps")

    ddp_model = rt.prepare_model(model)
    train_loader, val_loader = rt.prepare_loader(train_loader), rt.prepare_loader(val_loader)
    class_names = list(train_set.classes)
    metrics: dict[str, float] = {}
    drawn: dict[int, list[int]] = {}     # epoch -> the train indices this rank's loader yields (drop_last)
    for epoch in range(start_epoch, cfg.schedule.epochs):
        sampler.set_epoch(epoch)
        drawn[epoch + 1] = list(sampler)[:len(train_loader) * bs]   # own generator: global RNG untouched
        model.on_epoch_start(epoch, cfg.schedule.epochs)
        metrics = {"epoch": epoch + 1}
        fault_step = fault.step if fault_armed and epoch + 1 == fault.epoch else -1
        metrics.update(train_one_epoch(ddp_model, model, train_loader, optimizer, lr_schedule, cfg, rt, fault_step,
                                       accel))
        if not math.isfinite(metrics["train/loss"]):
            raise TrainingDiverged(f"training loss became {metrics['train/loss']} in epoch {epoch + 1}")
        if (epoch + 1) % cfg.schedule.eval_every == 0 or epoch + 1 == cfg.schedule.epochs:
            metrics.update(evaluate(model, val_loader, class_names, rt, cfg.eval, accel))
            metrics.update(evaluate_sets(model, eval_sets, class_names, rt, cfg.eval, accel))
        state = {"epoch": epoch + 1, "model": model.checkpoint_state(), "optimizer": optimizer.state_dict(),
                 "lr_schedule": lr_schedule.state_dict(), "rng": rng_state(rt.device),
                 "grad_scaler": accel.state_dict()}
        if epoch + 1 == cfg.schedule.epochs:
            state[RANK_RECORD] = rank_record(rt, model, drawn, start_epoch)
        report(metrics, state)
    return metrics


def train_one_epoch(ddp_model, model, loader, optimizer, lr_schedule, cfg: Config, rt: Runtime,
                    fault_step: int = -1, accel: Accel | None = None) -> dict[str, float]:
    """One pass over this rank's shard. Sums stay on the device; one all-reduce and one sync at the end.
    fault_step: the step (0-based) at which debug.fault strikes in this epoch on this rank, -1 for none.
    accel: precision and memory format (trainers.accel; default fp32, NCHW).
    After the timed steps, rl/grad_share and its norms (trainers.grad_share) on the epoch's first batch, this rank's
    own (rank 0's reach the report); they change nothing the steps or the next epoch see."""
    accel = accel or Accel(device=rt.device)
    ddp_model.train()
    sums: dict[str, torch.Tensor] = {}
    n_batches = n_images = 0
    first = None
    t0 = time.perf_counter()
    for step, (images, masks) in enumerate(loader):
        images = accel.inputs(images)
        masks = masks.to(rt.device, non_blocking=True)
        if first is None:
            first = (images, masks)
        with accel.autocast():
            out = ddp_model(images, masks)
        if step == fault_step:
            out["loss"] = inject_fault(cfg.debug.fault, rt, out["loss"])
        optimizer.zero_grad(set_to_none=True)
        accel.backward(out["loss"], optimizer)      # fp16: scaled backward, then unscaled gradients
        out.update(model.grad_stats())              # gradient diagnostics, e.g. rl/policy_grad_norm
        if cfg.schedule.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.schedule.grad_clip)
        accel.step(optimizer)
        lr_schedule.step()
        model.after_optimizer_step()
        for k, v in out.items():
            if not k.startswith(RL_TERM):      # the RL terms with their graph, for grad_share; train/loss_* log them
                sums[k] = sums[k] + v.detach() if k in sums else v.detach().float()
        n_batches += 1
        n_images += images.shape[0]
    keys = sorted(sums)
    totals = rt.all_reduce_sum(torch.stack([sums[k] for k in keys] + [
        torch.tensor(float(n_batches), device=rt.device), torch.tensor(float(n_images), device=rt.device)]))
    totals = totals.tolist()
    elapsed = time.perf_counter() - t0
    batches, images_seen = totals[-2], totals[-1]
    # step outputs are train/<name>; a name that has its own namespace (rl/clipfrac) keeps it
    out = {(k if "/" in k else f"train/{k}"): v / batches for k, v in zip(keys, totals)}
    out["train/images_per_s"] = images_seen / elapsed
    out["train/lr"] = optimizer.param_groups[0]["lr"]
    out["time/epoch_s"] = elapsed
    out.update(grad_share(model, *first, accel.autocast, rt.device))     # outside the timed steps
    return out


def inject_fault(fault, rt: Runtime, loss: torch.Tensor) -> torch.Tensor:
    """debug.fault strikes: raise, end the process, or return a NaN loss (TrainingDiverged at the epoch end)."""
    where = f"epoch {fault.epoch} step {fault.step} on rank {rt.rank}"
    if fault.kind == "raise":
        raise InjectedFaultError(f"debug.fault: injected failure in {where}")
    if fault.kind == "exit":
        print(f"debug.fault: ending the worker process in {where}", file=sys.stderr, flush=True)
        rt.exit_process()
    return loss * float("nan")


def main(argv: list[str] | None = None) -> int:
    """python -m trainers.loop [CONFIG.yaml] [key=value ...]: one training run, no Ray, metrics to stdout."""
    import yaml

    from trainers.overrides import apply_overrides, parse_assignments

    args = sys.argv[1:] if argv is None else argv
    tree: dict = {}
    if args and not ("=" in args[0]):
        with open(args[0]) as f:
            tree = yaml.safe_load(f) or {}
        args = args[1:]
    apply_overrides(tree, parse_assignments(args))

    def show(metrics, state):
        print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/IoU/" not in k), flush=True)

    fit(Config.model_validate(tree), show)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
