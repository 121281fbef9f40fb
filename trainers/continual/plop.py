"""PLOP (Douillard et al., CVPR 2021), its three pieces as its official code computes them (train.py, run.py,
segmentation_module.py of github.com/arthurdouillard/CVPR2021_PLOP; values of `--method PLOP` in argparser.py):

    Local POD         features_distillation(collapse "local", prepro "pow", frobenius, spp_scales [1, 2, 4]) on
                      the encoder's stages, the decoder's pre-classifier features and (pod_logits) the low-resolution
                      logits, the new classes' logits summed into the background channel ("extra_channels": "sum");
                      factors pod_factor (VOC 0.01, ADE 0.001) and, for the logits, pod_logits_factor (VOC 0.0005,
                      ADE 1e-5); each times sqrt(n_classes / n_new) (use_pod_schedule); the sum over layers / their
                      number. (PLOP's stage features are pre-activation, InPlaceABN's `att`; ours are the stages'
                      outputs, encoder.stage_modules().)
    pseudo-labels     "entropy": background pixels (label < n_old) take the old model's argmax where its normalised
                      entropy is below the class's median entropy over the step's background pixels (floored at
                      `threshold` 0.001), else 255; the CE of each image is scaled by the fraction of its background
                      pixels that were pseudo-labelled (classif_adaptive_factor) and averaged over all pixels
                      (CrossEntropyLoss(reduction none) * factor, .mean()).
    classifier init   init_balanced (MiB): new classes' weights = the background's, biases = b_bg - log(n_new + 1),
                      and the background's bias set to the same value.

`Distiller` holds the frozen previous model (the teacher) and the thresholds; `attach` hooks it onto the step's
method, so the method's own forward (supervised, latent_rl, ...) stays the learner and the loop is unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.models.encoders import encoder_stages


# ---- Local POD (train.py _local_pod, features_distillation) -------------------------------------------------------

def local_pod(x: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """PLOP's _local_pod: for each scale s, the map cut into s x s regions (h // s by w // s, the remainder
    dropped), each region's width-pooled (mean over w) and height-pooled (mean over h) profiles, concatenated.
    (B, C, H, W) -> (B, D). The entry order differs from PLOP's loop; the Frobenius distance does not see it.
    PLOP cuts both axes by w // s (its maps are square); here each axis by its own size."""
    b, c, h, w = x.shape
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        t = x[..., :s * kh, :s * kw].reshape(b, c, s, kh, s, kw)
        parts += [t.mean(5).flatten(1), t.mean(3).flatten(1)]   # horizontal_pool (mean over w), vertical (over h)
    return torch.cat(parts, 1)


def merge_new_logits(new: torch.Tensor, num_old: int) -> torch.Tensor:
    """extra_channels "sum": the new model's logits (B, K_new, h, w) on the old classes' channels, the new classes'
    logits added to the background's (B, num_old, h, w)."""
    return torch.cat([new[:, :1] + new[:, num_old:].sum(1, keepdim=True), new[:, 1:num_old]], 1)


def pod_loss(old: list[torch.Tensor], new: list[torch.Tensor], factors: list[float], num_old: int,
             schedule: float = 1.0, scales=(1, 2, 4)) -> torch.Tensor:
    """features_distillation: sum over layers of factor * schedule * mean_b ||POD(old^2) - POD(new^2)||_2, divided
    by the number of layers (a layer with factor 0 still counts). A layer whose channels differ (the logits) has its
    new classes merged into the background (merge_new_logits)."""
    loss = new[0].new_zeros(())
    for a, b, factor in zip(old, new, factors):
        if a.shape[1] != b.shape[1]:
            b = merge_new_logits(b, num_old)
        if factor <= 0:
            continue
        a, b = local_pod(a.float().pow(2), scales), local_pod(b.float().pow(2), scales)   # prepro "pow"
        loss = loss + factor * schedule * torch.linalg.vector_norm(a - b, dim=-1).mean()
    return loss / len(old)


# ---- pseudo-labels (train.py entropy, find_median, the "entropy" branch of Trainer.train) -----------------------

def plop_entropy(probs: torch.Tensor) -> torch.Tensor:
    """PLOP's entropy(): -1/log(C) * mean over the C channels of p log(p + 1e-8). (B, C, H, W) -> (B, H, W)."""
    return -(probs * torch.log(probs + 1e-8)).mean(1) / math.log(probs.shape[1] + 1e-8)


def entropy_histogram(old_logits: torch.Tensor, labels: torch.Tensor, num_classes: int, bins: int = 100
                      ) -> torch.Tensor:
    """find_median's histogram of one batch: over the background pixels (label 0), the old model's normalised
    entropy (/ log of the step's class count) binned per predicted class. (num_classes, bins) int64."""
    probs = torch.softmax(old_logits.float(), 1)
    bg = labels == 0
    values = plop_entropy(probs)[bg] / math.log(num_classes)
    cls = probs.argmax(1)[bg]
    y = torch.clamp((values * bins).long(), max=bins - 1)
    hist = torch.zeros(num_classes * bins, dtype=torch.int64, device=old_logits.device)
    return hist.index_add_(0, cls * bins + y, torch.ones_like(y)).view(num_classes, bins)


