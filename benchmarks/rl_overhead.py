"""Train-step cost of latent_rl (MHA modulation) over supervised, same segmentor, same batch.

    python benchmarks/rl_overhead.py [--steps 20] [--paper-steps 3] [--threads N] [--device cpu|cuda] [--skip-paper]
                                     [key=value ...]

Two settings:
  embedded  the latent_rl preset (tiny_cnn + FCN head, 64 px, batch 16, 8 classes): target ratio <= 1.25
  paper     FCN-R50-D8 at 512 x 512, batch 2, 21 classes (the paper's latent: d = 2048, h = w = 64), random init,
            the paper profile's model and method keys (policy trained through z, element-level ratio)
A step is forward + backward + optimizer step + the EMA update of the old policy, on synthetic tensors (no data
loading); the two methods run in alternating blocks of steps. Prints the median step time of each method, their
ratio, and where latent_rl's extra time goes (forward-only: policy, modulation, the wider decoder, rewards).

It also counts the arithmetic of one step of each (torch.utils.flop_counter: convolutions, matmuls and attention,
forward and backward) and prints their ratio, and latent_rl's forward FLOPs by part. The FLOP ratio is what
the method itself costs: on a device that runs both models at the same efficiency the time ratio cannot go below
it, whatever the implementation; the time ratio above it is per-op overhead (small tensors, more kernels).
key=value overrides go to the latent_rl tree of both settings before supervised is derived from it (same
segmentor), e.g. `method.policy.enabled=false` (Table 6's MHA(z, z, z), no policy) or `method.policy.blocks=1`.
Numbers, not assertions.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def build(tree: dict, method: str, num_classes: int, device: torch.device):
    from trainers.config import Config
    from trainers.loop import build_optimizer
    from trainers.methods import build_method
    from trainers.overrides import apply_overrides

    tree = apply_overrides(copy.deepcopy(tree), [("method", method)] if method == "supervised" else [])
    cfg = Config.model_validate(tree)
    torch.manual_seed(0)
    model = build_method(cfg, num_classes, 255).to(device).train()
    return model, build_optimizer(cfg.schedule, model)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(model, opt, batch, steps: int, warmup: int, device: torch.device) -> list[float]:
    images, masks = batch
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        out = model(images, masks)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.after_optimizer_step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def breakdown(model, batch, device: torch.device, repeats: int) -> dict[str, float]:
    """Forward-only time of latent_rl's extra parts (median ms): policy, modulation + decoder, rewards."""
    from trainers.rl import segmentation_rewards

    images, masks = batch
    z = model.segmentor.encode(images)
    h, w = z.shape[-2:]

    def timed(fn) -> float:
        ts = []
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        return 1000 * statistics.median(ts[1:])

    parts = {"encoder": timed(lambda: model.segmentor.encode(images))}
    s = None                                                        # no policy: Table 6's MHA(z, z, z)
    if model.policy is not None:
        mu, log_sigma = model.policy(z)
        s = model.policy.sample(mu, log_sigma, (h, w))
        parts["policy (pi and pi_old)"] = timed(lambda: (model.policy(z), model.old_policy(z)))
    z_mod = model.modulation(z, s)
    logits = model.segmentor.decode(z_mod, images.shape[-2:])
    pixel_ce = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255, reduction="none")   # L_seg's, reused
    return {
        **parts,
        "modulation": timed(lambda: model.modulation(z, s)),
        "decoder on [z, alpha z_mod]": timed(lambda: model.segmentor.decode(z_mod, images.shape[-2:])),
        "rewards (4 terms)": timed(lambda: segmentation_rewards(logits, masks, model.num_classes, 255,
                                                               pixel_ce=pixel_ce)),
    }


def _flash_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flash_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _counter():
    """torch's FlopCounterMode (convolutions, matmuls, attention). It knows the CUDA attention kernels; the CPU flash
    kernel gets the same formula here."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(depth=3, display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward_flops,
    })


def counted_step(model, opt, batch) -> int:
    """FLOPs of one whole train step (forward + backward); the step itself is a warm-up step."""
    counter = _counter()
    with counter:
        step_times(model, opt, batch, 0, 1, batch[0].device)
    return counter.get_total_flops()


def forward_flops(model, batch) -> dict[str, int]:
    """Forward FLOPs of each top-level part (segmentor.encoder, segmentor.decoder, policy, old_policy, modulation).
    Forward only: the counter's module tracking is exact in forward but only approximate in backward."""
    counter = _counter()
    with counter, torch.no_grad():
        model(*batch)
    top, parts = type(model).__name__, {}
    for name, ops in counter.get_flop_counts().items():
        path = name.split(".")[1:] if name.split(".")[0] == top else []
        if path in (["segmentor", "encoder"], ["segmentor", "decoder"]) or len(path) == 1 and path != ["segmentor"]:
            parts[".".join(path)] = sum(ops.values())
    return parts


