"""GPU speed and the multi-GPU switches of the paper recipe, in one place for the train loop.

    schedule.precision     fp32 | bf16 | fp16: the method's forward runs under torch.autocast; fp16 adds a
                           GradScaler (bf16 has fp32's exponent range and needs none). Where the maths stays
                           fp32 (fp32_islands): the segmentor's logits (Segmentor.decode casts them), so
                           L_seg, the aux CE, latent_rl's rewards (argmax, r^CE) and the evaluation's argmax
                           read fp32; the latent policy's (mu, log_sigma), so the sample s, log pi(s) (Eq. 12,
                           a sum of d*h*w = 8M terms at paper size: bf16 keeps 3 digits), the ratio rho and
                           KL(pi_old || pi) (Eq. 4-5) are fp32; the optimizer's master weights stay fp32.
    schedule.channels_last NHWC weights and inputs (tensor-core convolutions need no transposes).
    schedule.cudnn_benchmark  cuDNN picks the fastest algorithm per input shape (fixed 512 x 512 crops).
    model.sync_bn          BatchNorm -> SyncBatchNorm before DDP when world size > 1.
    data.*workers, pin     DataLoader workers, pinned host memory, prefetch (loader_kwargs).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Accel:
    """Precision and memory format of one rank's steps: `with accel.autocast(): out = model(accel.inputs(x), y)`,
    then `accel.backward(loss, optimizer)` (gradients unscaled afterwards, so clipping and gradient statistics
    see true values) and `accel.step(optimizer)`."""

    def __init__(self, precision: str = "fp32", device: torch.device | str = "cpu", channels_last: bool = False):
        self.device = torch.device(device)
        self.dtype = DTYPES[precision]
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        # GradScaler(enabled=False) makes scale/unscale_/step/update plain pass-throughs
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    @classmethod
    def from_config(cls, schedule, device: torch.device) -> "Accel":
        return cls(schedule.precision, device, schedule.channels_last)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images to this rank's device (non-blocking from pinned memory) in the model's memory format."""
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), skipped by the fp16 scaler when a gradient is inf/NaN (it then lowers the scale)."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)


def prepare_model(model: nn.Module, cfg, world_size: int, device: torch.device) -> nn.Module:
    """The recipe's model-side switches, applied before DDP wraps the model: SyncBatchNorm (model.sync_bn, more
    than one rank), channels_last, fp32 outputs of the latent policy (fp32_islands), cuDNN autotune."""
    if cfg.model.sync_bn and world_size > 1:
        if device.type != "cuda":
            raise ValueError("model.sync_bn: torch's SyncBatchNorm trains on CUDA devices only (its forward raises "
                             "on CPU tensors); set model.sync_bn=false for a CPU run with several workers")
        model = convert_sync_batchnorm(model)
    if cfg.schedule.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.schedule.precision != "fp32":
        fp32_islands(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.schedule.cudnn_benchmark
    return model


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm*d of `model` becomes a SyncBatchNorm with the same parameters, buffers and momentum (the
    EMA old policy's momentum 0 included), in place; SSSegmentation's norm_cfg {'type': 'SyncBatchNorm'}."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _outputs_to_fp32(module: nn.Module, args, output):
    return tuple(t.float() for t in output)


def fp32_islands(model: nn.Module) -> None:
    """The latent policy's (mu, log_sigma) leave it in fp32 under autocast (a forward hook on every
    GaussianLatentPolicy, pi_phi and pi_old), so the Gaussian sample and log-density maths runs in fp32."""
    from trainers.rl import GaussianLatentPolicy

    for module in model.modules():
        if isinstance(module, GaussianLatentPolicy):
            module.register_forward_hook(_outputs_to_fp32)


def loader_kwargs(data_cfg, device: torch.device) -> dict:
    """DataLoader options: worker processes, pinned host memory on CUDA (so .to(non_blocking=True) overlaps the
    copy), and with workers their prefetch depth and whether they persist between epochs (data.persistent_workers)."""
    kw: dict = {"num_workers": data_cfg.num_workers, "pin_memory": device.type == "cuda"}
    if data_cfg.num_workers > 0:
        kw.update(persistent_workers=data_cfg.persistent_workers, prefetch_factor=data_cfg.prefetch_factor)
    return kw
