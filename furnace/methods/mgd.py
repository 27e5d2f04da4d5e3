"""Multi-granularity distillation (MGD): a small student taught by two frozen CPS teachers.

The step's inputs are the student, the teachers (furnace.teachers.FrozenTeacher), the batch and the teachers'
pseudo-labels of u0, u1 and x_l. Those come either from the batch (teacher_labels='offline': maps made once
per image by furnace.teacher_labels, loaded and augmented with the images) or from the teachers' argmax on
the batch itself (online, as published); `mgd_step` is the same in both cases.
"""
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from easydict import EasyDict
from torch.utils.data import Dataset

from furnace import teacher_labels
from furnace.amp import autocast
from furnace.data import paste, paste_labels
from furnace.losses import content_aware_loss, pseudo_label_ce, semantic_sensitive_loss
from furnace.methods.base import Method, Terms, finish, scoped, supervised_loss
from furnace.teachers import ROLES, FrozenTeacher, load_teachers, precision_reason

Labels = Dict[str, Dict[str, Optional[torch.Tensor]]]  # role -> {"u0", "u1", "x_l"} -> (B,H,W) class indices


def offline_labels(batch: Dict[str, torch.Tensor]) -> Labels:
    """The offline teachers' pseudo-labels carried by the batch (furnace.sampling.training_batch names them
    teacher_<role>_u0, _u1 and _l); 255 where the crop is padding."""
    if "teacher_deep_u0" not in batch:
        raise ValueError("teacher_labels='offline' but the batch has no teacher pseudo-labels "
                         "(the datasets need .with_teacher_labels, see furnace.teacher_labels)")
    return {role: {"u0": batch[f"teacher_{role}_u0"], "u1": batch[f"teacher_{role}_u1"],
                   "x_l": batch.get(f"teacher_{role}_l")} for role in ROLES}


def mgd_step(student: nn.Module, teachers: Dict[str, FrozenTeacher], batch: Dict[str, torch.Tensor],
             labels: Optional[Labels], C: EasyDict, device: torch.device, world_size: int = 1
             ) -> Tuple[torch.Tensor, Terms]:
    """One MGD step from a deep teacher T_D and a wide teacher T_W:

        L = sup_weight * CE(s(x_l), y_l)                                           (labeled)
          + pixel_unlabeled_weight * sum_T CE(s(u_m), paste_labels(y_T(u0), y_T(u1), mask))   (pixel level)
          + pixel_labeled_weight * sum_T CE(s(x_l), y_T(x_l))
          + semantic_weight * gpu_batch * semantic_sensitive(s(u_m), T_D(u_m)) / n_u          (image level)
          + region_weight * content_aware(f_s(u_m), f_TW(u_m))                                (region level)

    with y_T the teacher's pseudo-labels (`labels`; None: the teachers' argmax on u0, u1 and x_l, computed
    here, as published) and u_m = paste(u0, u1, mask) the CutMix image. The teachers see u_m only for the
    image- and region-level terms (and, online, u0, u1 and x_l).

    network_calls='separate' (published): every network is called on each input on its own, the student on
    u0 and u1 (without gradient), u_m, then x_l. The published code uses the student's u0/u1 predictions only
    for reverse terms (teacher vs student pseudo-label) that carry no gradient, so those terms are not
    computed; the calls are kept because in train mode they update the student's BatchNorm running
    statistics, which evaluation uses (C.student_bn_calls=False skips them: the same gradients, other running
    statistics). 'joint': the student sees x_l and u_m in one call, each teacher all its inputs in one call."""
    x_l, y_l, u0, u1, mask = batch["x_l"], batch["y_l"], batch["u0"], batch["u1"], batch["mask"]
    n_l, n_u = x_l.shape[0], u0.shape[0]
    u_m = paste(u0, u1, mask)
    need_labeled = C.pixel_labeled_weight > 0
    separate = C.network_calls == "separate"
    if labels is None:
        views = {"u0": u0, "u1": u1, "u_m": u_m, **({"x_l": x_l} if need_labeled else {})}
        needed = {"deep": True, "wide": True}
    else:
        views = {"u_m": u_m}
        needed = {"deep": C.semantic_weight > 0, "wide": C.region_weight > 0}
    logits, wide_feat = {}, None
    for role in ROLES:
        if needed[role]:
            logits[role], feat = teachers[role].predict_views(views, separate, role == "wide" and C.region_weight > 0)
            wide_feat = feat if feat is not None else wide_feat
    if labels is None:
        labels = {role: {k: logits[role][k].argmax(1) if k in logits[role] else None for k in ("u0", "u1", "x_l")}
                  for role in ROLES}

    with autocast(device, C.amp):
        if separate:
            if C.student_bn_calls:  # no output is used: the calls move the BatchNorm running statistics
                with torch.no_grad():
                    student(u0), student(u1)
            out_m = student(u_m, return_features=True)
            s_l, s_m, f_m = student(x_l).float(), out_m["logits"].float(), out_m["decoder"]
        else:
            out = student(torch.cat([x_l, u_m]), return_features=True)
            (s_l, s_m), f_m = out["logits"].float().split([n_l, n_u]), out["decoder"][n_l:]

    deep, wide = labels["deep"], labels["wide"]
    terms = {"sup": C.sup_weight * supervised_loss(C, s_l, y_l, world_size)}
    if C.pixel_unlabeled_weight > 0:
        terms["pix_u"] = C.pixel_unlabeled_weight * (
            scoped(C, pseudo_label_ce, s_m, paste_labels(deep["u0"], deep["u1"], mask))
            + scoped(C, pseudo_label_ce, s_m, paste_labels(wide["u0"], wide["u1"], mask)))
    if need_labeled:
        terms["pix_l"] = C.pixel_labeled_weight * (scoped(C, pseudo_label_ce, s_l, deep["x_l"])
                                                   + scoped(C, pseudo_label_ce, s_l, wide["x_l"]))
    if C.semantic_weight > 0:
        # lambda_1 is published for a sum over the gpu_batch images of a GPU, averaged over GPUs: that is
        # gpu_batch x the per-image mean, in either loss scope, whatever the batch size or process count.
        per_image = semantic_sensitive_loss(s_m, logits["deep"]["u_m"]) / n_u
        terms["semantic"] = C.semantic_weight * C.gpu_batch * per_image
    if C.region_weight > 0:
        terms["region"] = C.region_weight * scoped(C, lambda fs, ft: content_aware_loss(fs, ft, C.region_grid),
                                                   f_m, wide_feat["u_m"])
    return finish(terms)


class MGD(Method):
    """The student; the teachers are loaded and prepared once, in prepare()."""

    uses_unlabeled = True

    def prepare(self, datasets: Dict[str, Dataset]) -> Dict[str, Dataset]:
        C, info = self.C, self.info
        self.log.info(f"teacher_precision={C.teacher_precision!r}: {precision_reason(C, info.device)}")
        self.teachers = load_teachers(C, info, datasets, self.log)
        if C.teacher_labels != "offline":
            return datasets
        start = time.time()
        root = teacher_labels.precompute(self.teachers, datasets, C, info)
        self.log.info(f"offline teacher labels in {root} ({time.time() - start:.0f} s to make or check)")
        return {split: ds.with_teacher_labels(root) for split, ds in datasets.items()}

    def step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Terms]:
        labels = offline_labels(batch) if self.C.teacher_labels == "offline" else None
        return mgd_step(model, self.teachers, batch, labels, self.C, self.info.device, self.info.world_size)


METHOD = MGD
