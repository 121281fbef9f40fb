"""Is the PPO term alive at the paper's shapes? PPO health of latent_rl over a few real training steps of the paper
profile (FCN-R50-D8, d = 2048, 64 x 64 latent, 512 x 512 crops), for ratio_level image (Eq. 12: one ratio per
image over d*h*w terms) and element (one per element, token-level).

    python benchmarks/ppo_paper_shapes.py [--steps 3] [--batch 2] [--threads N] [--device cpu|cuda] [key=value ...]

Config: the last row (all four reward terms) of ablations/reward.yaml under `--profile paper` (SGD lr 0.01, poly, EMA eta 0.99,
policy trained through z), random weights (no download), synthetic 512 x 512 batches with VOC-like 255 rings
around the objects. Each step is forward, backward, SGD step and the EMA update of pi_old, as trainers.loop takes
it; the printed rl/* figures are that step's: clipfrac, mean |log rho|, zero_grad_frac (terms whose L_Policy
gradient is 0) and the policy's gradient norm. Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KEYS = ("rl/clipfrac", "rl/log_ratio_abs_mean", "rl/zero_grad_frac", "rl/policy_grad_norm", "rl/approx_kl")


def paper_config(level: str, overrides: list[str]):
    from orchestrator.spec import resolve
    from trainers.config import Config

    plan = resolve(REPO / "ablations" / "reward.yaml", "paper",
                   ["model.pretrained=null", f"method.loss.ratio_level={level}", *overrides])
    row = plan.rows[-1]                                  # all four reward terms
    return Config.model_validate(row.config)


def voc_like_batch(batch: int, size: int, classes: int, generator: torch.Generator):
    """Images ~ N(0, 1); masks: background with one object of a random class per image, ringed by a 5 px 255 band."""
    images = torch.randn(batch, 3, size, size, generator=generator)
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    for i in range(batch):
        lo, hi = sorted(torch.randint(size // 8, 7 * size // 8, (2,), generator=generator).tolist())
        hi = max(hi, lo + size // 8)
        masks[i, lo - 5:hi + 5, lo - 5:hi + 5] = 255
        masks[i, lo:hi, lo:hi] = int(torch.randint(1, classes, (1,), generator=generator))
    return images, masks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--levels", default="image,element")
    ap.add_argument("overrides", nargs="*", help="key=value for the latent_rl config")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from trainers.methods import build_method
    from trainers.optim import build_optimizer

    device = torch.device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps per level")
    for level in args.levels.split(","):
        cfg = paper_config(level, args.overrides)
        torch.manual_seed(0)
        model = build_method(cfg, 21, 255).to(device).train()
        opt = build_optimizer(cfg.schedule, model)
        g = torch.Generator().manual_seed(0)
        print(f"\nratio_level {level} (encoder {cfg.model.encoder}, d = {model.segmentor.encoder.out_channels}, "
              f"lr {cfg.schedule.lr}, ema_eta {cfg.method.policy.ema_eta})")
        for step in range(args.steps):
            images, masks = (t.to(device) for t in voc_like_batch(args.batch, cfg.data.image_size, 21, g))
            t0 = time.perf_counter()
            out = model(images, masks)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            out.update(model.grad_stats())
            opt.step()
            model.after_optimizer_step()
            took = time.perf_counter() - t0
            figures = "  ".join(f"{k.split('/')[1]} {float(out[k]):.4g}" for k in KEYS)
            print(f"  step {step + 1}: {figures}  ({took:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
