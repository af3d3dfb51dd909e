"""Sparse-label loss: cross-entropy plus soft Dice, computed on painted pixels only.

MONAI's DiceCELoss has no notion of "unlabelled": it would treat label 0 as a class and
teach the network that everything nobody painted is background. Here a pixel with label 0
is selected out with ``torch.where`` (not multiplied by a weight), so it contributes exactly
zero gradient even if its logits are extreme.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_ce_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 1.0, eps: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy + soft Dice restricted to labelled pixels.

    Args:
        logits: (B, K, *spatial) raw network outputs for classes 1..K.
        labels: (B, *spatial) or (B, 1, *spatial) integer map, 0 = unlabelled, 1..K = class.
        dice_weight: weight of the Dice term relative to cross-entropy.
        eps: Dice smoothing, in pixels.
        weights: per-pixel weights of the labels' shape (accepted labels weigh less than painted
            ones); None: every labelled pixel weighs 1. Cross-entropy is their weighted mean, and
            Dice counts a pixel's overlap with its weight.

    Returns:
        Scalar loss; zero (still attached to the graph) when nothing in the batch is labelled.
    """
    if labels.dim() == logits.dim():
        labels = labels[:, 0]
    if weights is not None and weights.dim() == logits.dim():
        weights = weights[:, 0]
    labels = labels.long()
    num_classes = logits.shape[1]
    mask = labels > 0
    n = mask.sum()
    if n == 0:
        return logits.sum() * 0.0
    target = (labels - 1).clamp(min=0)
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
    if weights is None:
        ce = torch.where(mask, nll, torch.zeros_like(nll)).sum() / n
    else:
        w = torch.where(mask, weights.to(nll.dtype), torch.zeros_like(nll))
        ce = (w * nll).sum() / w.sum().clamp(min=1e-6)

    probs = logp.exp()
    onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype)
    keep = mask.unsqueeze(1)
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    onehot = onehot * keep
    if weights is not None:
        probs, onehot = probs * w.unsqueeze(1), onehot * w.unsqueeze(1)
    dims = [0] + list(range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    # Only classes painted in this batch take part; an absent class has no overlap to measure.
    present = onehot.sum(dims) > 0
    dice_loss = 1.0 - dice[present].mean()
    return ce + dice_weight * dice_loss
