"""The losses of MGD and CPS. Each returns a scalar tensor; loss weights are applied by the caller.

Notation: logits are (B, C, H, W), labels (B, H, W) with 255 = ignore, features (B, D, h, w).
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from furnace.data import IGNORE_INDEX


def ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
            denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixel cross-entropy  L = sum_{p valid} -log softmax(logits_p)[y_p] / N.

    N is the number of valid (non-ignored) pixels, or `denominator` when given: distributed training
    passes the valid count of the whole global batch so that every process normalises alike."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    if denominator is None:
        denominator = (target != ignore_index).sum()
    return total / denominator.clamp(min=1)


def pseudo_label_ce(logits: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """Pixel-level consistency  L = mean_p CE(logits_p, y_p)  over the pixels with a pseudo-label y_p.

    `pseudo_labels` (B,H,W) are a teacher's argmax (255 where there is none, e.g. crop padding of offline
    teachers); furnace.data.paste_labels makes those of a CutMix image. They carry no gradient."""
    return F.cross_entropy(logits.float(), pseudo_labels, ignore_index=IGNORE_INDEX)


def semantic_sensitive_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Image-level semantic-sensitive loss  L = sum_b sum_c | GAP(s)_{b,c} - GAP(t)_{b,c} |,

    GAP = mean over H, W of the logits. Summed over batch and classes, as published."""
    gap_s = student_logits.float().mean(dim=(2, 3))
    gap_t = teacher_logits.detach().float().mean(dim=(2, 3))
    return (gap_s - gap_t).abs().sum()


def region_similarity(feat: torch.Tensor, grid: int = 7) -> torch.Tensor:
    """Cosine self-similarity of a grid x grid pooling of `feat`: (B, grid^2, grid^2).

    S = Z^T Z with Z = (B, D, grid^2) the pooled feature, each column (region) L2-normalised."""
    z = F.adaptive_avg_pool2d(feat.float(), grid).flatten(2)
    z = F.normalize(z, p=2, dim=1)
    return z.transpose(1, 2) @ z


def content_aware_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, grid: int = 7) -> torch.Tensor:
    """Region-level content-aware loss  L = mean_{b,i,j} (S(f_s)_{b,i,j} - S(f_t)_{b,i,j})^2,

    S the region self-similarity of `region_similarity` (grid x grid regions, cosine)."""
    return F.mse_loss(region_similarity(student_feat, grid), region_similarity(teacher_feat.detach(), grid))


def ohem_ce(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100000,
            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Online hard example mining cross-entropy (used on Cityscapes).

    Keeps the valid pixels whose probability of the true class is <= tau, tau = max(thresh, p_(k)) where
    p_(k) is the k-th smallest true-class probability, k = min_kept: at least the min_kept hardest pixels
    are always kept. L = mean over kept pixels of CE. With fewer than min_kept valid pixels, plain CE."""
    logits = logits.float()
    valid = target != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0 or n_valid < min_kept:
        return ce_loss(logits, target, ignore_index)
    with torch.no_grad():
        prob = logits.softmax(dim=1)
        safe_target = target.masked_fill(~valid, 0)
        true_prob = prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)[valid]
        threshold = thresh
        if min_kept > 0:
            kth = true_prob.kthvalue(min(min_kept, n_valid)).values.item()
            threshold = max(threshold, kth)
        kept = valid.clone()
        kept[valid] = true_prob <= threshold
    return ce_loss(logits, target.masked_fill(~kept, ignore_index), ignore_index)


def count_valid(targets: Sequence[torch.Tensor], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of non-ignored pixels over several label tensors (a float tensor, for normalising)."""
    return sum((t != ignore_index).sum() for t in targets).float()
