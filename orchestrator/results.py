"""The results folder of one sweep run and its Parquet files (DESIGN.md, "Results layout").

    results/<spec>/<UTC timestamp>-<short id>/
      spec.resolved.yaml  env.json  trials.parquet  epochs.parquet  table.md/.csv/.tex  plots/*.png  ray/

Every file is written to a temporary name in the same folder and renamed into place, so a run
killed at any moment leaves whole files or none.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"rlseg"
TRIAL_COLUMNS = ["trial_id", "row", "row_index", "seed", "status", "error", "trial_path", "mlflow_run_id",
                 "epochs", "wall_s", "cell_key", "reused", "source_run", "config_json"]
EPOCH_COLUMNS = ["trial_id", "row", "row_index", "seed", "epoch"]
PACKAGES = ["torch", "torchvision", "ray", "mlflow", "optuna", "open_clip_torch", "timm", "pyarrow", "pydantic",
            "numpy", "rlseg"]


def new_run_dir(results_root: Path, spec_name: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = results_root / spec_name / f"{stamp}-{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    return path


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(path: Path, records: list[dict[str, Any]], leading: list[str], meta: dict[str, Any]) -> None:
    columns = leading + sorted({k for r in records for k in r} - set(leading))
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records]) if records else \
        pa.table({c: pa.array([], pa.string()) for c in columns})
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """trials, epochs and the spec metadata (metric, mode, rows with paper numbers) of a run folder."""
    trials_path = run_dir / "trials.parquet"
    if not trials_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no trials.parquet (not a results folder, or no trial has ended yet)")
    table = pq.read_table(trials_path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    epochs_path = run_dir / "epochs.parquet"
    epochs = pq.read_table(epochs_path).to_pandas() if epochs_path.is_file() else pd.DataFrame(columns=EPOCH_COLUMNS)
    return table.to_pandas(), epochs, meta


_CODE_VERSION: str | None = None


def code_version() -> str:
    """sha256 of the installed trainers code (every .py, preset and model config under trainers/) and the torch
    and ray versions: what decides a cell's result besides its config and seed."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import ray
        import torch

        import trainers

        root = Path(trainers.__file__).resolve().parent
        h = hashlib.sha256(f"torch {torch.__version__} ray {ray.__version__}".encode())
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml", ".json") and p.is_file()):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
        _CODE_VERSION = h.hexdigest()[:16]
    return _CODE_VERSION


def cell_key(config: dict[str, Any]) -> str:
    """A cell is (resolved trial config, seed) under one code version: its content hash (the seed is in config)."""
    payload = json.dumps({"config": config, "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def finished_cells(spec_dir: Path, exclude: Path | None = None) -> dict[str, tuple[Path, dict[str, Any], list[dict]]]:
    """The index of finished cells of a spec: every ok trial with a cell_key in the run folders under
    results/<spec>/ (their trials.parquet are the index), newest run first -> {cell_key: (run_dir, record, epochs)}."""
    found: dict[str, tuple[Path, dict[str, Any], list[dict]]] = {}
    runs = sorted((p for p in spec_dir.iterdir() if p.is_dir()), reverse=True) if spec_dir.is_dir() else []
    for run in runs:
        if exclude is not None and run.resolve() == exclude.resolve() or not (run / "trials.parquet").is_file():
            continue
        try:
            trials, epochs, _ = read_run(run)
        except (OSError, ValueError):   # a folder being written right now, or not ours
            continue
        if "cell_key" not in trials.columns:
            continue
        eps = records(epochs)
        for rec in records(trials[trials["status"] == "ok"]):
            if rec["cell_key"] and rec["cell_key"] not in found:
                found[rec["cell_key"]] = (run, rec, [e for e in eps if e["trial_id"] == rec["trial_id"]])
    return found


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as plain dicts, missing values as None (what the recorder keeps in memory)."""
    return [{k: _native(v) for k, v in row.items()} for row in df.to_dict("records")]


def _missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):   # lists, arrays
        return False


def _native(v: Any) -> Any:
    return None if _missing(v) else (v.item() if hasattr(v, "item") else v)


RUN_STATE = "run.json"


def read_state(run_dir: Path) -> dict[str, Any]:
    """run.json: what a resumed command needs (spec path, profile, overrides, MLflow parent run, phase)."""
    path = run_dir / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def update_state(run_dir: Path, **fields: Any) -> dict[str, Any]:
    state = {**read_state(run_dir), **fields}
    write_atomic(run_dir / RUN_STATE, json.dumps(state, indent=1, default=str))
    return state


def unfinished_runs(results_root: Path, spec_name: str) -> list[Path]:
    """Run folders of a spec whose command did not finish, newest first."""
    base = results_root / spec_name
    runs = sorted((p for p in base.iterdir() if p.is_dir()), reverse=True) if base.is_dir() else []
    return [p for p in runs if (p / RUN_STATE).is_file() and read_state(p).get("phase") != "done"]


def git_info(cwd: Path | None = None) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    sha = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None
    diff = git("diff", "HEAD") if dirty else None
    return {"git_sha": sha, "git_dirty": dirty,
            "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None}


def env_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "packages": versions, **git_info(Path(__file__).resolve().parent), "argv": sys.argv,
        "code_version": code_version(),
        "determinism": {"torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                        "cudnn_deterministic": torch.backends.cudnn.deterministic,
                        "cudnn_benchmark": torch.backends.cudnn.benchmark,
                        "note": "seeded (python, numpy, torch); data order from (seed, epoch); CPU runs repeat "
                                "exactly, GPU runs up to non-deterministic kernels"},
        **(extra or {}),
    }
