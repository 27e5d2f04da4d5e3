"""Each loss against a value computed by hand on small tensors."""
import math

import pytest
import torch

from furnace.data import paste, paste_labels
from furnace.losses import ce_loss, content_aware_loss, ohem_ce, pseudo_label_ce, region_similarity, semantic_sensitive_loss


def test_ce_loss_ignores_255_and_averages_valid_pixels():
    # 2 classes, 1x1x3 image; pixel 2 ignored. logits (0, ln 3) -> p(class1) = 3/4.
    logits = torch.tensor([[[[0.0, 0.0, 5.0]], [[math.log(3), 0.0, -5.0]]]])
    target = torch.tensor([[[1, 0, 255]]])
    expected = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    assert ce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # an explicit denominator (global valid count) replaces the local count
    assert ce_loss(logits, target, denominator=torch.tensor(4.0)).item() == pytest.approx(expected * 2 / 4, rel=1e-6)


def test_pseudo_label_ce_uses_cutmix_combined_teacher_argmax():
    # teacher on u0 says class 0 everywhere, on u1 class 1; mask pastes u1 at pixel (0, 1).
    t0 = torch.tensor([[[[2.0, 2.0]], [[0.0, 0.0]]]])
    t1 = torch.tensor([[[[0.0, 0.0]], [[2.0, 2.0]]]])
    mask = torch.tensor([[[[0.0, 1.0]]]])
    student = torch.tensor([[[[0.0, 0.0]], [[math.log(3), math.log(3)]]]])  # p(class1) = 3/4
    # pseudo-label (0, 1): CE = (-log 1/4 - log 3/4) / 2
    expected = (-math.log(1 / 4) - math.log(3 / 4)) / 2
    pasted = paste_labels(t0.argmax(1), t1.argmax(1), mask)
    assert torch.equal(pasted, torch.tensor([[[0, 1]]])) and torch.equal(pasted, paste(t0, t1, mask).argmax(1))
    assert pseudo_label_ce(student, pasted).item() == pytest.approx(expected, rel=1e-6)
    # without a mask, the teacher's own argmax
    assert pseudo_label_ce(student, t1.argmax(1)).item() == pytest.approx(-math.log(3 / 4), rel=1e-6)


def test_semantic_sensitive_loss_sums_abs_gap_difference():
    s = torch.zeros(2, 3, 2, 2)
    t = torch.zeros(2, 3, 2, 2)
    s[0, 0] = torch.tensor([[1.0, 3.0], [0.0, 0.0]])   # GAP 1.0
    t[0, 0] = 0.5                                        # GAP 0.5 -> |0.5|
    s[1, 2] = -2.0                                       # GAP -2 vs 0 -> 2
    t[1, 1] = 4.0                                        # GAP 0 vs 4 -> 4
    assert semantic_sensitive_loss(s, t).item() == pytest.approx(0.5 + 2 + 4)


def test_content_aware_loss_matches_hand_computed_similarity():
    # grid 2 on a 2x2 feature: pooling is the identity; 2 channels.
    fs = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # regions (1,0),(0,1),(1,1),(1,0)
    ft = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # all regions (1,0)
    r = 1 / math.sqrt(2)
    sim_s = torch.tensor([[1, 0, r, 1], [0, 1, r, 0], [r, r, 1, r], [1, 0, r, 1]])
    assert torch.allclose(region_similarity(fs, grid=2)[0], sim_s, atol=1e-6)
    expected = ((sim_s - 1) ** 2).mean().item()
    assert content_aware_loss(fs, ft, grid=2).item() == pytest.approx(expected, rel=1e-6)
    # invariant to the scale of a region's feature vector (cosine)
    assert content_aware_loss(fs * 3, ft, grid=2).item() == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_hard_pixels_below_threshold_and_at_least_min_kept():
    # 2 classes, 4 pixels with true-class probabilities 0.9, 0.6, 0.3, 0.95 (via logit differences)
    probs = torch.tensor([0.9, 0.6, 0.3, 0.95])
    logit1 = torch.log(probs / (1 - probs))
    logits = torch.stack([torch.zeros(4), logit1]).view(1, 2, 1, 4)
    target = torch.ones(1, 1, 4, dtype=torch.long)
    nll = -torch.log(probs)
    # thresh 0.7, min_kept 1: keep p <= 0.7 -> pixels 1, 2
    assert ohem_ce(logits, target, thresh=0.7, min_kept=1).item() == pytest.approx(nll[[1, 2]].mean().item(), rel=1e-5)
    # min_kept 3: the 3rd smallest probability is 0.9 > 0.7, so keep p <= 0.9 -> pixels 0, 1, 2
    assert ohem_ce(logits, target, thresh=0.7, min_kept=3).item() == pytest.approx(nll[[0, 1, 2]].mean().item(), rel=1e-5)
    # fewer valid pixels than min_kept: plain CE over the valid ones
    assert ohem_ce(logits, target, thresh=0.7, min_kept=10).item() == pytest.approx(nll.mean().item(), rel=1e-5)
    # ignored pixels never count
    target_ign = target.clone()
    target_ign[0, 0, 2] = 255
    assert ohem_ce(logits, target_ign, thresh=0.7, min_kept=1).item() == pytest.approx(nll[1].item(), rel=1e-5)


def test_losses_give_no_gradient_to_teacher_inputs():
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randn(2, 3, 8, 8, requires_grad=True)
    fs = torch.randn(2, 4, 8, 8, requires_grad=True)
    ft = torch.randn(2, 4, 8, 8, requires_grad=True)
    total = semantic_sensitive_loss(s, t) + pseudo_label_ce(s, t.argmax(1)) + content_aware_loss(fs, ft)
    total.backward()
    assert t.grad is None and ft.grad is None
    assert s.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0
