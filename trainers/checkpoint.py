"""Epoch checkpoints and the evidence each rank leaves in them.

A checkpoint folder holds `state.pt` (rank 0's resumable state: epoch, model state with its buffers
(BatchNorm stats, the EMA old policy, the reward baseline b), optimizer, LR schedule, RNG state),
`rng/rank<r>.pt` (the RNG state of every other rank) and, from the final epoch,
`ranks/rank<r>.json` from every rank (rank_record): which node it ran on, the train indices it drew
and digests of its final weights, so a multi-worker run can show its ranks trained on disjoint shards
and ended with identical parameters. RNG state = python `random`, numpy's global, torch's CPU generator
and the current CUDA device's; no other generator exists (DistributedSampler seeds its own from
(seed, epoch); a reward control's, method.reward.control, is reseeded every step from the step count it keeps in the
model state), so a resumed epoch draws what the uninterrupted one drew.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "state.pt"
RANKS_DIR = "ranks"               # ranks/rank<r>.json in the final epoch's checkpoint
RANK_RECORD = "rank_record"       # the key of the final epoch's state that carries this rank's record
RNG_DIR = "rng"                   # rng/rank<r>.pt: ranks other than 0 (rank 0's is in state.pt)
LIST_INDICES_UP_TO = 4096         # per epoch; larger shards keep only count + sha256

DIVERGED = "diverged"   # the metric of the last report of a Ray Train run that diverged (train_worker)
DIVERGED_FILE = "diverged.txt"    # the reason, in that report's checkpoint (in place of state.pt)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


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


def rank_record(rt, model: torch.nn.Module, drawn: dict[int, list[int]], start_epoch: int) -> dict[str, Any]:
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


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator this rank draws from. CUDA: only this rank's device (a restarted worker may be given
    another GPU, or see a different number of them)."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and isinstance(st.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(st["cuda"], device)
