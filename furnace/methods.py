"""One training step of each method: `supervised`, `cps` (teachers) and `mgd` (student).

A step gets the models and one batch (dict: x_l, y_l labeled; u0, u1 unlabeled; mask the CutMix boxes,
1 where u1 is pasted into u0) and returns (total loss, {term name: detached value}).
Loss weights come from the config; a term whose weight is 0 is not computed.
"""
import copy
import itertools
import weakref
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from easydict import EasyDict
from torch.fx.experimental.optimization import fuse as fx_fuse

from furnace.distributed import all_reduce_sum
from furnace.losses import (ce_loss, combine_cutmix, content_aware_loss, count_valid, ohem_ce,
                            pseudo_label_ce, semantic_sensitive_loss)
from furnace.quantize import Int8Teacher

Terms = Dict[str, torch.Tensor]


def native_bf16() -> bool:
    """This CPU computes bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it). A capability, not a CPU name:
    it holds on every CPU seen (AVX2-only ones report False, AVX-512 BF16 ones True)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), 'off' elsewhere: on a CPU
    without them bf16 is emulated and several times slower than fp32 (README, "Performance")."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" or native_bf16() else "off"


def amp_reason(device: torch.device) -> str:
    """Why amp='auto' resolves as it does on `device`, for the logs."""
    if device.type == "cuda":
        return "CUDA: bf16 autocast"
    if native_bf16():
        return "CPU with native bf16 (oneDNN reports AVX512-BF16 or AMX): bf16 autocast"
    return "CPU without native bf16 (oneDNN reports no AVX512-BF16 / AMX; bf16 would be emulated, slower): fp32"


def autocast(device: torch.device, amp: str):
    """torch.amp autocast for 'bf16' / 'fp16', nothing for 'off'."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def per_gpu_mean(fn: Callable[..., torch.Tensor], group: int, *inputs) -> torch.Tensor:
    """mean_g fn(inputs of group g) over the k = batch / `group` groups of this process's batch; image j is in
    group j mod k (a tensor input is split along its first dimension, a tuple input element by element).

    This is what the published update is made of: each GPU computes every loss on its own `group` images, and
    the all-reduce / world size / DDP average turns these into a mean over GPUs (README, "Faithfulness to the
    paper"). The engine's sampler deals the global batch to W processes in turn (image i to process i mod W),
    so with groups taken in turn too, group g holds global images g, g + G, g + 2G, ... (G groups in all)
    whatever W: 1 and N processes compute the same groups, and a process of the run holds k = G / W of them."""
    first = inputs[0][0] if isinstance(inputs[0], tuple) else inputs[0]
    k = first.shape[0] // group

    def part(x, g):
        return tuple(part(t, g) for t in x) if isinstance(x, tuple) else x[g::k]
    return sum(fn(*(part(x, g) for x in inputs)) for g in range(k)) / k


def scoped(C: EasyDict, fn: Callable[..., torch.Tensor], *inputs) -> torch.Tensor:
    """fn on this process's whole batch (C.loss_scope='global'), or its mean over the published per-GPU groups
    of C.gpu_batch images ('per_gpu', see per_gpu_mean)."""
    if C.loss_scope == "per_gpu":
        return per_gpu_mean(fn, C.gpu_batch, *inputs)
    return fn(*inputs)


