"""Segmentation metrics from a confusion matrix accumulated over all evaluated pixels.

Conventions (shared by eval, tests and logs):
  confusion[g, p] = number of pixels whose ground truth is g and whose prediction is p (rows = ground truth).
  IoU_c   = TP_c / (TP_c + FP_c + FN_c),  TP_c = conf[c, c],
            FP_c = sum_g conf[g, c] - TP_c (column),  FN_c = sum_p conf[c, p] - TP_c (row)
            -> NaN when TP+FP+FN = 0 (class absent from both prediction and ground truth), never 0.
  mIoU    = nanmean_c IoU_c   (absent classes are left out of the mean)
  pixel accuracy = trace(conf) / sum(conf)   (ignored pixels are not in the matrix)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from furnace.data import IGNORE_INDEX


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 confusion matrix, rows = ground truth, columns = prediction.

    pred and target: integer tensors/arrays of the same shape (any shape). Pixels where target == ignore_index
    are skipped. Other target values outside [0, num_classes) or predictions outside it raise ValueError.
    The result lives on pred's device, so accumulating on the GPU needs no host copies.
    """
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target, device=pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel():
        bad_t = (target < 0) | (target >= num_classes)
        bad_p = (pred < 0) | (pred >= num_classes)
        if bool(bad_t.any()):
            raise ValueError(f"label value {int(target[bad_t][0])} outside [0, {num_classes}) "
                             f"and != ignore {ignore_index}")
        if bool(bad_p.any()):
            raise ValueError(f"predicted class {int(pred[bad_p][0])} outside [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _as_numpy(confusion) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be square 2-D, got shape {confusion.shape}")
    return confusion


def iou_per_class(confusion) -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN) per class (float64); NaN for a class absent from prediction and ground truth."""
    conf = _as_numpy(confusion)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion) -> float:
    """nanmean of iou_per_class (NaN if no class is present at all)."""
    iou = iou_per_class(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def pixel_accuracy(confusion) -> float:
    """trace / sum over the non-ignored pixels (NaN for an empty matrix)."""
    conf = _as_numpy(confusion)
    total = conf.sum()
    return float(np.trace(conf) / total) if total > 0 else math.nan


def format_results(confusion, class_names: Sequence[str] | None = None, title: str | None = None) -> str:
    """Markdown table of per-class IoU (%), 'absent' for NaN, followed by mIoU and pixel accuracy."""
    iou = iou_per_class(confusion)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for a {len(iou)}-class confusion matrix")
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"## {title}"] if title else []
    lines += [f"| {'id':>2} | {'class':<{width}} | IoU (%) |", f"|---:|:{'-' * (width + 1)}|--------:|"]
    for i, (name, v) in enumerate(zip(names, iou)):
        cell = "absent" if np.isnan(v) else f"{100 * v:.2f}"
        lines.append(f"| {i:>2} | {name:<{width}} | {cell:>7} |")
    lines.append(f"mIoU {100 * mean_iou(confusion):.2f}  pixel accuracy {100 * pixel_accuracy(confusion):.2f}  "
                 f"({int(np.isnan(iou).sum())} absent classes left out of the mean)")
    return "\n".join(lines)
