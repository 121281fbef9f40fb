"""The per-worker train loop.

    fit(config, report)      plain Python, no Ray (unit tests, `python -m trainers.loop cfg.yaml k=v`)
    train_worker(config)     the Ray Train worker function; the only code in trainers/ that touches ray.train

Both run `_train` with a Runtime that says how to place the model and the data and how to report.
Data order is a function of (seed, epoch) (DistributedSampler with set_epoch), so a run resumed from
an epoch checkpoint sees the same batches as one never interrupted.

A checkpoint folder holds `state.pt` (rank 0's resumable state: epoch, model state with its buffers
(BatchNorm stats, the EMA old policy, the reward baseline b), optimizer, LR schedule, RNG state),
`rng/rank<r>.pt` (the RNG state of every other rank) and, from the final epoch,
`ranks/rank<r>.json` from every rank (rank_record): which node it ran on, the train indices it drew
and digests of its final weights, so a multi-worker run can show its ranks trained on disjoint shards
and ended with identical parameters. RNG state = python `random`, numpy's global, torch's CPU generator
and the current CUDA device's; no other generator exists (DistributedSampler seeds its own from
(seed, epoch)), so a resumed epoch draws what the uninterrupted one drew.

`debug.fault` (trainers.config.FaultConfig) injects a failure for fault-tolerance tests: it is checked
with one int comparison per step and fires only in an attempt that started without a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from trainers.config import Config
from trainers.data import build_dataset
from trainers.methods import build_method
from trainers.metrics import ConfusionMatrix

Report = Callable[[dict[str, float], dict[str, Any]], None]
CHECKPOINT_FILE = "state.pt"
RANKS_DIR = "ranks"               # ranks/rank<r>.json in the final epoch's checkpoint
RANK_RECORD = "rank_record"       # the key of the final epoch's state that carries this rank's record
RNG_DIR = "rng"                   # rng/rank<r>.pt: ranks other than 0 (rank 0's is in state.pt)
LIST_INDICES_UP_TO = 4096         # per epoch; larger shards keep only count + sha256


DIVERGED = "diverged"   # the metric of the last report of a Ray Train run that diverged (train_worker)
DIVERGED_FILE = "diverged.txt"    # the reason, in that report's checkpoint (in place of state.pt)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class InjectedFaultError(RuntimeError):
    """debug.fault.kind = raise: the failure a test asked for."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ShardSampler(Sampler[int]):
    """Evaluation shard: every rank-th index, no padding (confusion matrices are summed over ranks)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Runtime:
    """Single process, no Ray."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    node_id: str | None = None       # the Ray node this rank runs on

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def exit_process(self) -> None:
        """debug.fault.kind = exit: end this process at once, as a kill would (no cleanup, no exception)."""
        os._exit(1)