def supervised_loss(C: EasyDict, logits: torch.Tensor, target: torch.Tensor, world_size: int) -> torch.Tensor:
    """CE (OHEM CE on Cityscapes, keeping at least ohem_min_kept pixels per image of the batch it sees) on
    labeled pixels.

    loss_scope='per_gpu': the mean over the published per-GPU groups of each group's CE (its mean over the
    group's valid pixels; OHEM with min_kept for the group), as published. 'global': plain CE is normalised by
    the valid-pixel count of the whole global batch (per process: that count divided by the number of
    processes), so 1 and N processes optimise the same loss; OHEM sees the process's batch."""
    def labeled(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ohem_ce(s, y, C.ohem_thresh, C.ohem_min_kept * y.shape[0]) if C.ohem else ce_loss(s, y)
    if C.loss_scope == "per_gpu" or C.ohem:
        return scoped(C, labeled, logits, target)
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
    on u0 and u1, CutMix-combined (combine_cutmix), without gradient. network_calls='separate' calls the
    pair on u0, u1, u_m and x_l in turn, as published (BatchNorm statistics per call); 'joint' on u0+u1,
    then on x_l+u_m."""
    x_l, y_l, u0, u1, mask = batch["x_l"], batch["y_l"], batch["u0"], batch["u1"], batch["mask"]
    n_l, n_u = x_l.shape[0], u0.shape[0]
    u_m = mix(u0, u1, mask)
    separate = C.network_calls == "separate"
    with torch.no_grad(), autocast(device, C.amp):
        if separate:
            (a0, b0), (a1, b1) = pair(u0), pair(u1)
        else:
            (a0, a1), (b0, b1) = (t.split(n_u) for t in pair(torch.cat([u0, u1])))
    pseudo_a = combine_cutmix(a0.float(), a1.float(), mask)
    pseudo_b = combine_cutmix(b0.float(), b1.float(), mask)
    with autocast(device, C.amp):
        if separate:
            mix_a, mix_b = pair(u_m)
            sup_a, sup_b = pair(x_l)
        else:
            (sup_a, mix_a), (sup_b, mix_b) = (t.split([n_l, n_u]) for t in pair(torch.cat([x_l, u_m])))
    terms = {"sup": C.sup_weight * (supervised_loss(C, sup_a, y_l, world_size)
                                    + supervised_loss(C, sup_b, y_l, world_size))}
    if C.cps_weight > 0:
        terms["cps"] = C.cps_weight * (scoped(C, pseudo_label_ce, mix_a, pseudo_b)
                                       + scoped(C, pseudo_label_ce, mix_b, pseudo_a))
    return _finish(terms)


class CPSPair(nn.Module):
    """The two branches of CPS: same architecture, different initialisation."""

    def __init__(self, branch_a: nn.Module, branch_b: nn.Module):
        super().__init__()
        self.branch_a, self.branch_b = branch_a, branch_b

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.branch_a(x), self.branch_b(x)


# ------------------------------------------------------------------------------ frozen-teacher inference
# An eval-mode teacher computes y = BN(conv(x)) with fixed statistics, an affine map per channel that can be
# folded into the convolution once: W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta.
# The folded copy skips one full read and write of every activation per BatchNorm and gives the same logits
# up to float rounding. It is built on first use (a second or so), kept per teacher and memory format
# (weakly, so it goes away with the teacher) and rebuilt when any of the teacher's tensors changes
# (load_state_dict, .to()). On CPU the folded copy runs channels_last (NHWC, oneDNN's native layout: no
# reorder around each convolution), which is where most of its speed comes from (tools/benchmark.py measures
# it; figures in README, "Performance").
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, Dict[bool, Tuple[tuple, Optional[nn.Module]]]]" = \
    weakref.WeakKeyDictionary()
_FOLD_CHECK_SIZE = 64  # side of the one small input on which a new folded copy is checked against the teacher
# Device types on which the folded copy runs NHWC even when the caller did not ask for channels_last (CPU:
# measured faster, see above; CUDA keeps the caller's choice, C.channels_last).
_INFERENCE_NHWC = {"cpu"}


def _tensors_key(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced, moved or modified in place."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in itertools.chain(module.parameters(), module.buffers()))


@torch.no_grad()
def fold_batchnorm(teacher: nn.Module, channels_last: bool = False) -> Optional[nn.Module]:
    """A copy of an eval-mode segmentor with every BatchNorm that directly follows a convolution folded into
    that convolution; called as copy(x, True) it returns teacher(x, return_features=True).

    Uses torch.fx (symbolic trace, then conv-BN fusion). Returns None when the network cannot be traced or
    the copy does not reproduce the teacher on a small check input (relative max difference > 1e-4)."""
    try:
        traced = fx.symbolic_trace(copy.deepcopy(teacher), concrete_args={"return_features": True})
        folded = fx_fuse(traced, inplace=True, no_trace=True).eval()
    except Exception:  # noqa: BLE001 -- any untraceable network simply keeps the plain path
        return None
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    p = next(teacher.parameters())
    x = torch.randn(1, 3, _FOLD_CHECK_SIZE, _FOLD_CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    x = x.to(device=p.device, dtype=p.dtype)
    want, got = teacher(x, return_features=True)["logits"], folded(x, True)["logits"]
    if not torch.allclose(got, want, rtol=0, atol=1e-4 * float(want.abs().max().clamp(min=1))):
        return None
    return folded


def folded_teacher(teacher: nn.Module, channels_last: bool) -> Optional[nn.Module]:
    """The cached BN-folded copy of `teacher` (NHWC weights if channels_last), or None if the teacher (any of
    its modules) is in train mode or cannot be folded."""
    if any(m.training for m in teacher.modules()):
        return None  # batch statistics (teacher_bn='train'): nothing fixed to fold
    key = _tensors_key(teacher)
    per_format = _FOLDED.setdefault(teacher, {})
    cached = per_format.get(channels_last)
    if cached is None or cached[0] != key:
        cached = per_format[channels_last] = (key, fold_batchnorm(teacher, channels_last))
    return cached[1]


@torch.no_grad()
def teacher_predict(teacher: nn.Module, x: torch.Tensor, amp: str, with_decoder: bool,
                    channels_last: bool = False, fold_bn: bool = True
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A frozen teacher on all of its inputs in one call: (fp32 logits, decoder feature or None).

    No autograd state is kept (no_grad; the teachers' parameters do not require gradients). In eval mode,
    and with fold_bn, the teacher's BatchNorms are folded into its convolutions (see fold_batchnorm) and
    that copy runs NHWC when `channels_last` or on CPU (measured faster there); otherwise the teacher runs
    as it is, NHWC if `channels_last`. `amp` is the autocast mode ('off', 'bf16', 'fp16')."""
    if isinstance(teacher, Int8Teacher):  # already BN-folded and quantized (furnace.quantize); fp32 outputs
        out = teacher(x, return_features=True)
        return out["logits"], (out["decoder"] if with_decoder else None)
    fast = None
    if fold_bn and x.device.type != "meta":
        nhwc = channels_last or x.device.type in _INFERENCE_NHWC
        fast = folded_teacher(teacher, nhwc)
    if fast is None:
        nhwc = channels_last
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, amp):
        out = fast(x, True) if fast is not None else teacher(x, return_features=with_decoder)
    if isinstance(out, dict):
        return out["logits"].float(), (out["decoder"].float() if with_decoder else None)
    return out.float(), None