def median_thresholds(hist: torch.Tensor, floor: float) -> torch.Tensor:
    """Per class, the median of its histogram (interpolated inside the bin that holds the half), at least `floor`;
    a class with no pixel gets `floor` (PLOP: zeros, then max with the threshold). (K, bins) -> (K,) float.
    PLOP's loop adds the bin index instead of the bin count to its running sum, which gives this median only when
    it falls in the first bin (the usual case: its entropy scale puts the values in the first few bins); this is
    the median its docstring describes."""
    k, bins = hist.shape
    total = hist.sum(1)
    half = total.double() / 2
    cum = hist.cumsum(1).double()
    b = (cum < half[:, None]).sum(1).clamp(max=bins - 1)                        # first bin where cum >= half
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(half))
    count = hist.gather(1, b[:, None])[:, 0].double().clamp(min=1)
    median = b.double() / bins + (half - before) / count / bins
    median = torch.where(total > 0, median, torch.zeros_like(median))
    return median.clamp(min=floor).float()


def pseudo_label(labels: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor, num_old: int,
                 num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "entropy" pseudo-labels: background pixels (label < num_old, i.e. 0 after the background shift) take the
    old model's class where plop_entropy / log(num_classes) < thresholds[class], else 255. Returns the new labels
    (B, H, W) and classif_adaptive_factor (B,): pseudo-labelled / background pixels per image (+1e-6)."""
    probs = torch.softmax(old_logits.float(), 1)
    pseudo = probs.argmax(1)
    valid = plop_entropy(probs) / math.log(num_classes) < thresholds[pseudo]
    bg = labels < num_old
    out = torch.where(bg & valid, pseudo, torch.where(bg, torch.full_like(labels, 255), labels))
    factor = (bg & valid).sum((1, 2)).float() / (bg.sum((1, 2)).float() + 1e-6)
    return out, factor


# ---- classifier growth (run.py + segmentation_module.init_new_classifier) ----------------------------------------

def grow_state(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], num_old: int, num_new: int,
               init: str) -> dict[str, torch.Tensor]:
    """The new step's state: every tensor of the previous model kept; a class-indexed tensor (first dim num_old
    before, num_old + num_new now: the classifier's weight and bias, the aux head's) keeps its old rows and gets new
    ones: `mib` (PLOP init_balanced) the background's weight row and bias b_bg - log(num_new + 1), the background's
    bias set to that value too; `random` the new model's own initialisation."""
    out = {}
    for key, fresh in new.items():
        if key not in old:
            raise KeyError(f"continual: the previous step's model has no {key!r}")
        prev = old[key].to(fresh.device)
        if prev.shape == fresh.shape:
            out[key] = prev
            continue
        if prev.shape[1:] != fresh.shape[1:] or prev.shape[0] != num_old or fresh.shape[0] != num_old + num_new:
            raise ValueError(f"continual: {key} changes from {tuple(prev.shape)} to {tuple(fresh.shape)}, not by "
                             f"{num_new} new classes")
        grown = fresh.clone()
        grown[:num_old] = prev
        if init == "mib":
            if prev.dim() == 1:      # bias
                bias = prev[0] - math.log(num_new + 1)
                grown[num_old:] = bias
                grown[0] = bias
            else:                    # weight: imprint the background's
                grown[num_old:] = prev[0]
        out[key] = grown
    return out


def student_state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The learner's own weights, without an attached Distiller (its teacher and thresholds)."""
    return {k: v for k, v in method.checkpoint_state().items() if not k.startswith(f"{Distiller.NAME}.")}


# ---- the hooks ------------------------------------------------------------------------------------------------------

class FeatureTap:
    """Forward hooks that record, while armed, a method's encoder stage outputs, its decoder's features before the
    classifier (the output of `decoder.convs`, before the FCN head's dropout; else the input of
    `decoder.classifier`; else none) and its low-resolution logits (the decoder's output): PLOP's attentions +
    pre_logits + sem_logits_small."""

    def __init__(self, method: nn.Module):
        self.features: list[torch.Tensor] = []
        self.armed = False
        seg = method.segmentor
        for m in encoder_stages(seg.encoder):
            m.register_forward_hook(self._output)
        convs, classifier = getattr(seg.decoder, "convs", None), getattr(seg.decoder, "classifier", None)
        if isinstance(convs, nn.Module):
            convs.register_forward_hook(self._output)
        elif isinstance(classifier, nn.Module):
            classifier.register_forward_pre_hook(self._input)
        seg.decoder.register_forward_hook(self._output)

    def _output(self, module, args, out):
        if self.armed:
            self.features.append(out)

    def _input(self, module, args):
        if self.armed:
            self.features.append(args[0])

    def take(self) -> list[torch.Tensor]:
        out, self.features, self.armed = self.features, [], False
        return out


