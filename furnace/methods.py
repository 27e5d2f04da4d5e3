"""One training step of each method: `supervised`, `cps` (teachers) and `mgd` (student).

A step gets the models and one batch (dict: x_l, y_l labeled; u0, u1 unlabeled; mask the CutMix boxes,
1 where u1 is pasted into u0) and returns (total loss, {term name: detached value}).
Loss weights come from the config; a term whose weight is 0 is not computed.
"""
from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from easydict import EasyDict

from furnace.distributed import all_reduce_sum
from furnace.losses import (ce_loss, combine_cutmix, content_aware_loss, count_valid, ohem_ce,
                            pseudo_label_ce, semantic_sensitive_loss)

Terms = Dict[str, torch.Tensor]


def autocast(device: torch.device, amp: str):
    """torch.amp autocast for 'bf16' / 'fp16', nothing for 'off'."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def supervised_loss(C: EasyDict, logits: torch.Tensor, target: torch.Tensor, world_size: int) -> torch.Tensor:
    """CE (OHEM CE on Cityscapes) on labeled pixels.

    Plain CE is normalised by the valid-pixel count of the whole global batch (per process: that count
    divided by the number of processes), so 1 and N processes optimise the same loss."""
    if C.ohem:
        return ohem_ce(logits, target, C.ohem_thresh, C.ohem_min_kept * target.shape[0])
    denominator = all_reduce_sum(count_valid([target])) / world_size
    return ce_loss(logits, target, denominator=denominator)


def mix(u0: torch.Tensor, u1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The CutMix image: u1 pasted into u0 inside the boxes, u_m = u0 * (1 - m) + u1 * m."""
    return u0 * (1 - mask) + u1 * mask


def _finish(terms: Terms) -> Tuple[torch.Tensor, Terms]:
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}


def supervised_step(model: nn.Module, batch: Dict[str, torch.Tensor], C: EasyDict, device: torch.device,
                    world_size: int = 1) -> Tuple[torch.Tensor, Terms]:
    """The baseline: the network on labeled images only."""
    with autocast(device, C.amp):
        logits = model(batch["x_l"])
    return _finish({"sup": C.sup_weight * supervised_loss(C, logits, batch["y_l"], world_size)})


def cps_step(pair: nn.Module, batch: Dict[str, torch.Tensor], C: EasyDict, device: torch.device,
             world_size: int = 1) -> Tuple[torch.Tensor, Terms]:
    """Cross pseudo supervision with CutMix: each branch learns the other's pseudo-label of the mixed image.

    pair(x) returns the logits of both branches. The pseudo-labels come from the branches' predictions
    on u0 and u1, CutMix-combined (combine_cutmix), without gradient."""
    x_l, y_l, u0, u1, mask = batch["x_l"], batch["y_l"], batch["u0"], batch["u1"], batch["mask"]
    n_l, n_u = x_l.shape[0], u0.shape[0]
    with torch.no_grad(), autocast(device, C.amp):
        t_a, t_b = pair(torch.cat([u0, u1]))
    pseudo_a = combine_cutmix(*t_a.float().split(n_u), mask)
    pseudo_b = combine_cutmix(*t_b.float().split(n_u), mask)
    with autocast(device, C.amp):
        logits_a, logits_b = pair(torch.cat([x_l, mix(u0, u1, mask)]))
    sup_a, mix_a = logits_a.split([n_l, n_u])
    sup_b, mix_b = logits_b.split([n_l, n_u])
    terms = {"sup": C.sup_weight * (supervised_loss(C, sup_a, y_l, world_size)
                                    + supervised_loss(C, sup_b, y_l, world_size))}
    if C.cps_weight > 0:
        terms["cps"] = C.cps_weight * (pseudo_label_ce(mix_a, pseudo_b) + pseudo_label_ce(mix_b, pseudo_a))
    return _finish(terms)


class CPSPair(nn.Module):
    """The two branches of CPS: same architecture, different initialisation."""

    def __init__(self, branch_a: nn.Module, branch_b: nn.Module):
        super().__init__()
        self.branch_a, self.branch_b = branch_a, branch_b

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.branch_a(x), self.branch_b(x)


@torch.no_grad()
def teacher_predict(teacher: nn.Module, x: torch.Tensor, amp: str, with_decoder: bool,
                    channels_last: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A frozen teacher on all of its inputs in one call: (fp32 logits, decoder feature or None)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, amp):
        out = teacher(x, return_features=with_decoder)
    if with_decoder:
        return out["logits"].float(), out["decoder"].float()
    return out.float(), None


def mgd_step(student: nn.Module, teachers: Dict[str, nn.Module], batch: Dict[str, torch.Tensor], C: EasyDict,
             device: torch.device, world_size: int = 1) -> Tuple[torch.Tensor, Terms]:
    """Multi-granularity distillation from a deep teacher T_D and a wide teacher T_W (both frozen).

    The teachers see u0, u1, the mixed image u_m and x_l in one call each; the student sees x_l and u_m
    in one call. Only what carries a gradient to the student is computed (no reverse terms, no student
    pass on u0 and u1)."""
    x_l, y_l, u0, u1, mask = batch["x_l"], batch["y_l"], batch["u0"], batch["u1"], batch["mask"]
    n_l, n_u = x_l.shape[0], u0.shape[0]
    u_m = mix(u0, u1, mask)
    need_labeled = C.pixel_labeled_weight > 0
    teacher_in = torch.cat([u0, u1, u_m, x_l] if need_labeled else [u0, u1, u_m])
    sizes = [n_u, n_u, n_u] + ([n_l] if need_labeled else [])

    deep, _ = teacher_predict(teachers["deep"], teacher_in, C.amp, False, C.channels_last)
    wide, wide_feat = teacher_predict(teachers["wide"], teacher_in, C.amp, C.region_weight > 0, C.channels_last)
    deep, wide = deep.split(sizes), wide.split(sizes)

    with autocast(device, C.amp):
        out = student(torch.cat([x_l, u_m]), return_features=True)
    s_l, s_m = out["logits"].float().split([n_l, n_u])

    terms = {"sup": C.sup_weight * supervised_loss(C, s_l, y_l, world_size)}
    if C.pixel_unlabeled_weight > 0:
        terms["pix_u"] = C.pixel_unlabeled_weight * (pseudo_label_ce(s_m, (deep[0], deep[1]), mask)
                                                     + pseudo_label_ce(s_m, (wide[0], wide[1]), mask))
    if need_labeled:
        terms["pix_l"] = C.pixel_labeled_weight * (pseudo_label_ce(s_l, deep[3]) + pseudo_label_ce(s_l, wide[3]))
    if C.semantic_weight > 0:
        # lambda_1 was tuned for a sum over `semantic_batch` images per GPU: use the per-image mean times
        # that count, so the term does not change with batch size or process count.
        per_image = semantic_sensitive_loss(s_m, deep[2]) / n_u
        terms["semantic"] = C.semantic_weight * C.semantic_batch * per_image
    if C.region_weight > 0:
        f_student = out["decoder"][n_l:]
        f_wide = wide_feat.split(sizes)[2]
        terms["region"] = C.region_weight * content_aware_loss(f_student, f_wide, C.region_grid)
    return _finish(terms)