def measure(name: str, tree: dict, num_classes: int, batch_size: int, size: int, steps: int, warmup: int,
            device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, 3, size, size, generator=g).to(device),
             torch.randint(0, num_classes, (batch_size, size, size), generator=g).to(device))
    runs = {method: build(tree, method, num_classes, device) for method in ("supervised", "latent_rl")}
    times = {method: [] for method in runs}
    flops = {method: counted_step(model, opt, batch) for method, (model, opt) in runs.items()}   # 1st warm-up step
    parts = {method: forward_flops(model, batch) for method, (model, _) in runs.items()}
    for model, opt in runs.values():
        step_times(model, opt, batch, 0, warmup, device)
    # Alternate blocks of steps, so both methods see the same machine: on a shared box the load drifts within a run.
    block = max(1, min(5, steps // 4))
    for done in range(0, steps, block):
        for method, (model, opt) in runs.items():
            times[method] += step_times(model, opt, batch, min(block, steps - done), 0, device)
    med = {}
    for method, ts in times.items():
        med[method] = statistics.median(ts)
        print(f"  {method:<11} median step {1000 * med[method]:9.1f} ms  (min {1000 * min(ts):.1f}, "
              f"{steps} steps after {warmup} warm-up)  {batch_size / med[method]:7.1f} img/s", flush=True)
    timed_parts = breakdown(runs["latent_rl"][0], batch, device, repeats=max(1, min(steps, 5)))
    del runs
    ratio = med["latent_rl"] / med["supervised"]
    print(f"  {name}: latent_rl / supervised = {ratio:.3f}")
    sup, rl = flops["supervised"], flops["latent_rl"]
    print(f"  FLOPs per step (forward + backward): supervised {sup / 1e9:.3f} G, latent_rl {rl / 1e9:.3f} G; "
          f"FLOP ratio {rl / sup:.3f} (the floor of the time ratio at equal efficiency)")
    extra = {k: v - parts["supervised"].get(k, 0) for k, v in parts["latent_rl"].items()}
    print("  forward GFLOP of latent_rl by part (+ over supervised): " + ", ".join(
        f"{k} {parts['latent_rl'][k] / 1e9:.3f} ({v / 1e9:+.3f})" for k, v in extra.items()), flush=True)
    print("  forward-only parts of latent_rl (median ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timed_parts.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--paper-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to the latent_rl tree")
    args = p.parse_args()
    from trainers.overrides import apply_overrides, parse_assignments

    try:
        overrides = parse_assignments(args.overrides)
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")

    preset = yaml.safe_load((REPO / "trainers" / "presets" / "latent_rl.yaml").read_text())
    if overrides:
        preset = apply_overrides(preset, overrides)
        print("overrides: " + " ".join(args.overrides))
    d = preset["data"]
    print(f"embedded: {preset['model']['encoder']}+{preset['model']['decoder']}, {d['image_size']} px, "
          f"batch {preset['schedule']['batch_size']}, modulation {preset['method']['modulation']}")
    measure("embedded", preset, 8, preset["schedule"]["batch_size"], d["image_size"], args.steps, 3, device)

    if not args.skip_paper:
        paper = copy.deepcopy(preset)
        profile = yaml.safe_load((REPO / "trainers" / "presets" / "paper_voc_fcn_r50.yaml").read_text())
        paper["model"] = {**profile["model"], "pretrained": None}          # random init: no download
        paper["schedule"] = profile["schedule"]
        for part in ("policy", "loss"):
            paper["method"][part].update(profile["method"].get(part, {}))
        paper = apply_overrides(paper, overrides)
        print(f"paper: {paper['model']['encoder']}+{paper['model']['decoder']}, 512 px, batch 2, 21 classes, SGD "
              f"(latent 2048 x 64 x 64), ratio_level {paper['method']['loss']['ratio_level']}")
        measure("paper", paper, 21, 2, 512, args.paper_steps, 1, device)


if __name__ == "__main__":
    main()
