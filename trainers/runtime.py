"""Where a rank runs: the Runtime says how to place the model and the data, how to sum over ranks and how
to report. `Runtime` is one plain process (trainers.loop.fit); `RayTrainRuntime` a Ray Train worker."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from trainers.checkpoint import write_checkpoint


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
        """DDP (broadcast_buffers on): before each forward every buffer takes rank 0's value. Per buffer, why that
        is right: BatchNorm running statistics (encoder, decoder, policy, modulation, aux head) see only local
        batches, and rank 0's are the ones evaluated and checkpointed (with model.sync_bn the batch statistics are
        global anyway); pi_old's BatchNorm buffers are never used to normalise (it runs on batch statistics, its
        running stats only follow the EMA rule), and its parameters, an EMA of identical all-reduced parameters,
        are not buffers; the reward baseline b and its flag are the same on every rank by construction (the
        baseline's mean reward is all-reduced, trainers.rl.advantage.global_mean), so the broadcast changes
        nothing; frozen reference policies and constant buffers (clip_rl's action values) are equal on every rank.
        """
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
