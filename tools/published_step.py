"""The MGD step scheduled as the published training code does it. FOR COMPARISON ONLY: never used to train.

tools/benchmark.py times it against furnace.methods.mgd.mgd_step, and tests/test_benchmark.py checks that
mgd_step under setting='published' gives the student the same gradients (train-mode BatchNorm, fp32).
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from easydict import EasyDict

from furnace.data import paste, paste_labels
from furnace.losses import IGNORE_INDEX, content_aware_loss, pseudo_label_ce, semantic_sensitive_loss
from furnace.methods.base import supervised_loss


def published_mgd_step(student: nn.Module, teachers: Dict[str, nn.Module], batch: Dict[str, torch.Tensor],
                       C: EasyDict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One MGD step as published. FOR COMPARISON ONLY.

    The loss terms and weights of furnace.methods.mgd.mgd_step (the same loss functions, so the gradient-
    carrying terms are identical), scheduled as published:
      * in the published order (docs/method.md): each teacher on u0 and u1; the student on u0 and u1 without
        gradient (those predictions only feed the reverse terms); the student, then each teacher, on
        u_m = paste(u0, u1, mask); the student, then each teacher, on x_l. Every call is separate, so in train
        mode each normalises with its own batch statistics and moves the BatchNorm running statistics in turn;
      * the teachers are plain networks, `net(x)` / `net(x, return_features=True)`, under no_grad, in
        whatever BatchNorm mode the caller left them (published: train mode);
      * the reverse terms CE(teacher logits, argmax student) are computed and added to the loss: teachers are
        frozen and an argmax carries no gradient, so they change the loss value, never the gradient;
      * fp32 NCHW (no autocast here), losses over the whole batch (one published GPU's batch)."""
    x_l, y_l, u0, u1, mask = batch["x_l"], batch["y_l"], batch["u0"], batch["u1"], batch["mask"]
    u_m = paste(u0, u1, mask)
    t: Dict[str, dict] = {role: {} for role in teachers}

    def teachers_on(name: str, x: torch.Tensor) -> None:  # one separate call per teacher
        with torch.no_grad():
            for role, net in teachers.items():
                if name == "u_m":
                    out = net(x, return_features=True)
                    t[role].update(u_m=out["logits"], f_m=out["decoder"])
                else:
                    t[role][name] = net(x)

    teachers_on("u0", u0)
    teachers_on("u1", u1)
    with torch.no_grad():                                  # only feeds the reverse terms
        s_u0, s_u1 = student(u0), student(u1)
    out_m = student(u_m, return_features=True)             # mixed forward, with gradient
    s_m, f_student = out_m["logits"].float(), out_m["decoder"]
    teachers_on("u_m", u_m)
    s_l = student(x_l).float()                             # labeled forward, with gradient
    teachers_on("x_l", x_l)
    deep, wide = t["deep"], t["wide"]

    def mixed_labels(logits_u0: torch.Tensor, logits_u1: torch.Tensor) -> torch.Tensor:
        return paste_labels(logits_u0.argmax(1), logits_u1.argmax(1), mask)

    terms = {"sup": C.sup_weight * supervised_loss(C, s_l, y_l, 1)}
    if C.pixel_unlabeled_weight > 0:
        terms["pix_u"] = C.pixel_unlabeled_weight * (pseudo_label_ce(s_m, mixed_labels(deep["u0"], deep["u1"]))
                                                     + pseudo_label_ce(s_m, mixed_labels(wide["u0"], wide["u1"])))
    if C.pixel_labeled_weight > 0:
        terms["pix_l"] = C.pixel_labeled_weight * (pseudo_label_ce(s_l, deep["x_l"].argmax(1))
                                                   + pseudo_label_ce(s_l, wide["x_l"].argmax(1)))
    if C.semantic_weight > 0:
        terms["semantic"] = C.semantic_weight * C.gpu_batch * semantic_sensitive_loss(s_m, deep["u_m"]) / u0.shape[0]
    if C.region_weight > 0:
        terms["region"] = C.region_weight * content_aware_loss(f_student, wide["f_m"], C.region_grid)
    # Reverse terms (published): each teacher's prediction against the student's pseudo-labels. No gradient.
    reverse = 0.0
    for role in ("deep", "wide"):
        teacher_mix = paste(t[role]["u0"], t[role]["u1"], mask).float()
        reverse = (reverse + F.cross_entropy(teacher_mix, mixed_labels(s_u0, s_u1), ignore_index=IGNORE_INDEX)
                   + F.cross_entropy(t[role]["x_l"].float(), s_l.argmax(1), ignore_index=IGNORE_INDEX))
    terms["reverse"] = C.pixel_unlabeled_weight * reverse
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}
