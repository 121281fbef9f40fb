"""resources.* -> Ray's ScalingConfig, per-rank evidence in the final checkpoint, and one real DDP trial
over a two-node Ray cluster (two raylets on this machine) through orchestrator.sweep.run_sweep."""
import json
import textwrap
import time

import pandas as pd
import pytest
import torch

from conftest import tiny
from orchestrator.spec import resolve
from orchestrator.sweep import DRIVER_RESOURCE, fitting_trials, trial_resources
from orchestrator.trial import scaling_config, trial_path
from trainers.config import Config
from trainers.data import build_dataset
from trainers.loop import (CHECKPOINT_FILE, RANK_RECORD, RANKS_DIR, fit, seed_everything, tensors_sha256,
                           write_checkpoint)
from trainers.methods import build_method


def config(**resources) -> dict:
    return Config.model_validate({"resources": resources}).model_dump(mode="json")


def initial_parameters(config: dict) -> dict[str, torch.Tensor]:
    """The parameters a run of `config` starts from, rebuilt here: trainers.loop seeds every generator with the
    config's seed and then builds the method (the datasets draw from their own generators)."""
    cfg = Config.model_validate(config)
    seed_everything(cfg.seed)
    data = build_dataset(cfg.data, "train")
    return {k: v.detach().clone() for k, v in build_method(cfg, data.num_classes, data.ignore_index).named_parameters()}


