"""The sparse loss sees painted pixels only: unlabelled pixels get exactly zero gradient."""

import torch

from dlorch.core.engine.segment.losses import sparse_ce_dice_loss


def test_unlabelled_pixels_get_exactly_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16) * 5
    logits[:, :, :4] = 1e4  # extreme logits where nothing is painted must not leak NaN/inf
    logits.requires_grad_(True)
    labels = torch.randint(0, 4, (2, 1, 16, 16))
    labels[:, :, :4] = 0
    sparse_ce_dice_loss(logits, labels).backward()
    unlabelled = (labels[:, 0] == 0).unsqueeze(1).expand_as(logits)
    assert torch.all(logits.grad[unlabelled] == 0)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[~unlabelled].abs().sum() > 0


def test_loss_ignores_values_at_unlabelled_pixels():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 8, 8)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 2:4, 2:6] = 1
    labels[0, 5:7, 2:6] = 2
    changed = logits.clone()
    changed[:, :, labels[0] == 0] = torch.randn_like(changed[:, :, labels[0] == 0]) * 100
    assert torch.allclose(sparse_ce_dice_loss(logits, labels), sparse_ce_dice_loss(changed, labels))


def test_nothing_painted_gives_zero_loss_that_backpropagates():
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    loss = sparse_ce_dice_loss(logits, torch.zeros(1, 8, 8, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)


def test_perfect_prediction_scores_near_zero():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :2] = 1
    labels[0, -2:] = 2
    logits = torch.zeros(1, 2, 8, 8)
    logits[:, 0][labels == 1] = 50
    logits[:, 1][labels == 2] = 50
    assert sparse_ce_dice_loss(logits, labels).item() < 0.1
