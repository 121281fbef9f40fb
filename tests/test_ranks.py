"""Metrics merged across ranks: two real torch.distributed (gloo) processes on 127.0.0.1 run trainers.loop's own
evaluate / train_one_epoch with the runtime Ray Train workers use (RayTrainRuntime.all_reduce_sum); a 2-rank
evaluation must equal the 1-rank one, and the reduced training metrics must be the mean over every batch of
every rank."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Subset

from conftest import tiny
from trainers.config import Config
from trainers.data import build_dataset
from trainers.loop import (RayTrainRuntime, Runtime, ShardSampler, build_lr_schedule, build_optimizer, evaluate,
                           fit, train_one_epoch)
from trainers.methods import build_method

VAL_SIZE = 15                  # odd: the shards are 8 and 7 images, with no padding
TRAIN_SHARDS = (range(0, 12), range(12, 16))   # 3 batches of 4 on rank 0, 1 on rank 1: the mean of the two
                                               # ranks' means differs from the mean over all 4 batches


def config() -> Config:
    return Config.model_validate(tiny(data={"val_size": VAL_SIZE}, schedule={"epochs": 1, "batch_size": 4}))


def model_from(cfg: Config, state: dict | None) -> torch.nn.Module:
    train_set = build_dataset(cfg.data, "train")
    model = build_method(cfg, train_set.num_classes, train_set.ignore_index)
    if state is not None:
        model.load_checkpoint_state(state)
    return model


def val_loader(cfg: Config, rank: int, world_size: int) -> DataLoader:
    val_set = build_dataset(cfg.data, "val")
    return DataLoader(val_set, batch_size=cfg.schedule.batch_size, sampler=ShardSampler(len(val_set), rank, world_size))


def rank_main(rank: int, port: int, out_dir: str, state: dict) -> None:
    """One rank: evaluate the trained model on its ShardSampler shard, then train one epoch on its own shard
    (no DDP wrapper: only the metric reduction is under test), recording each batch's outputs."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"      # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = config()
        rt = RayTrainRuntime(device=torch.device("cpu"), rank=rank, world_size=2)
        model = model_from(cfg, state)
        loader = val_loader(cfg, rank, 2)
        val = evaluate(model, loader, list(build_dataset(cfg.data, "val").classes), rt)

        torch.manual_seed(rank)
        train_set = build_dataset(cfg.data, "train")
        train = DataLoader(Subset(train_set, TRAIN_SHARDS[rank]), batch_size=cfg.schedule.batch_size)
        optimizer = build_optimizer(cfg.schedule, model)
        schedule = build_lr_schedule(cfg.schedule, optimizer, len(train))
        batches = []
        model.register_forward_hook(lambda m, i, o: batches.append({k: v.item() for k, v in o.items()}))
        metrics = train_one_epoch(model, model, train, optimizer, schedule, cfg, rt)
        torch.save({"val": val, "val_indices": list(loader.sampler), "train": metrics, "batches": batches},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A model trained for an epoch (so its predictions vary), and what each of two gloo ranks made of it."""
    states = []
    fit(config(), lambda m, s: states.append(s["model"]))
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_main, args=(free_port(), str(out), states[-1]), nprocs=2, join=True)
    return states[-1], [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_two_rank_evaluation_equals_one_rank(two_ranks):
    state, ranks = two_ranks
    cfg = config()
    a, b = (set(r["val_indices"]) for r in ranks)        # ShardSampler: disjoint shards that cover the set once
    assert len(a) + len(b) == VAL_SIZE and not a & b and a | b == set(range(VAL_SIZE))
    single = evaluate(model_from(cfg, state), val_loader(cfg, 0, 1), list(build_dataset(cfg.data, "val").classes),
                      Runtime(device=torch.device("cpu")))
    assert ranks[0]["val"] == ranks[1]["val"]
    assert ranks[0]["val"] == pytest.approx(single, abs=1e-9)
    # the shards alone give other numbers: the all-reduce is what makes them equal
    alone = evaluate(model_from(cfg, state), val_loader(cfg, 0, 2), list(build_dataset(cfg.data, "val").classes),
                     Runtime(device=torch.device("cpu")))
    assert alone != pytest.approx(single, abs=1e-9)


def test_training_metrics_are_the_mean_over_every_batch_of_every_rank(two_ranks):
    _, ranks = two_ranks
    batches = ranks[0]["batches"] + ranks[1]["batches"]
    assert [len(r["batches"]) for r in ranks] == [3, 1]
    keys = set(batches[0])
    assert "loss" in keys
    for k in keys:
        expect = sum(b[k] for b in batches) / len(batches)
        for r in ranks:
            name = k if "/" in k else f"train/{k}"     # step outputs are train/<name> unless namespaced
            assert r["train"][name] == pytest.approx(expect, rel=1e-6), k
    local = sum(b["loss"] for b in ranks[1]["batches"]) / len(ranks[1]["batches"])
    assert local != pytest.approx(ranks[1]["train"]["train/loss"], rel=1e-6)