def teacher_views(teacher: nn.Module, views: Dict[str, torch.Tensor], C: EasyDict, with_decoder: bool
                  ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """A frozen teacher's fp32 logits (and decoder features) on each named input: one call per input
    (C.network_calls='separate', as published) or one call on their concatenation ('joint')."""
    if C.network_calls == "separate":
        outs = {k: teacher_predict(teacher, v, C.amp, with_decoder, C.channels_last) for k, v in views.items()}
        return {k: o[0] for k, o in outs.items()}, ({k: o[1] for k, o in outs.items()} if with_decoder else None)
    sizes = [v.shape[0] for v in views.values()]
    logits, feat = teacher_predict(teacher, torch.cat(list(views.values())), C.amp, with_decoder, C.channels_last)
    return (dict(zip(views, logits.split(sizes))),
            dict(zip(views, feat.split(sizes))) if feat is not None else None)


def mgd_step(student: nn.Module, teachers: Dict[str, nn.Module], batch: Dict[str, torch.Tensor], C: EasyDict,
             device: torch.device, world_size: int = 1) -> Tuple[torch.Tensor, Terms]:
    """Multi-granularity distillation from a deep teacher T_D and a wide teacher T_W (both frozen).

    Online teachers (C.teacher_labels='online') see u0, u1, the mixed image u_m and x_l. Offline teachers
    ('offline') see u_m only, and only for the image- and region-level terms: their pseudo-labels of u0, u1
    and x_l come with the batch ('<role>_u0', '<role>_u1', '<role>_l', made once per image by
    furnace.teacher_labels).

    network_calls='separate' (published): every network is called on each input on its own, the student on
    u0 and u1 (without gradient), u_m, then x_l. The published code uses the student's u0/u1 predictions only
    for reverse terms (teacher vs student pseudo-label) that carry no gradient, so those terms are not
    computed; the calls are kept because in train mode they update the student's BatchNorm running
    statistics, which evaluation uses (C.student_bn_calls=False skips them: the same gradients, other running
    statistics). 'joint': the student sees x_l and u_m in one call, each teacher all
    its inputs in one call."""
    x_l, y_l, u0, u1, mask = batch["x_l"], batch["y_l"], batch["u0"], batch["u1"], batch["mask"]
    n_l, n_u = x_l.shape[0], u0.shape[0]
    u_m = mix(u0, u1, mask)
    need_labeled = C.pixel_labeled_weight > 0
    offline = C.teacher_labels == "offline"
    separate = C.network_calls == "separate"
    if offline and "deep_u0" not in batch:
        raise ValueError("teacher_labels='offline' but the batch has no teacher pseudo-labels "
                         "(the datasets need furnace.teacher_labels.attach)")
    if offline:
        views = {"u_m": u_m}
        needed = {"deep": C.semantic_weight > 0, "wide": C.region_weight > 0}
    else:
        views = {"u0": u0, "u1": u1, "u_m": u_m, **({"x_l": x_l} if need_labeled else {})}
        needed = {"deep": True, "wide": True}
    logits, wide_feat = {}, None
    for role in ("deep", "wide"):
        if needed[role]:
            logits[role], feat = teacher_views(teachers[role], views, C, role == "wide" and C.region_weight > 0)
            wide_feat = feat if feat is not None else wide_feat
    if offline:  # integer pseudo-labels, 255 where the crop is padding
        pseudo = {role: {"u0": batch[f"{role}_u0"], "u1": batch[f"{role}_u1"], "x_l": batch.get(f"{role}_l")}
                  for role in ("deep", "wide")}
    else:
        pseudo = logits

    with autocast(device, C.amp):
        if separate:
            if C.get("student_bn_calls", True):  # no output is used: the calls move the BatchNorm running statistics
                with torch.no_grad():
                    student(u0), student(u1)
            out_m = student(u_m, return_features=True)
            s_l, s_m, f_m = student(x_l).float(), out_m["logits"].float(), out_m["decoder"]
        else:
            out = student(torch.cat([x_l, u_m]), return_features=True)
            (s_l, s_m), f_m = out["logits"].float().split([n_l, n_u]), out["decoder"][n_l:]

    deep, wide = pseudo["deep"], pseudo["wide"]
    terms = {"sup": C.sup_weight * supervised_loss(C, s_l, y_l, world_size)}
    if C.pixel_unlabeled_weight > 0:
        terms["pix_u"] = C.pixel_unlabeled_weight * (scoped(C, pseudo_label_ce, s_m, (deep["u0"], deep["u1"]), mask)
                                                     + scoped(C, pseudo_label_ce, s_m, (wide["u0"], wide["u1"]), mask))
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
    return _finish(terms)
