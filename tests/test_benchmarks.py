"""The benchmarks run (numbers are printed, never asserted on: see benchmarks/)."""
import re
import subprocess
import sys

from conftest import REPO


def test_rl_overhead_runs_and_prints_the_ratio():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rl_overhead.py"), "--steps", "2", "--skip-paper",
                          "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = re.search(r"embedded: latent_rl / supervised = ([0-9.]+)", out.stdout)
    assert ratio and float(ratio.group(1)) > 0, out.stdout
    assert "rewards (4 terms)" in out.stdout


def test_clip_rl_step_runs_and_prints_time_and_memory():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "clip_rl_step.py"), "--steps", "2", "--skip-paper",
                          "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    line = re.search(r"embedded: clip_vit_tiny .* median step ([0-9.]+) ms .* peak RSS ([0-9]+) MiB", out.stdout)
    assert line and float(line.group(1)) > 0 and int(line.group(2)) > 0, out.stdout
