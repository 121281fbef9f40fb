"""The reward baseline under data parallelism follows the global batch (Eq. 16 over every rank's rewards), and
DDP's buffer broadcast does not overwrite it with rank 0's: a real 2-process gloo group on 127.0.0.1."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny

STEPS, TAU = 3, 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_rewards() -> torch.Tensor:
    """(STEPS, 8) rewards of a global batch of 8 per step."""
    return torch.rand(STEPS, 8, generator=torch.Generator().manual_seed(0))


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 8, (4, 32, 32), generator=g)


def _rank(rank: int, world: int, port: int, queue) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from trainers.config import Config
    from trainers.methods import build_method
    from trainers.rl import Baseline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # 1. the Baseline alone, each rank with its half of every global batch of rewards
        bl, bs = Baseline("ema", tau=TAU), []
        for r in global_rewards():
            adv = bl.advantages(r.view(world, -1)[rank])
            bs.append((float(bl.value), adv.tolist()))
        # 2. latent_rl wrapped by DDP as Ray Train's prepare_model does (broadcast_buffers on), each rank its half
        cfg = Config.model_validate(tiny(method={"name": "latent_rl", "policy": {"pool": [2, 2]},
                                                 "baseline": {"kind": "ema", "tau": TAU}}))
        torch.manual_seed(0)
        model = build_method(cfg, 8, 255)
        ddp = DistributedDataParallel(model, find_unused_parameters=model.ddp_find_unused_parameters)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = global_batch()
        steps = []
        for step in range(STEPS):
            torch.manual_seed(100 * step + rank)
            out = ddp(x.view(world, -1, *x.shape[1:])[rank], y.view(world, -1, *y.shape[1:])[rank])
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            model.after_optimizer_step()
            steps.append((float(out["reward"]), float(model.baseline.value)))
        queue.put((rank, bs, steps))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_baseline_follows_the_global_batch_on_every_rank():
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict((rank, (bs, steps)) for rank, bs, steps in (queue.get(timeout=300) for _ in range(world)))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    # 1. the same trajectory as one process over the same global batch, and the same advantages
    from trainers.rl import Baseline
    one = Baseline("ema", tau=TAU)
    for step, r in enumerate(global_rewards()):
        adv = one.advantages(r)
        for rank in range(world):
            b, adv_rank = got[rank][0][step]
            assert b == pytest.approx(float(one.value), abs=1e-6)
            assert adv_rank == pytest.approx(adv.view(world, -1)[rank].tolist(), abs=1e-6)

    # 2. under DDP: b is the EMA of the global mean reward (the mean of the ranks' equal-sized means), on both ranks
    b = None
    for step in range(STEPS):
        global_mean = sum(got[rank][1][step][0] for rank in range(world)) / world
        b = global_mean if b is None else b
        b = TAU * b + (1 - TAU) * global_mean
        for rank in range(world):
            assert got[rank][1][step][1] == pytest.approx(b, abs=1e-5), (step, rank)
    local_means = [got[rank][1][0][0] for rank in range(world)]
    assert abs(local_means[0] - local_means[1]) > 1e-4            # the ranks' halves do differ