def parameters_of(state: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """The parameters among a checkpoint's model state (which also holds buffers: BatchNorm statistics)."""
    return {k: state[k] for k in names}


def test_resources_reach_the_scaling_config():
    sc = scaling_config(config(workers=3, cpus_per_worker=2, gpus_per_worker=0.5, placement="spread"))
    assert sc.num_workers == 3 and sc.use_gpu is True
    assert sc.resources_per_worker == {"CPU": 2, "GPU": 0.5}      # half a GPU each, not use_gpu's whole one
    assert sc.total_resources == {"CPU": 6, "GPU": 1.5}
    assert sc.placement_strategy == "SPREAD"

    default = scaling_config(config())
    assert default.num_workers == 1 and default.use_gpu is False
    assert default.resources_per_worker == {"CPU": 1} and default.placement_strategy == "PACK"


def test_tensors_sha256_is_equal_exactly_for_identical_tensors():
    a = {"w": torch.linspace(-1, 1, 7), "b": torch.zeros(3)}
    assert tensors_sha256({k: v.clone() for k, v in reversed(a.items())}) == tensors_sha256(a)
    one_ulp = a["w"].clone()
    one_ulp[3] = torch.nextafter(one_ulp[3], torch.tensor(1.0))
    for other in ({**a, "w": one_ulp}, {**a, "w": a["w"].double()}, {**a, "w": a["w"].view(1, 7)},
                  {"v": a["w"], "b": a["b"]}, {"w": a["w"]}):
        assert tensors_sha256(other) != tensors_sha256(a)


def test_trial_resources_hold_a_driver_unit_not_a_cpu():
    """A TorchTrainer trial's driver only waits: on a local Ray it holds one TRAIN_DRIVER unit and no CPU, on a
    cluster without that unit half a CPU; an in-process trial (0 or 1 worker by default) trains and holds its CPUs
    (and GPUs)."""
    trainer = config(trial_path="torch_trainer")
    assert trial_resources(trainer, local_driver_resource=True) == {"cpu": 0, DRIVER_RESOURCE: 1}
    assert trial_resources(trainer, local_driver_resource=False) == {"cpu": 0.5}
    assert trial_resources(config(workers=2), local_driver_resource=True) == {"cpu": 0, DRIVER_RESOURCE: 1}
    assert trial_resources(config(workers=0, cpus_per_worker=2), True) == {"cpu": 2}
    assert trial_resources(config(cpus_per_worker=2), True) == {"cpu": 2}     # 1 worker: in process by default
    assert trial_resources(config(workers=0, cpus_per_worker=2, gpus_per_worker=0.5), True) == {"cpu": 2, "gpu": 0.5}


@pytest.mark.parametrize("resources, cpus, expect", [
    ({}, 2, 2),                                              # the default on 2 cores: two trials at a time
    ({"workers": 2}, 2, 1),
    ({"workers": 0}, 2, 2),                                  # in-process trials
    ({"workers": 1, "cpus_per_worker": 0.5}, 2, 4),
    ({"workers": 2, "cpus_per_worker": 2}, 16, 4),
    ({"workers": 1, "cpus_per_worker": 4}, 2, 1),           # larger than the machine: still one at a time
    ({}, 64, 6),                                             # never more than there are trials
])
def test_fitting_trials_counts_what_fits(resources, cpus, expect):
    configs = [config(**resources)] * 6
    assert fitting_trials(configs, cpus) == expect
    # the same count from what Ray is asked for: the trial's own CPUs on a local Ray plus its workers' ScalingConfig
    c = configs[0]
    per_trial = trial_resources(c, True)["cpu"] + (
        scaling_config(c).total_resources["CPU"] if trial_path(c) == "torch_trainer" else 0)
    assert expect == max(1, min(6, int(cpus // per_trial)))
    # a mix runs as many at a time as the largest trial allows
    assert fitting_trials(configs + [config(workers=2, cpus_per_worker=2)], cpus) == max(1, min(7, cpus // 4))


def test_placement_is_pack_or_spread():
    with pytest.raises(ValueError, match="placement"):
        config(placement="one_per_node")


def test_final_checkpoint_carries_a_rank_record(tmp_path):
    """Without Ray: one rank that drew every train index once per epoch; the record's digests are those of the
    state it checkpoints; state.pt stays what resume reads, the record goes to ranks/rank0.json."""
    states = []
    fit(tiny(schedule={"epochs": 2}), lambda m, s: states.append(s))
    assert [RANK_RECORD in s for s in states] == [False, True]
    record = states[-1][RANK_RECORD]
    assert (record["world_rank"], record["world_size"], record["node_id"]) == (0, 1, None)
    assert record["resumed_from_epoch"] == 0
    for epoch in ("1", "2"):   # 32 images, batch 8: all of them, each once
        drawn = record["train_indices"][epoch]
        assert drawn["count"] == 32 and drawn["indices"] == list(range(32))
    # the digest is that of the final parameters (not of the state with its buffers), which moved from the start
    init = initial_parameters(tiny(schedule={"epochs": 2}))
    final = parameters_of(states[-1]["model"], init)
    assert record["params_sha256"] == tensors_sha256(final) != tensors_sha256(states[-1]["model"])
    assert all(not torch.equal(final[k], init[k]) for k in init), [k for k in init if torch.equal(final[k], init[k])]
    assert record["params_sha256"] != tensors_sha256(init)
    # the rebuilt start is the run's start: with a learning rate of 1e-30 only the zeros (biases) move, by ~1e-30
    still = []
    fit(tiny(schedule={"epochs": 1, "lr": 1e-30}), lambda m, s: still.append(s))
    for k, v in parameters_of(still[-1]["model"], init).items():
        torch.testing.assert_close(v, init[k], rtol=0, atol=1e-25, msg=k)

    write_checkpoint(str(tmp_path), states[-1], rank=0)
    assert json.loads((tmp_path / RANKS_DIR / "rank0.json").read_text()) == record
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert RANK_RECORD not in saved and saved["epoch"] == 2
    resumed = fit(tiny(schedule={"epochs": 3}), state=saved)   # the checkpoint still resumes
    assert resumed["epoch"] == 3


@pytest.fixture
def two_node_cluster():
    """Two raylets on 127.0.0.1 with one CPU each: two 1-CPU workers can only run one per node. The head also
    offers the TRAIN_DRIVER unit, so the Tune trial's driver holds no CPU (orchestrator.sweep.trial_resources)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"TRAIN_DRIVER": 1}, "object_store_memory": 100 * 2**20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.integration
def test_ddp_trial_over_two_nodes_trains_disjoint_shards_to_identical_weights(tmp_path, two_node_cluster,
                                                                              monkeypatch):
    from orchestrator.sweep import run_sweep

    spec = tmp_path / "multinode.yaml"
    spec.write_text(textwrap.dedent("""
        name: multinode
        seeds: [0]
        base:
          data: {image_size: 32, train_size: 32, val_size: 16}
          schedule: {epochs: 2, batch_size: 8}
          resources: {workers: 2, cpus_per_worker: 1, placement: spread}
        rows:
          - {name: ddp}
    """))
    t0 = time.perf_counter()
    # the cluster's address as `ray job submit` hands it to a job's driver: in RAY_ADDRESS, no --address
    monkeypatch.setenv("RAY_ADDRESS", two_node_cluster.address)
    outcome = run_sweep(resolve(spec), results_root=tmp_path / "results", address=None, verbose=0)
    print(f"two-node trial: {time.perf_counter() - t0:.1f}s")
    trials = pd.read_parquet(outcome.run_dir / "trials.parquet")
    assert list(trials["status"]) == ["ok"], trials["error"].tolist()
    assert trials.loc[0, "trial_path"] == "torch_trainer" and trials.loc[0, "epochs"] == 2

    # every rank adds ranks/rank<r>.json to the final epoch's checkpoint; rank 0 adds state.pt
    rank_dirs = sorted((outcome.run_dir / "ray").glob(f"train-*/checkpoint_*/{RANKS_DIR}"))
    assert len(rank_dirs) == 1, rank_dirs
    checkpoint = rank_dirs[0].parent
    assert torch.load(checkpoint / CHECKPOINT_FILE, weights_only=False)["epoch"] == 2
    records = [json.loads(p.read_text()) for p in sorted(rank_dirs[0].glob("rank*.json"))]
    assert [r["world_rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    cluster_nodes = {n.node_id for n in two_node_cluster.list_all_nodes()}
    assert records[0]["node_id"] != records[1]["node_id"]          # one worker per node
    assert {r["node_id"] for r in records} == cluster_nodes

    for epoch in ("1", "2"):   # DistributedSampler: each epoch's 32 images split 16/16 with no overlap
        a, b = (set(r["train_indices"][epoch]["indices"]) for r in records)
        assert len(a) == len(b) == 16
        assert not a & b and a | b == set(range(32))
    # the gradient all-reduce happened: both ranks stepped to bit-identical parameters, those rank 0 checkpointed,
    # which are not the ones they started from
    assert records[0]["params_sha256"] == records[1]["params_sha256"]
    init = initial_parameters(json.loads(trials.loc[0, "config_json"]))
    final = parameters_of(torch.load(checkpoint / CHECKPOINT_FILE, weights_only=False)["model"], init)
    assert records[0]["params_sha256"] == tensors_sha256(final)
    assert not any(torch.equal(final[k], init[k]) for k in init)
    assert records[0]["params_sha256"] != tensors_sha256(init)
