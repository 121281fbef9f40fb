"""One Tune trial = one (row, seed) cell. The driver function runs a Ray Train TorchTrainer.

`resources.workers >= 1` (default): TorchTrainer(trainers.loop.train_worker) with a ScalingConfig;
per-epoch metrics reach Tune through TuneReportCallback. `resources.workers == 0`: Ray's "local
mode" does not work inside Tune (DESIGN.md), so the trial calls trainers.loop.fit in this process
and reports with ray.tune.report / ray.tune.Checkpoint. The path taken is reported as `trial_path`.

Fault tolerance: a TorchTrainer trial's workers are restarted up to `resources.max_failures` times
(ray.train.FailureConfig), each attempt resuming from the latest epoch checkpoint; an in-process trial
resumes from Tune's checkpoint when Tune restarts it (Tuner restore, or the Tuner's own FailureConfig).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

TORCH_TRAINER = "torch_trainer"
IN_PROCESS = "in_process"


def trial_path(config: dict[str, Any]) -> str:
    return TORCH_TRAINER if config["resources"]["workers"] >= 1 else IN_PROCESS


def scaling_config(config: dict[str, Any]):
    """resources.* -> ray.train.ScalingConfig: one worker (DDP rank) per `workers`, each holding
    `cpus_per_worker` CPUs and `gpus_per_worker` GPUs (fractional shares a GPU), placed PACK or SPREAD."""
    import ray.train

    res = config["resources"]
    assert res["workers"] >= 1, "workers == 0 trains in the Tune trial itself (trial_path), not in a TorchTrainer"
    per_worker = {"CPU": res["cpus_per_worker"]}
    if res["gpus_per_worker"] > 0:
        per_worker["GPU"] = res["gpus_per_worker"]   # overrides use_gpu's default of one whole GPU per worker
    return ray.train.ScalingConfig(num_workers=res["workers"], use_gpu=res["gpus_per_worker"] > 0,
                                   resources_per_worker=per_worker,
                                   placement_strategy=res.get("placement", "pack").upper())


def run_trial(tune_config: dict[str, Any]) -> None:
    """Tune trainable. tune_config = {"trial": {"row", "row_index", "seed", "config"}, "storage_path": ...}."""
    import ray.tune

    trial = tune_config["trial"]
    config = trial["config"]
    os.environ.pop("MLFLOW_RUN_ID", None)  # an inherited run id would capture anything logged below
    if trial_path(config) == TORCH_TRAINER:
        _torch_trainer(config, tune_config["storage_path"], ray.tune.get_context().get_trial_id())
    else:
        _in_process(config)


def _torch_trainer(config: dict[str, Any], storage_path: str, trial_id: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.loop import DIVERGED, TrainingDiverged, train_worker

    class EpochsToTune(TuneReportCallback):
        """Ray Train's reports to Tune, except a divergence (train_worker): it is no epoch and lacks the metric
        that a search or scheduler expects (Tune stops the whole run on such a result); the trial raises it."""

        def after_report(self, run_context, metrics, checkpoint):
            if DIVERGED not in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=scaling_config(config),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",          # stable per trial: a restored trial finds its checkpoints
            storage_path=storage_path,
            callbacks=[EpochsToTune()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # a failed worker group restarts from the latest checkpoint (train_worker reads it)
            failure_config=ray.train.FailureConfig(max_failures=config["resources"]["max_failures"]),
        ),
    )
    result = trainer.fit()   # raises TrainingFailedError once max_failures retries failed too: the trial errors
    if (result.metrics or {}).get(DIVERGED):   # not retried (train_worker): the trial errors with the reason
        raise TrainingDiverged(result.metrics[DIVERGED])


def _in_process(config: dict[str, Any]) -> None:
    import ray.tune

    from trainers.loop import fit, read_checkpoint, write_checkpoint

    def report(metrics: dict[str, float], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(d, state, rank=0)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))

    state = None
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = read_checkpoint(d)
    fit(config, report, state=state)