class RayTrainRuntime(Runtime):
    """A Ray Train worker: DDP via prepare_model, device placement via prepare_data_loader."""

    def prepare_model(self, model):
        import ray.train.torch
        # methods whose loss skips some parameters in some steps (RL-only phases) say so
        unused = getattr(model, "ddp_find_unused_parameters", False)
        return ray.train.torch.prepare_model(model, move_to_device=False,
                                             parallel_strategy_kwargs={"find_unused_parameters": unused})

    def prepare_loader(self, loader):
        import ray.train.torch
        # our own DistributedSampler (seeded, set_epoch each epoch) is already in place
        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    def all_reduce_sum(self, t):
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def report(self, metrics: dict[str, float], state: dict[str, Any]) -> None:
        """Train V2 copies every rank's checkpoint files into one folder (rank 0 names it), so rank 0
        writes state.pt, every other rank its rng/rank<r>.pt, and each rank its ranks/rank<r>.json in
        the final epoch."""
        import ray.train
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(d, state, self.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def exit_process(self) -> None:
        """A report sits in this worker's queue (size 1) until the controller's next poll takes it, and a
        worker that dies first loses it. The fault is meant to strike after the previous epoch's checkpoint
        (debug.fault), so wait until Ray Train has taken every report (a private queue: if Ray moves it,
        wait a few poll intervals instead), and a little longer for the poll's reply to leave."""
        interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
        try:
            from ray.train.v2._internal.execution.context import get_train_context
            queue = get_train_context().get_result_queue()
        except (ImportError, AttributeError):
            time.sleep(5 * interval)
        else:
            deadline = time.monotonic() + 60
            while not queue.empty() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(max(0.5, 2 * interval))
        os._exit(1)


def write_checkpoint(directory: str, state: dict[str, Any], rank: int) -> None:
    """One rank's files of an epoch checkpoint: state.pt from rank 0 (without the rank record, so it
    stays what resume reads), rng/rank<r>.pt from every other rank, ranks/rank<r>.json from every rank
    whose state carries a record."""
    record = state.get(RANK_RECORD)
    if rank == 0:
        torch.save({k: v for k, v in state.items() if k != RANK_RECORD}, os.path.join(directory, CHECKPOINT_FILE))
    else:
        os.makedirs(os.path.join(directory, RNG_DIR), exist_ok=True)
        torch.save(state["rng"], os.path.join(directory, RNG_DIR, f"rank{rank}.pt"))
    if record is not None:
        os.makedirs(os.path.join(directory, RANKS_DIR), exist_ok=True)
        with open(os.path.join(directory, RANKS_DIR, f"rank{rank}.json"), "w") as f:
            json.dump(record, f, indent=1)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor in sorted name order: equal digests
    mean bit-identical tensors, whatever device they live on."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def indices_record(indices: list[int]) -> dict[str, Any]:
    """The train sample indices one rank drew in one epoch: count, sha256 of the sorted list, the list if small."""
    ordered = sorted(indices)
    out: dict[str, Any] = {"count": len(ordered),
                           "sha256": hashlib.sha256(json.dumps(ordered).encode()).hexdigest()}
    if len(ordered) <= LIST_INDICES_UP_TO:
        out["indices"] = ordered
    return out


def rank_record(rt: Runtime, model: torch.nn.Module, drawn: dict[int, list[int]], start_epoch: int) -> dict[str, Any]:
    """Evidence of what this rank did. `params_sha256` is equal on every rank after DDP (gradients are
    all-reduced); `state_sha256` adds buffers, which may differ (BatchNorm running stats see local batches)."""
    return {
        "world_rank": rt.rank, "world_size": rt.world_size, "node_id": rt.node_id,
        "hostname": socket.gethostname(), "pid": os.getpid(), "device": str(rt.device),
        "resumed_from_epoch": start_epoch,
        "train_indices": {str(epoch): indices_record(ix) for epoch, ix in drawn.items()},  # epoch (1-based) ->
        "params_sha256": tensors_sha256(dict(model.named_parameters())),
        "state_sha256": tensors_sha256(model.state_dict()),
    }


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


def read_checkpoint(directory: str, rank: int = 0) -> dict[str, Any]:
    """The state a rank resumes from: state.pt, with this rank's own RNG state where the folder has one. The
    checkpoint of a run that diverged (train_worker) raises TrainingDiverged again."""
    if os.path.isfile(os.path.join(directory, DIVERGED_FILE)):
        with open(os.path.join(directory, DIVERGED_FILE)) as f:
            raise TrainingDiverged(f.read())
    state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
    own_rng = os.path.join(directory, RNG_DIR, f"rank{rank}.pt")
    if rank != 0 and os.path.isfile(own_rng):
        state["rng"] = torch.load(own_rng, map_location="cpu", weights_only=False)
    return state


def _train(cfg: Config, rt: Runtime, report: Report, state: dict | None) -> dict[str, float]:
    seed_everything(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    model = build_method(cfg, train_set.num_classes, train_set.ignore_index).to(rt.device)

    bs = cfg.schedule.batch_size
    sampler = DistributedSampler(train_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed)
    pin = rt.device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=bs, sampler=sampler, drop_last=True,
                              num_workers=cfg.data.num_workers, pin_memory=pin)
    val_loader = DataLoader(val_set, batch_size=bs, sampler=ShardSampler(len(val_set), rt.rank, rt.world_size),
                            num_workers=cfg.data.num_workers, pin_memory=pin)
    if len(train_loader) == 0:
        raise ValueError(f"schedule.batch_size {bs} is larger than a rank's share of data.train_size")
    optimizer = build_optimizer(cfg.schedule, model)
    lr_schedule = build_lr_schedule(cfg.schedule, optimizer, cfg.schedule.epochs * len(train_loader))

    start_epoch = 0
    if state is not None:
        model.load_checkpoint_state(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        _set_rng_state(state["rng"], rt.device)
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
        metrics.update(train_one_epoch(ddp_model, model, train_loader, optimizer, lr_schedule, cfg, rt, fault_step))
        if not math.isfinite(metrics["train/loss"]):
            raise TrainingDiverged(f"training loss became {metrics['train/loss']} in epoch {epoch + 1}")
        if (epoch + 1) % cfg.schedule.eval_every == 0 or epoch + 1 == cfg.schedule.epochs:
            metrics.update(evaluate(model, val_loader, class_names, rt))
        state = {"epoch": epoch + 1, "model": model.checkpoint_state(), "optimizer": optimizer.state_dict(),
                 "lr_schedule": lr_schedule.state_dict(), "rng": _rng_state(rt.device)}
        if epoch + 1 == cfg.schedule.epochs:
            state[RANK_RECORD] = rank_record(rt, model, drawn, start_epoch)
        report(metrics, state)
    return metrics


def train_one_epoch(ddp_model, model, loader, optimizer, lr_schedule, cfg: Config, rt: Runtime,
                    fault_step: int = -1) -> dict[str, float]:
    """One pass over this rank's shard. Sums stay on the device; one all-reduce and one sync at the end.
    fault_step: the step (0-based) at which debug.fault strikes in this epoch on this rank, -1 for none."""
    ddp_model.train()
    sums: dict[str, torch.Tensor] = {}
    n_batches = n_images = 0
    t0 = time.perf_counter()
    for step, (images, masks) in enumerate(loader):
        images = images.to(rt.device, non_blocking=True)
        masks = masks.to(rt.device, non_blocking=True)
        out = ddp_model(images, masks)
        if step == fault_step:
            out["loss"] = inject_fault(cfg.debug.fault, rt, out["loss"])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.schedule.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.schedule.grad_clip)
        optimizer.step()
        lr_schedule.step()
        model.after_optimizer_step()
        for k, v in out.items():
            sums[k] = sums[k] + v.detach() if k in sums else v.detach().float()
        n_batches += 1
        n_images += images.shape[0]
    keys = sorted(sums)
    totals = rt.all_reduce_sum(torch.stack([sums[k] for k in keys] + [
        torch.tensor(float(n_batches), device=rt.device), torch.tensor(float(n_images), device=rt.device)]))
    totals = totals.tolist()
    elapsed = time.perf_counter() - t0
    batches, images_seen = totals[-2], totals[-1]
    out = {f"train/{k}": v / batches for k, v in zip(keys, totals)}
    out["train/images_per_s"] = images_seen / elapsed
    out["train/lr"] = optimizer.param_groups[0]["lr"]
    out["time/epoch_s"] = elapsed
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


@torch.no_grad()
def evaluate(model, loader, class_names: list[str], rt: Runtime) -> dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU (percent) over the whole validation set (all ranks)."""
    model.eval()
    cm = ConfusionMatrix(len(class_names), model.ignore_index, device=rt.device)
    for images, masks in loader:
        logits = model.predict(images.to(rt.device, non_blocking=True))
        cm.update(logits.max(1).indices, masks.to(rt.device, non_blocking=True))
    rt.all_reduce_sum(cm.mat)
    iou = cm.iou().tolist()
    out = {"val/mIoU": 100 * cm.miou(), "val/pixel_acc": 100 * cm.pixel_acc()}
    out.update({f"val/IoU/{name}": 100 * v for name, v in zip(class_names, iou)})
    return out


def build_optimizer(sched, model: torch.nn.Module) -> torch.optim.Optimizer:
    """One parameter group per learning-rate scale the method asks for (SegMethod.lr_scales)."""
    groups = [{"params": params, "lr": sched.lr * scale} for params, scale in model.param_groups() if params]
    if sched.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=sched.lr, momentum=sched.momentum, weight_decay=sched.weight_decay)
    cls = torch.optim.AdamW if sched.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=sched.lr, weight_decay=sched.weight_decay)


def build_lr_schedule(sched, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step factor: constant; poly (1 - t/T)^p (mmseg/SSSegmentation); cosine to 0."""
    def factor(step: int) -> float:
        t = min(step / max(total_steps, 1), 1.0)
        if sched.lr_schedule == "poly":
            return (1 - t) ** sched.poly_power
        if sched.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator this rank draws from. CUDA: only this rank's device (a restarted worker may be given
    another GPU, or see a different number of them)."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and isinstance(st.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(st["cuda"], device)


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
