"""GPU train-step throughput at paper size: FCN-R50-D8 (resnet50c_d8 + FCN head + aux head), 512 x 512, batch 8,
21 classes, SGD; supervised and latent_rl (the paper preset's method keys), fp32 vs bf16 (+ channels_last), as
trainers.loop steps them (trainers.accel.Accel). Prints images/s, peak GPU memory and the latent_rl / supervised
time ratio. Random init, random data: nothing is downloaded. Without a CUDA device it says so and exits 0.

    python benchmarks/gpu_step.py [--steps 20] [--warmup 5] [--batch 8] [--size 512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(method: str, precision: str):
    from trainers.accel import Accel, prepare_model
    from trainers.config import Config
    from trainers.methods import build_method
    from trainers.optim import build_optimizer

    preset = yaml.safe_load((REPO / "trainers" / "presets" / "paper_voc_fcn_r50.yaml").read_text())
    rl = yaml.safe_load((REPO / "trainers" / "presets" / "latent_rl.yaml").read_text())["method"]
    rl["policy"] = {**rl.get("policy", {}), **preset["method"]["policy"]}     # the paper profile's policy keys
    tree = {"model": {**preset["model"], "pretrained": None},
            "schedule": {**preset["schedule"], "precision": precision, "channels_last": precision != "fp32"},
            "method": {**rl, "name": method} if method == "latent_rl" else {"name": method}}
    cfg = Config.model_validate(tree)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = prepare_model(build_method(cfg, 21, 255).to(device), cfg, 1, device)
    return model, build_optimizer(cfg.schedule, model), Accel.from_config(cfg.schedule, device)


def measure(method: str, precision: str, batch: int, size: int, steps: int, warmup: int) -> tuple[float, float]:
    """(images per second, peak memory GiB) of `steps` train steps after `warmup`."""
    model, opt, accel = build(method, precision)
    model.train()
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 21, (batch, size, size), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with accel.autocast():
            out = model(accel.inputs(x), y)
        opt.zero_grad(set_to_none=True)
        accel.backward(out["loss"], opt)
        accel.step(opt)
        model.after_optimizer_step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    torch.cuda.empty_cache()
    return batch * steps / elapsed, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device on this machine; nothing measured (run it on a GPU node)")
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, FCN-R50-D8 {args.size}^2 batch {args.batch}")
    rate: dict[tuple[str, str], float] = {}
    for precision in ("fp32", "bf16"):
        for method in ("supervised", "latent_rl"):
            ips, peak = measure(method, precision, args.batch, args.size, args.steps, args.warmup)
            rate[method, precision] = ips
            print(f"{method:10s} {precision}: {ips:8.1f} images/s   peak {peak:6.2f} GiB", flush=True)
    for precision in ("fp32", "bf16"):
        print(f"latent_rl / supervised time ratio ({precision}): "
              f"{rate['supervised', precision] / rate['latent_rl', precision]:.2f}")
    print(f"bf16 / fp32 images/s: supervised {rate['supervised', 'bf16'] / rate['supervised', 'fp32']:.2f}, "
          f"latent_rl {rate['latent_rl', 'bf16'] / rate['latent_rl', 'fp32']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
