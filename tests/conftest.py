import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.pop("MLFLOW_TRACKING_URI", None)   # tests use sqlite under their own tmp results folder
os.environ.pop("MLFLOW_RUN_ID", None)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tiny(**over):
    """A config that trains in about a second on one CPU core."""
    cfg = {
        "data": {"image_size": 32, "train_size": 32, "val_size": 16},
        "schedule": {"epochs": 2, "batch_size": 8, "lr": 0.003},
    }
    for k, v in over.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec YAML into tmp_path and return its path."""
    def write(text: str, name: str = "spec.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p
    return write


def method_step(model, opt, images, masks) -> dict:
    """One training step of a method as trainers.loop takes it: forward, backward, optimizer, EMA hooks."""
    out = model(images, masks)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    model.after_optimizer_step()
    return out


def data_root_error(exc) -> str:
    """The message of a dataset error: one line that starts with the key it is about."""
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("data.root: ")
    return msg


@pytest.fixture
def one_thread():
    """One intra-op thread, as trainers.loop trains (two on a busy 2-core machine run small steps many times
    slower)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# a small promptable segmenter (seg_r1's frozen model) for tests that need one, random weights
SEG_TINY = {"name": "promptable_tiny", "dim": 16, "depth": 1, "heads": 2, "mlp": 32}


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    """A random-init promptable segmenter's weights (SEG_TINY), saved once per module: frozen in seg_r1, its quality
    does not matter (the prompt's format and box still move the reward)."""
    import torch
    from trainers.methods.promptable_pretrain import SegmenterConfig
    from trainers.models.promptable import build_promptable
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("seg") / "segmenter.pt"
    torch.save(build_promptable(SegmenterConfig(**SEG_TINY)).state_dict(), path)
    return str(path)
