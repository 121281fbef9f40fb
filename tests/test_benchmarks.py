"""The benchmarks run (numbers are printed, never asserted on: see benchmarks/)."""
import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def test_rl_overhead_runs_and_prints_the_ratio():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rl_overhead.py"), "--steps", "2", "--skip-paper",
                          "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = re.search(r"embedded: latent_rl / supervised = ([0-9.]+)", out.stdout)
    assert ratio and float(ratio.group(1)) > 0, out.stdout
    assert "rewards (4 terms)" in out.stdout
    flops = re.search(r"supervised ([0-9.]+) G, latent_rl ([0-9.]+) G; FLOP ratio ([0-9.]+)", out.stdout)
    assert flops, out.stdout
    sup, rl, ratio = map(float, flops.groups())
    # tiny_cnn forward on the embedded preset's 8 x 3 x 48 x 48: 38,633,472 MACs per 64 x 64 image (six 3x3 convs,
    # 'same' padding, so MACs scale with H * W): 21,731,328 per 48 x 48 image, 0.348 GFLOP per batch; the step adds
    # the backward, so more than 2x that; latent_rl does strictly more work on the same segmentor
    gflop = 2 * 38_633_472 * (48 * 48) / (64 * 64) * 8 / 1e9
    assert sup > 2 * gflop and rl > sup and abs(ratio - rl / sup) < 2e-3, out.stdout
    assert f"segmentor.encoder {gflop:.3f} (+0.000)" in out.stdout, out.stdout


def test_flop_counter_counts_the_cpu_flash_attention_kernel():
    spec = importlib.util.spec_from_file_location("rl_overhead", REPO / "benchmarks" / "rl_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    b, heads, n, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, heads, n, d, requires_grad=True) for _ in range(3))
    counter = bench._counter()
    with counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * b * heads * n * n * d)          # Q K^T and P V
    with counter:                                                                 # counts anew
        out.sum().backward()
    assert counter.get_total_flops() == 5 * (2 * b * heads * n * n * d)          # Q K^T again, dV, dP, dQ, dK


def test_clip_rl_step_runs_and_prints_time_and_memory():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "clip_rl_step.py"), "--steps", "2", "--skip-paper",
                          "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    line = re.search(r"embedded: clip_vit_tiny .* median step ([0-9.]+) ms .* peak RSS ([0-9]+) MiB", out.stdout)
    assert line and float(line.group(1)) > 0 and int(line.group(2)) > 0, out.stdout


def test_mlflow_down_runs_and_prints_the_cost_of_each_outage():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mlflow_down.py"), "--deadline", "0.5",
                          "--repeat", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    for case in ("closed port", "503 to everything", "never answers"):
        assert re.search(rf"^{case}: offline after [0-9.]+ s .*; 100 calls offline [0-9.]+ ms$", out.stdout, re.M), \
            out.stdout
    assert "503 to everything: offline after" in out.stdout and ", 2 requests)" in out.stdout, out.stdout


def test_overhead_benchmark_prints_bare_and_trial_times():
    # one cell: the many-cell sweep line is the same code path as the one-cell one (and a second Ray start in CI)
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--spec",
                          str(REPO / "ablations" / "loss.yaml"), "--row", "0", "--cells", "1", "--skip-torch-trainer",
                          "data.train_size=32", "data.val_size=16", "data.image_size=32", "schedule.epochs=1"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    bare = re.search(r"bare trainers.loop.fit: +([0-9.]+) s", out.stdout)
    trial = re.search(r"default path \(in process\): +([0-9.]+) s +trial / bare +([0-9.]+) +fixed per-trial cost "
                      r"+(-?[0-9.]+) s", out.stdout)
    assert bare and trial, out.stdout
    b, t, ratio, fixed = float(bare.group(1)), *map(float, trial.groups())
    assert ratio == pytest.approx(t / b, rel=0.05) and fixed == pytest.approx(t - b, abs=0.02), out.stdout  # printed rounded
