"""Is the PPO term alive at the paper's shapes? PPO health of latent_rl over a few real training steps of the paper
profile (FCN-R50-D8, d = 2048, 64 x 64 latent, 512 x 512 crops), for ratio_level image (Eq. 12: one ratio per
image over d*h*w terms), element (one per element, token-level, averaged over d*h*w) and element_sum (the same
terms summed over d*h*w per image: method.loss.element_reduction sum).

    python benchmarks/ppo_paper_shapes.py [--steps 3] [--batch 2] [--size 512] [--levels image,element,element_sum]
                                          [--no-share] [--threads N] [--device cpu|cuda] [key=value ...]

Config: the full method (all four reward terms; not the control row) of ablations/reward.yaml under `--profile paper`
(SGD lr 0.01, poly, EMA eta 0.99, policy trained through z), random weights (no download), synthetic 512 x 512 batches with VOC-like 255 rings
around the objects. Each step is forward, backward, SGD step and the EMA update of pi_old, as trainers.loop takes
it; the printed rl/* figures are that step's: clipfrac, mean |log rho|, zero_grad_frac (terms whose L_Policy
gradient is 0) and the policy's gradient norm. Before each step, on that step's batch, rl/grad_share
(trainers.grad_share: ||grad L_RL|| / ||grad L_seg|| over encoder, modulation and decoder) and the L_Policy and L_KL
terms' own gradient norms; at step 1 pi_old equals pi, so the KL term's is 0. Random weights: the shares of a
trained R50 will differ. --size below 512 is a reduced run (latent size / 8), for machines where 512 is too slow.
Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KEYS = ("rl/clipfrac", "rl/log_ratio_abs_mean", "rl/zero_grad_frac", "rl/policy_grad_norm", "rl/approx_kl")
SHARE_KEYS = ("rl/grad_share", "rl/grad_norm_seg", "rl/grad_norm_policy_term", "rl/grad_norm_kl_term")
LEVELS = {"image": ["method.loss.ratio_level=image"],
          "element": ["method.loss.ratio_level=element", "method.loss.element_reduction=mean"],
          "element_sum": ["method.loss.ratio_level=element", "method.loss.element_reduction=sum"]}


def paper_config(level: str | None, overrides: list[str]):
    """The paper profile's config as it ships (level None), or with `level`'s ratio settings (LEVELS)."""
    from orchestrator.spec import resolve
    from trainers.config import Config

    plan = resolve(REPO / "ablations" / "reward.yaml", "paper",
                   ["model.pretrained=null", *(LEVELS[level] if level else []), *overrides])
    # the full method (all four reward terms): the last row that is not a spurious-reward control
    row = next(r for r in reversed(plan.rows) if r.config["method"].get("reward", {}).get("control", "none") == "none")
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
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--size", type=int, default=None, help="crop size (default: the paper profile's, 512)")
    ap.add_argument("--no-share", action="store_true", help="skip rl/grad_share (one forward, three backwards a step)")
    ap.add_argument("overrides", nargs="*", help="key=value for the latent_rl config")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from trainers.grad_share import grad_share
    from trainers.methods import build_method
    from trainers.optim import build_optimizer

    device = torch.device(args.device)
    overrides = args.overrides + ([f"data.image_size={args.size}"] if args.size else [])
    shipped = paper_config(None, overrides).method.loss
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps per level; "
          f"random weights (no download): figures of an untrained R50, not of the paper's trained one")
    print(f"the paper profile uses ratio_level {shipped.ratio_level}"
          + (f", element_reduction {shipped.element_reduction}" if shipped.ratio_level == "element" else ""))
    for level in args.levels.split(","):
        cfg = paper_config(level, overrides)
        torch.manual_seed(0)
        model = build_method(cfg, 21, 255).to(device).train()
        opt = build_optimizer(cfg.schedule, model)
        g = torch.Generator().manual_seed(0)
        print(f"\n{level}: {' '.join(LEVELS[level])} (encoder {cfg.model.encoder}, "
              f"d = {model.segmentor.encoder.out_channels}, {cfg.data.image_size} px crops, lr {cfg.schedule.lr}, "
              f"ema_eta {cfg.method.policy.ema_eta})")
        for step in range(args.steps):
            images, masks = (t.to(device) for t in voc_like_batch(args.batch, cfg.data.image_size, 21, g))
            if not args.no_share:
                t0 = time.perf_counter()
                share = grad_share(model, images, masks)
                figures = "  ".join(f"{k.split('/')[1]} {share[k]:.4g}" for k in SHARE_KEYS)
                print(f"  step {step + 1} before: {figures}  ({time.perf_counter() - t0:.1f} s)", flush=True)
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
