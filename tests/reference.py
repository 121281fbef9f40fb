"""Reference computations for tests, written from the papers' definitions with numpy, not from trainers/ code."""
import numpy as np
import torch


def image_iou(logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """r^IoU per image (paper 002, Eq. 15): the argmax prediction's IoU averaged over the classes present in the
    prediction or the target of that image. logits (B, K, H, W), target (B, H, W) without ignore pixels -> (B,)."""
    pred = logits.detach().double().numpy().argmax(1)
    tgt = target.numpy()
    out = []
    for p, t in zip(pred, tgt):
        ious = []
        for c in np.union1d(np.unique(p), np.unique(t)):
            inter = np.sum((p == c) & (t == c))
            union = np.sum((p == c) | (t == c))
            ious.append(inter / union)
        out.append(np.mean(ious))
    return np.array(out)
