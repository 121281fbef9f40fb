"""clip_rl train step: time and peak memory, embedded config and CLIP ViT-B/16 at 224², batch 4.

    python benchmarks/clip_rl_step.py [--steps 10] [--paper-steps 3] [--threads N] [--device cpu|cuda] [--skip-paper]

Each setting runs in its own process, so its peak memory is its own: on CPU the peak resident set size of that
process (ru_maxrss) and its growth over the built model (the step's own working memory); on CUDA
torch.cuda.max_memory_allocated. A step is forward + backward + optimizer step at an epoch where all of clip_rl's
terms are on (curriculum f < 1: s_L, O, the agent's REINFORCE term). Synthetic tensors, no data loading.
Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def run_one(setting: str, steps: int, device: torch.device) -> dict:
    from rl_overhead import build, step_times

    tree = yaml.safe_load((REPO / "trainers" / "presets" / "clip_rl.yaml").read_text())
    classes, batch_size, size = 8, tree["schedule"]["batch_size"], tree["data"]["image_size"]
    if setting == "paper":
        profile = yaml.safe_load((REPO / "trainers" / "presets" / "paper_endovis18_clip_b16.yaml").read_text())
        tree["model"] = {**profile["model"], "pretrained": None}     # random init: no download
        tree["schedule"] = profile["schedule"]
        classes, batch_size, size = 12, 4, 224
    model, opt = build(tree, "clip_rl", classes, device)
    model.on_epoch_start(1, 4)                                         # f = 0.5625: every term on
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, 3, size, size, generator=g).to(device),
             torch.randint(0, classes, (batch_size, size, size), generator=g).to(device))
    built = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = step_times(model, opt, batch, steps, 2, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    out = {"setting": setting, "encoder": tree["model"]["encoder"], "decoder": tree["model"]["decoder"],
           "size": size, "batch": batch_size, "median_ms": 1000 * statistics.median(times),
           "min_ms": 1000 * min(times), "steps": steps, "trainable": trainable, "frozen": frozen}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mib"], out["step_rss_growth_mib"] = rss_mib(), rss_mib() - built
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--paper-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        steps = args.paper_steps if args.child == "paper" else args.steps
        print(json.dumps(run_one(args.child, steps, device)))
        return

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    for setting in ["embedded"] + ([] if args.skip_paper else ["paper"]):
        cmd = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps),
               "--paper-steps", str(args.paper_steps), "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{setting}: failed\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        mem = (f"peak {r['peak_mib']:.0f} MiB (CUDA)" if "peak_mib" in r else
               f"peak RSS {r['peak_rss_mib']:.0f} MiB, of which the steps added {r['step_rss_growth_mib']:.0f} MiB")
        print(f"{setting}: {r['encoder']} (frozen, {r['frozen'] / 1e6:.1f}M) + {r['decoder']} "
              f"({r['trainable'] / 1e6:.2f}M trainable), {r['size']} px, batch {r['batch']}: "
              f"median step {r['median_ms']:.1f} ms (min {r['min_ms']:.1f}, {r['steps']} steps), "
              f"{1000 * r['batch'] / r['median_ms']:.1f} img/s; {mem}", flush=True)


if __name__ == "__main__":
    main()
