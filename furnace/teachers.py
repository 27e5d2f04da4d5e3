"""The frozen teachers of MGD: loaded, checked, frozen and prepared once, then `predict(x) -> logits, feature`.

Frozen teachers never change during training, so every choice about how they run is made once, when they
are loaded (`load_teachers`), and never revisited:
  - int8 (furnace.quantize) where teacher_precision asks for it and the copy agrees with the fp32 teacher;
  - otherwise, in eval mode (teacher_bn='eval'), each BatchNorm folded into the convolution before it:
    y = BN(conv(x)) with fixed statistics is an affine map per channel, W' = W g / sqrt(v + eps),
    b' = (b - m) g / sqrt(v + eps) + beta, so the folded copy gives the same logits up to rounding and skips
    one read and write of every activation per BatchNorm. On CPU it runs channels_last (NHWC, oneDNN's native
    layout: no reorder around each convolution). tools/benchmark.py's fast-setting row includes both gains.
  - with teacher_bn='train' (the published code: batch statistics) the network runs as it is.
"""
import copy
import logging
import os.path as osp
import time
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from easydict import EasyDict
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.utils.data import Dataset

from furnace.amp import autocast
from furnace.checkpoint import load_checkpoint, segmentor_from_checkpoint
from furnace.data import read_list
from furnace.distributed import DistInfo, synchronised_batchnorm
from furnace.quantize import Int8Teacher, argmax_agreement, int8_supported, quantize_teacher
from furnace.sampling import CALIBRATION, fixed_crops