class Distiller(nn.Module):
    """PLOP around one step's learner (step t >= 1): the frozen teacher (the step t-1 model) and the per-class
    entropy thresholds live here (checkpointed with the learner: resume needs both). `attach(method)` registers
    it as `method.plop` with a forward pre-hook (teacher pass, pseudo-labels) and a forward hook (L_seg replaced by
    PLOP's weighted CE, + Local POD)."""
    NAME = "plop"

    def __init__(self, teacher: nn.Module, num_old: int, num_classes: int, num_new: int, pod_factor: float,
                 pod_logits_factor: float, pod_schedule: bool, scales, threshold: float, bins: int,
                 adaptive_factor: bool):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.num_old, self.num_classes = num_old, num_classes
        self.pod_factor, self.pod_logits_factor = pod_factor, pod_logits_factor
        self.schedule = math.sqrt(num_classes / num_new) if pod_schedule else 1.0     # use_pod_schedule
        self.scales, self.threshold, self.bins, self.adaptive_factor = tuple(scales), threshold, bins, adaptive_factor
        self.register_buffer("thresholds", torch.full((num_classes,), float(threshold)))
        self.teacher_tap = FeatureTap(teacher)
        self.student_tap: FeatureTap | None = None
        self._factor: torch.Tensor | None = None
        self._old: list[torch.Tensor] = []

    def attach(self, method: nn.Module) -> None:
        method.add_module(self.NAME, self)
        self.student_tap = FeatureTap(method)
        method.register_forward_pre_hook(self._before)
        method.register_forward_hook(self._after)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()            # the loop's model.train() reaches the teacher too
        return self.teacher.predict(images).float()

    @torch.no_grad()
    def fit_thresholds(self, loader, rt, accel) -> None:
        """find_median (mode "entropy", 100 bins) over the step's training images with the teacher, all ranks."""
        hist = torch.zeros(self.num_classes, self.bins, dtype=torch.int64, device=rt.device)
        for images, labels in loader:
            with accel.autocast():
                logits = self.teacher_logits(accel.inputs(images))
            hist[:self.num_old] += entropy_histogram(logits, labels.to(rt.device), self.num_classes, self.bins)[
                :self.num_old]
        rt.all_reduce_sum(hist)
        self.thresholds.copy_(median_thresholds(hist, self.threshold))

    def _before(self, method, args):
        if not method.training:
            return None
        images, masks = args[0], args[1]
        self.teacher_tap.armed = True
        logits = self.teacher_logits(images)
        self._old = self.teacher_tap.take()
        masks, factor = pseudo_label(masks, logits, self.thresholds[:self.num_old], self.num_old, self.num_classes)
        self._factor = factor if self.adaptive_factor else torch.ones_like(factor)
        self.student_tap.armed = True
        return (images, masks) + tuple(args[2:])

    def _after(self, method, args, out):
        if not method.training:
            return out
        new = self.student_tap.take()
        masks, old = args[1], self._old
        logits_small = new[-1]
        g = logits_small.shape[0] // masks.shape[0]          # latent_rl's GRPO decodes G samples per image
        if g > 1:      # the decoder's features are per sample, the encoder's per image
            old = [o.repeat_interleave(n.shape[0] // o.shape[0], 0) for o, n in zip(old, new)]
            masks = masks.repeat_interleave(g, 0)
        factor = self._factor.repeat_interleave(g, 0) if g > 1 else self._factor
        logits = F.interpolate(logits_small.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits, masks, ignore_index=255, reduction="none")
        loss_ce = (factor[:, None, None] * ce).mean()                           # PLOP: loss.mean() over all pixels
        factors = [self.pod_factor] * (len(new) - 1) + [self.pod_logits_factor]
        loss_pod = pod_loss(old, new, factors, self.num_old, self.schedule, self.scales)
        if "loss_seg" not in out:
            raise ValueError(f"continual.strategy: plop replaces L_seg (loss_seg), which method {method.cfg.name} "
                             "does not report; use supervised or latent_rl")
        if getattr(method, "seg_phase", True):              # L_seg -> PLOP's classification loss
            out["loss"] = out["loss"] - out["loss_seg"] + method.cfg.seg_loss.ce * loss_ce
        out["loss"] = out["loss"] + loss_pod
        out["loss_seg"] = loss_ce.detach()
        out["loss_pod"] = loss_pod.detach()
        out["plop_adaptive_factor"] = self._factor.mean()
        self._old, self._factor = [], None
        return out