ROLES = ("deep", "wide")
FOLD_CHECK_SIZE = 64  # side of the one small input on which a folded copy is checked against the teacher
# Device types on which the folded copy runs NHWC even when the config did not ask for channels_last (CPU:
# oneDNN's native layout, measured faster when this was chosen, README "Performance"; CUDA keeps C.channels_last).
INFERENCE_NHWC = {"cpu"}


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
    x = torch.randn(1, 3, FOLD_CHECK_SIZE, FOLD_CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    x = x.to(device=p.device, dtype=p.dtype)
    want, got = teacher(x, return_features=True)["logits"], folded(x, True)["logits"]
    if not torch.allclose(got, want, rtol=0, atol=1e-4 * float(want.abs().max().clamp(min=1))):
        return None
    return folded


class FrozenTeacher(nn.Module):
    """A teacher as distillation uses it: no gradients, no autograd state, fp32 outputs, prepared once.

    `network` is the segmentor as loaded (fp32; train mode for teacher_bn='train'). What `predict` runs is
    fixed here: `int8` (an Int8Teacher) if given; else, for an eval-mode network with fold_bn, its BN-folded
    copy (fold_batchnorm), NHWC when channels_last or on CPU; else the network, NHWC if channels_last.
    `amp` is the autocast mode of the fp32 paths ('off', 'bf16', 'fp16')."""

    def __init__(self, network: nn.Module, amp: str = "off", channels_last: bool = False, fold_bn: bool = True,
                 int8: Optional[Int8Teacher] = None):
        super().__init__()
        self.network, self.int8, self.amp = network, int8, amp
        self.training = network.training  # the mode the teacher runs in (train: batch statistics), for readers
        self.folded: Optional[nn.Module] = None
        device = next(network.parameters()).device
        eval_mode = not any(m.training for m in network.modules())
        self.nhwc = channels_last
        if int8 is None and fold_bn and eval_mode and device.type != "meta":
            nhwc = channels_last or device.type in INFERENCE_NHWC
            self.folded = fold_batchnorm(network, nhwc)
            self.nhwc = nhwc if self.folded is not None else channels_last

    @property
    def precision(self) -> str:
        """'int8', or the fp32 paths' autocast precision ('fp32', 'bf16', 'fp16')."""
        return "int8" if self.int8 is not None else ("fp32" if self.amp == "off" else self.amp)

    @property
    def evaluated(self) -> nn.Module:
        """The segmentor as evaluation runs it (furnace.evaluate): the int8 copy where chosen, else the network."""
        return self.int8 if self.int8 is not None else self.network

    @torch.no_grad()
    def predict(self, x: torch.Tensor, with_decoder: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(fp32 logits, fp32 decoder feature or None) of the images x."""
        if self.int8 is not None:
            out = self.int8(x, return_features=True)
            return out["logits"], (out["decoder"] if with_decoder else None)
        if self.nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, self.amp):
            out = self.folded(x, True) if self.folded is not None else self.network(x, return_features=with_decoder)
        if isinstance(out, dict):
            return out["logits"].float(), (out["decoder"].float() if with_decoder else None)
        return out.float(), None

    def predict_views(self, views: Dict[str, torch.Tensor], separate: bool, with_decoder: bool
                      ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
        """predict on each named input: one call per input (separate, as published: batch statistics per call
        in train mode) or one call on their concatenation."""
        if separate:
            outs = {k: self.predict(v, with_decoder) for k, v in views.items()}
            return {k: o[0] for k, o in outs.items()}, ({k: o[1] for k, o in outs.items()} if with_decoder else None)
        sizes = [v.shape[0] for v in views.values()]
        logits, feat = self.predict(torch.cat(list(views.values())), with_decoder)
        return (dict(zip(views, logits.split(sizes))),
                dict(zip(views, feat.split(sizes))) if feat is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)[0]


# ------------------------------------------------------------------------------------------ loading
def same_split(trained_with: str, current: str) -> bool:
    """Whether the split list a teacher was trained with is this run's: the same path, or a list of the same
    name holding the same images in any order (the data was copied or moved; if the old list is gone, the
    name decides)."""
    if trained_with == current:
        return True
    if osp.basename(trained_with) != osp.basename(current):
        return False
    if not osp.isfile(trained_with) or not osp.isfile(current):
        return True
    return set(read_list(trained_with)) == set(read_list(current))


def load_networks(C: EasyDict, info: DistInfo) -> Dict[str, nn.Module]:
    """The two teacher networks named in the config, checked against this run's data, frozen, in the mode of
    C.teacher_bn, on the run's device.

    With teacher_bn='train' a teacher normalises with batch statistics, which must then span the global
    batch (synchronised BatchNorm) for N processes to compute what one process does."""
    networks = {}
    for role in ROLES:
        path, network = C[f"teacher_{role}"], C[f"teacher_{role}_network"]
        if not path:
            raise ValueError(f"config: method 'mgd' needs teacher_{role} (a {network} checkpoint)")
        ckpt = load_checkpoint(path)
        teacher = segmentor_from_checkpoint(ckpt, path, network, C.num_classes, role=f"teacher_{role}")
        trained_on = ckpt.get("config", {})
        for key, same in (("dataset", lambda a, b: a == b), ("labeled_list", same_split)):
            if key in trained_on and not same(trained_on[key], C[key]):
                raise ValueError(f"teacher_{role} {path} was trained with {key}={trained_on[key]!r}, "
                                 f"this run has {key}={C[key]!r}")
        if C.teacher_bn == "train":
            teacher = synchronised_batchnorm(teacher, info)
        teacher.requires_grad_(False)  # after the BatchNorm conversion, whose new modules have fresh parameters
        teacher.train(C.teacher_bn == "train")
        if C.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        networks[role] = teacher.to(info.device)
    return networks


def load_teachers(C: EasyDict, info: DistInfo, datasets: Optional[Dict[str, Dataset]] = None,
                  log: Optional[logging.Logger] = None) -> Dict[str, FrozenTeacher]:
    """The two frozen teachers of the config, ready to predict: int8 where C.teacher_precision chooses it
    (int8_choice; needs `datasets` for calibration), BN-folded where they run in eval mode."""
    networks = load_networks(C, info)
    int8 = {}
    if use_int8(C, info.device):
        if datasets is None:
            raise ValueError("load_teachers: int8 teachers need the training datasets for calibration")
        int8 = int8_choice(networks, C, datasets, log or logging.getLogger(__name__))
    return {role: FrozenTeacher(net, C.amp, C.channels_last, int8=int8.get(role)) for role, net in networks.items()}


# --------------------------------------------------------------------------------------------- int8
def use_int8(C: EasyDict, device: torch.device) -> bool:
    """Whether to try int8 teachers: teacher_precision 'int8', or 'auto' on a CPU with int8 kernels."""
    if C.teacher_precision == "amp":
        return False
    why_not = ("teacher_bn='train' (batch statistics)" if C.teacher_bn == "train" else
               f"device {device.type}" if not int8_supported(device) else None)
    if why_not and C.teacher_precision == "int8":
        raise ValueError(f"config: teacher_precision='int8' is for eval-mode teachers on a CPU, not with {why_not}")
    return why_not is None


def precision_reason(C: EasyDict, device: torch.device) -> str:
    """What teacher_precision resolves to on `device` and why (a capability, then a measurement), for the logs."""
    if C.teacher_precision == "amp":
        return f"teachers at the student's precision (amp={C.amp!r})"
    if C.teacher_bn == "train":
        return f"teachers at amp={C.amp!r}: int8 needs eval-mode BatchNorm, and teacher_bn='train'"
    if not int8_supported(device):
        return f"teachers at amp={C.amp!r}: no int8 kernels on {device.type}"
    return ("int8 copies tried (CPU with the quantized engine), each kept where its measured argmax agreement "
            f"with fp32 reaches teacher_int8_min_agreement={C.teacher_int8_min_agreement}"
            + (" (kept whatever it is: teacher_precision='int8')" if C.teacher_precision == "int8" else ""))


def int8_copies(networks: Dict[str, nn.Module], C: EasyDict, datasets: Dict[str, Dataset]
                ) -> Dict[str, Tuple[Int8Teacher, float, float]]:
    """Per teacher: (int8 copy, its argmax agreement with the fp32 teacher on the valid pixels of
    C.teacher_check_images labeled crops, seconds to quantize and check). Calibration: the activation
    ranges of C.teacher_calibration_images unlabeled crops."""
    calib, _ = fixed_crops(datasets["unlabeled"], C, C.teacher_calibration_images, CALIBRATION)
    check, labels = fixed_crops(datasets["labeled"], C, C.teacher_check_images, CALIBRATION)
    out = {}
    for role, network in networks.items():
        start = time.time()
        int8 = quantize_teacher(network, calib.split(8))
        out[role] = (int8, argmax_agreement(int8, network, check, labels), time.time() - start)
    return out


def keeps_int8(C: EasyDict, agreement: float) -> bool:
    """The acceptance test of an int8 copy: forced by teacher_precision='int8', or its measured argmax
    agreement with the fp32 teacher reaches teacher_int8_min_agreement."""
    return C.teacher_precision == "int8" or agreement >= C.teacher_int8_min_agreement


def int8_choice(networks: Dict[str, nn.Module], C: EasyDict, datasets: Dict[str, Dataset],
                log: logging.Logger, report: Optional[dict] = None) -> Dict[str, Int8Teacher]:
    """The int8 copy of each teacher that passes keeps_int8 (teachers without one stay fp32), logged; `report`,
    if given, receives per role the check's agreement, its seconds and whether the copy was kept."""
    out = {}
    for role, (int8, agreement, seconds) in int8_copies(networks, C, datasets).items():
        keep = keeps_int8(C, agreement)
        if keep:
            out[role] = int8
        if report is not None:
            report[role] = dict(check_agreement=agreement, quantize_and_check_seconds=seconds, kept=keep,
                                check_images=C.teacher_check_images)
        log.info(f"teacher_{role}: int8 copy agrees with fp32 on {agreement:.4f} of the valid pixels of "
                 f"{C.teacher_check_images} labeled crops (teacher_int8_min_agreement={C.teacher_int8_min_agreement}, "
                 f"teacher_precision={C.teacher_precision!r}) -> {'int8' if keep else 'fp32'} teacher "
                 f"({seconds:.0f} s to quantize and check)")
    return out
