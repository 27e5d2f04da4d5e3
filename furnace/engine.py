"""The training engine: data streams, models, optimiser, checkpoints and the loop, for every method.

Determinism: the augmentation of every sample is a pure function of (seed, stream, epoch, position in the
epoch) and the CutMix boxes of every step a function of (seed, iteration). Training state is therefore
just weights, optimiser and iteration counter, which makes `--resume` exact and lets 1 and N processes
see the same global batch.
"""
import argparse
import glob
import json
import logging
import math
import os
import os.path as osp
import resource
import time
from contextlib import nullcontext
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from easydict import EasyDict
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from furnace import run, teacher_labels
from furnace.checkpoint import load_checkpoint, save_checkpoint, segmentor_from_checkpoint
from furnace.config import config_from_cli, crop_hw
from furnace.data import read_list
from furnace.distributed import DistInfo, all_reduce_sum, convert_sync_batchnorm, init_distributed
from furnace.evaluate import evaluate_dataset
from furnace.metrics import iou_per_class, mean_iou
from furnace.methods import CPSPair, amp_reason, cps_step, mgd_step, resolve_amp, supervised_step
from furnace.models import build_segmentor, zero_init_residual_
from furnace.quantize import Int8Teacher, argmax_agreement, int8_supported, quantize_teacher

LABELED, UNLABELED_0, UNLABELED_1, CUTMIX, CALIBRATION = 0, 1, 2, 3, 4  # random streams


# ----------------------------------------------------------------------------------------------- data
class EpochSampler(Sampler):
    """One epoch of one process's samples, each as (index, augmentation key).

    The epoch's global order is a seeded shuffle (repeated as needed) cut into global batches of
    `global_batch`; process r takes positions r, r + W, r + 2W, ... of each global batch. `start` skips the
    epoch's first `start` global batches (a resume in the middle of an epoch) without reading them."""

    def __init__(self, n: int, global_batch: int, iters: int, seed: int, stream: int, epoch: int,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.global_batch, self.iters, self.start = n, global_batch, iters, start
        self.key = (seed, stream, epoch)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Tuple[int, Tuple[int, ...]]]:
        rng = np.random.default_rng(self.key)
        total = self.iters * self.global_batch
        order = np.concatenate([rng.permutation(self.n) for _ in range(math.ceil(total / self.n))])
        for pos in range(self.start * self.global_batch + self.rank, total, self.world_size):
            yield int(order[pos]), self.key + (pos,)

    def __len__(self) -> int:
        return (self.iters - self.start) * self.global_batch // self.world_size


def stream_loader(dataset: Dataset, C: EasyDict, info: DistInfo, stream: int, epoch: int, iters: int,
                  start: int = 0) -> DataLoader:
    sampler = EpochSampler(len(dataset), C.batch_size, iters, C.seed, stream, epoch, info.rank, info.world_size,
                           start)
    return DataLoader(dataset, batch_size=C.batch_size // info.world_size, sampler=sampler,
                      num_workers=C.num_workers, pin_memory=info.device.type == "cuda", drop_last=False)


def training_batch(labeled: dict, unlabeled_0: dict, unlabeled_1: dict) -> Dict[str, torch.Tensor]:
    """One step's batch from the three streams' samples: x_l, y_l, u0, u1, and with offline teachers
    (furnace.teacher_labels) each teacher's pseudo-labels <role>_l, <role>_u0, <role>_u1."""
    batch = {"x_l": labeled["image"], "y_l": labeled["label"], "u0": unlabeled_0["image"], "u1": unlabeled_1["image"]}
    for role in teacher_labels.ROLES:
        if f"teacher_{role}" in unlabeled_0:
            batch.update({f"{role}_l": labeled[f"teacher_{role}"], f"{role}_u0": unlabeled_0[f"teacher_{role}"],
                          f"{role}_u1": unlabeled_1[f"teacher_{role}"]})
    return batch


def cutmix_masks(C: EasyDict, info: DistInfo, iteration: int) -> torch.Tensor:
    """This process's share of the step's global batch of CutMix masks."""
    from furnace.data import cutmix_box_mask
    seed = int(np.random.SeedSequence([C.seed, CUTMIX, iteration]).generate_state(1)[0])
    h, w = crop_hw(C.crop_size)
    masks = cutmix_box_mask(C.batch_size, h, w, generator=torch.Generator().manual_seed(seed),
                            toggle_overlaps=C.cutmix_overlap == "toggle")
    return masks[info.rank::info.world_size]


def micro_batches(n: int, group: int, accum: int) -> List[torch.Tensor]:
    """Indices cutting a process batch of n images into `accum` micro-batches (gradient accumulation), each
    made of whole groups of `group` images (image j is in group j mod n // group, as furnace.methods.per_gpu_mean
    groups them) and ordered so that per_gpu_mean finds the same groups in the micro-batch.

    Micro-batch m holds the process's groups m * q ... (m + 1) * q - 1 (q = groups per micro-batch). The
    sampler deals global groups to processes in turn, so over all processes micro-batch m holds global groups
    m * Q ... (m + 1) * Q - 1 whatever the process count: BatchNorm (synchronised across processes) normalises
    the same images in 1 and N processes. With group 1 (loss_scope='global') it is the m-th contiguous slice."""
    k = n // group
    q = k // accum
    return [torch.tensor([m * q + g + k * t for t in range(group) for g in range(q)]) for m in range(accum)]


def peak_memory(device: torch.device) -> str:
    """This process's peak memory so far: CUDA memory allocated by tensors, or on CPU the peak resident set."""
    if device.type == "cuda":
        return f"peak_mem={torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}MiB(cuda)"
    return f"peak_mem={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MiB(rss)"  # KiB on Linux


def build_datasets(C: EasyDict) -> Dict[str, Dataset]:
    """The training datasets the method needs, checked file by file before any training."""
    from furnace.data import build_dataset, check_dataset
    splits = ["labeled"] + (["unlabeled"] if C.method in ("cps", "mgd") else [])
    datasets = {s: build_dataset(C, s) for s in splits}
    for ds in datasets.values():
        check_dataset(ds)
    return datasets


def val_interval(C: EasyDict) -> int:
    """Epochs between validations during training (C.val_every; None: about five per run; 0: none)."""
    return math.ceil(C.epochs / 5) if C.val_every is None else C.val_every


def validation_dataset(C: EasyDict) -> Dataset:
    """The val list for validation during training, checked before training (file headers only: fast), cut to
    C.val_images images spread evenly over the list (the same ones every time)."""
    from furnace.data import build_dataset, check_dataset
    try:
        dataset = build_dataset(C, "val")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"validation during training: {e}; set val_list=, or val_every=0 to train "
                                f"without validation") from None
    check_dataset(dataset, decode_images=False)
    if C.val_images is not None and C.val_images < len(dataset):
        dataset = Subset(dataset, np.linspace(0, len(dataset) - 1, C.val_images).round().astype(int).tolist())
    return dataset


# ----------------------------------------------------------------------------------------- teachers
def synchronised_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """BatchNorm with statistics over the global batch: PyTorch's SyncBatchNorm on CUDA when distributed,
    furnace's ProcessSyncBatchNorm on CPU, even in a single process.

    Why even with one CPU process: PyTorch's CPU BatchNorm and ProcessSyncBatchNorm round differently in the
    last bit, and randomly initialised BatchNorm networks amplify last-bit differences enormously (on
    MobileNet-v2, weights 1 ulp apart give next gradients ~0.3% apart), so a 1-process run matches an
    N-process run only if both run the same BatchNorm arithmetic (with PyTorch's BatchNorm in the 1-process
    run, the weights of the two differed by 0.6% after a single step)."""
    if info.distributed or info.device.type == "cpu":
        return convert_sync_batchnorm(model, info.device)
    return model


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


def load_teachers(C: EasyDict, info: DistInfo, datasets: Optional[Dict[str, Dataset]] = None,
                  log: Optional[logging.Logger] = None) -> Dict[str, nn.Module]:
    """The two frozen teachers named in the config, checked before any training; int8 copies of them where
    C.teacher_precision asks for it (see int8_teachers; needs `datasets` for the calibration images).

    With teacher_bn='train' a teacher normalises with batch statistics, which must then span the global
    batch (synchronised BatchNorm) for N processes to compute what one process does."""
    teachers = {}
    for role in ("deep", "wide"):
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
        teachers[role] = teacher.to(info.device)
    if use_int8_teachers(C, info.device):
        if datasets is None:
            raise ValueError("load_teachers: int8 teachers need the training datasets for calibration")
        teachers = int8_teachers(teachers, C, datasets, log or logging.getLogger(__name__))
    return teachers


def use_int8_teachers(C: EasyDict, device: torch.device) -> bool:
    """Whether to try int8 teachers: teacher_precision 'int8', or 'auto' on a CPU with int8 kernels."""
    if C.teacher_precision == "amp":
        return False
    why_not = ("teacher_bn='train' (batch statistics)" if C.teacher_bn == "train" else
               f"device {device.type}" if not int8_supported(device) else None)
    if why_not and C.teacher_precision == "int8":
        raise ValueError(f"config: teacher_precision='int8' is for eval-mode teachers on a CPU, not with {why_not}")
    return why_not is None


def teacher_precision_reason(C: EasyDict, device: torch.device) -> str:
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


def transformed_images(dataset: Dataset, C: EasyDict, count: int, stream: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`count` training crops (images, labels or None) spread over `dataset`, augmented by the training transform
    with keys of their own: the same on every process and every run."""
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    samples = [dataset[(int(i), (C.seed, stream, 0, pos))] for pos, i in enumerate(indices)]
    labels = torch.stack([s["label"] for s in samples]) if all("label" in s for s in samples) else None
    return torch.stack([s["image"] for s in samples]), labels


def int8_copies(teachers: Dict[str, nn.Module], C: EasyDict, datasets: Dict[str, Dataset]
                ) -> Dict[str, Tuple[nn.Module, float, float]]:
    """Per teacher: (int8 copy, its argmax agreement with the fp32 teacher on the valid pixels of
    C.teacher_check_images labeled crops, seconds to quantize and check). Calibration: the activation
    ranges of C.teacher_calibration_images unlabeled crops."""
    calib, _ = transformed_images(datasets["unlabeled"], C, C.teacher_calibration_images, CALIBRATION)
    check, labels = transformed_images(datasets["labeled"], C, C.teacher_check_images, CALIBRATION)
    out = {}
    for role, teacher in teachers.items():
        start = time.time()
        int8 = quantize_teacher(teacher, calib.split(8))
        out[role] = (int8, argmax_agreement(int8, teacher, check, labels), time.time() - start)
    return out


def keeps_int8(C: EasyDict, agreement: float) -> bool:
    """The acceptance test of an int8 copy: forced by teacher_precision='int8', or its measured argmax
    agreement with the fp32 teacher reaches teacher_int8_min_agreement."""
    return C.teacher_precision == "int8" or agreement >= C.teacher_int8_min_agreement


def int8_teachers(teachers: Dict[str, nn.Module], C: EasyDict, datasets: Dict[str, Dataset],
                  log: logging.Logger) -> Dict[str, nn.Module]:
    """Each teacher replaced by its int8 copy (furnace.quantize) where the copy agrees with the fp32 teacher
    on at least C.teacher_int8_min_agreement of the checked pixels (always, with teacher_precision='int8')."""
    out = {}
    for role, (int8, agreement, seconds) in int8_copies(teachers, C, datasets).items():
        keep = keeps_int8(C, agreement)
        out[role] = int8 if keep else teachers[role]
        log.info(f"teacher_{role}: int8 copy agrees with fp32 on {agreement:.4f} of the valid pixels of "
                 f"{C.teacher_check_images} labeled crops (teacher_int8_min_agreement={C.teacher_int8_min_agreement}, "
                 f"teacher_precision={C.teacher_precision!r}) -> {'int8' if keep else 'fp32'} teacher "
                 f"({seconds:.0f} s to quantize and check)")
    return out


# ------------------------------------------------------------------------------------ optimisation
def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on conv and linear weights only; none on BatchNorm parameters and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def poly_lr(C: EasyDict, iteration: int, total: int) -> float:
    """lr * (1 - it / total) ^ power, after an optional linear warm-up."""
    if iteration < C.warmup_iters:
        return C.lr * (iteration + 1) / C.warmup_iters
    return C.lr * (1 - iteration / total) ** C.lr_power


# ---------------------------------------------------------------------------------------- the loop
class Trainer:
    """Holds a run's state. `fit()` trains to C.epochs, resuming from the last checkpoint if asked."""

    def __init__(self, C: EasyDict, resume: bool = False):
        self.C, self.resume = C, resume
        self.info = init_distributed(C.device)
        if C.batch_size % self.info.world_size:
            raise ValueError(f"config: batch_size={C.batch_size} is not divisible by the "
                             f"{self.info.world_size} processes")
        if C.loss_scope == "per_gpu" and (C.batch_size // self.info.world_size) % C.gpu_batch:
            raise ValueError(f"config: loss_scope='per_gpu' computes each loss on groups of gpu_batch={C.gpu_batch} "
                             f"images, and {self.info.world_size} processes hold {C.batch_size // self.info.world_size} "
                             f"each (batch_size={C.batch_size}); use a process count that divides "
                             f"{C.batch_size // C.gpu_batch}, or loss_scope='global'")
        per_process = C.batch_size // self.info.world_size
        group = C.gpu_batch if C.loss_scope == "per_gpu" else 1
        if (per_process // group) % C.accum_steps:
            raise ValueError(f"config: accum_steps={C.accum_steps} must divide the {per_process // group} "
                             + (f"per-GPU groups of gpu_batch={C.gpu_batch} images " if group > 1 else "images ")
                             + f"each of the {self.info.world_size} processes holds (batch_size={C.batch_size}): "
                             f"every micro-batch holds whole groups; use an accum_steps that divides it")
        requested_amp, C.amp = C.amp, resolve_amp(C.amp, self.info.device)
        if C.amp == "fp16" and self.info.device.type != "cuda":
            raise ValueError("config: amp='fp16' needs CUDA; use 'bf16' or 'off' on CPU")
        self.snapshot_dir = osp.join(C.output_dir, "snapshot")
        self.log = self._make_logger()
        self.log.info(f"amp={requested_amp!r} -> {C.amp!r}"
                      + (f" ({amp_reason(self.info.device)})" if requested_amp == "auto" else " (set in the config)"))
        if C.method == "mgd":
            self.log.info(f"teacher_precision={C.teacher_precision!r}: {teacher_precision_reason(C, self.info.device)}")

        self.datasets = build_datasets(C)
        self.teachers = load_teachers(C, self.info, self.datasets, self.log) if C.method == "mgd" else None
        if C.method == "mgd" and C.teacher_labels == "offline":
            self._offline_teacher_labels()
        torch.manual_seed(C.seed)  # same initialisation on every process
        if C.method == "cps":
            model = CPSPair(self._new_network(), self._new_network())
        else:
            model = self._new_network()
        self.model = synchronised_batchnorm(model, self.info).to(self.info.device)
        if C.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # fused: one kernel over all parameters instead of a loop of small ops per parameter
        self.optimizer = torch.optim.SGD(param_groups(self.model, C.weight_decay), lr=C.lr, momentum=C.momentum,
                                         fused=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=C.amp == "fp16")
        sizes = [len(d) for d in self.datasets.values()]
        if "unlabeled" not in self.datasets and C.get("unlabeled_list") and osp.isfile(C.unlabeled_list):
            # the supervised baseline gets the semi-supervised runs' schedule (same iterations per epoch, same
            # epochs), not one pass over the few labeled images per epoch: the comparison is at equal updates
            sizes.append(len(read_list(C.unlabeled_list)))
        self.iters_per_epoch = C.iters_per_epoch or max(sizes) // C.batch_size
        if self.iters_per_epoch < 1:
            raise ValueError(f"config: batch_size={C.batch_size} exceeds the training set ({max(sizes)} images)")
        self.total_iters = C.epochs * self.iters_per_epoch
        self.epoch, self.train_seconds = 0, 0.0
        self.skip = 0  # iterations of self.epoch done before a resume in the middle of it
        self.resume_rng = None  # the RNG state to continue from, once that epoch's loaders have started
        self.last_losses: Dict[str, float] = {}  # the loss terms of the last step (averaged over processes)
        self.val_every = val_interval(C)
        self.val_set = validation_dataset(C) if self.val_every else None
        # validations so far ({epoch, miou, iou, seconds}) and the best one, kept in every checkpoint so that
        # best.pth and the history survive a restart
        self.val_history: List[dict] = []
        self.val_best: Optional[dict] = None
        self._new_best = False
        if resume:
            self._restore()
        self.step_model = self.model
        if self.info.distributed:
            self.step_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.info.device.index] if self.info.device.type == "cuda" else None,
                broadcast_buffers=False)

    def _offline_teacher_labels(self) -> None:
        """Each teacher's pseudo-label of every training image, made once (furnace.teacher_labels) and
        loaded by the datasets from then on."""
        amp = "fp32" if self.C.amp == "off" else self.C.amp
        precisions = {r: "int8" if isinstance(t, Int8Teacher) else amp for r, t in self.teachers.items()}
        start = time.time()
        root = teacher_labels.precompute(self.teachers, self.datasets, self.C, self.info, precisions)
        teacher_labels.attach(self.datasets, root)
        self.log.info(f"offline teacher labels in {root} ({time.time() - start:.0f} s to make or check)")

    def _new_network(self) -> nn.Module:
        model = build_segmentor(self.C.network, self.C.num_classes, pretrained=self.C.pretrained,
                                output_stride=self.C.output_stride)
        if self.C.zero_init_residual:
            if self.C.pretrained:
                raise ValueError("config: zero_init_residual is for training from scratch; it would reset "
                                 f"part of the pretrained weights {self.C.pretrained}")
            zero_init_residual_(model.backbone)
        if model.backbone.pretrained_load is not None:
            self.log.info(f"pretrained {self.C.pretrained}: {model.backbone.pretrained_load.describe()}")
        return model

    def _make_logger(self) -> logging.Logger:
        log = logging.getLogger(f"furnace.{self.C.exp_name}.{id(self)}")
        log.setLevel(logging.INFO)
        log.propagate = False
        if self.info.is_main:
            os.makedirs(self.C.output_dir, exist_ok=True)
            handler = logging.FileHandler(osp.join(self.C.output_dir, "train.log"))
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)
        return log

    @property
    def deployable(self) -> nn.Module:
        """What a checkpoint's 'model' holds: the student, or CPS branch a (the teacher to distil from)."""
        return self.model.branch_a if isinstance(self.model, CPSPair) else self.model

    def _restore(self) -> None:
        path = osp.join(self.snapshot_dir, "last.pth")
        if self.info.is_main:  # partial files of writes cut short by a crash (save_checkpoint's temporaries)
            for stale in glob.glob(osp.join(self.snapshot_dir, "*.pth.tmp.*")):
                os.remove(stale)
                self.log.info(f"--resume: removed {stale}, a checkpoint write cut short by a crash")
        if not osp.isfile(path):
            self.log.info(f"--resume: no checkpoint at {path}, starting from scratch")
            return
        ckpt = load_checkpoint(path)
        if ckpt.get("method") != self.C.method or ckpt["network"] != self.C.network:
            raise ValueError(f"--resume: {path} is a {ckpt.get('method')} {ckpt['network']} run, this config "
                             f"trains {self.C.method} {self.C.network}")
        if "optimizer" not in ckpt:
            raise RuntimeError(f"--resume: {path} holds no optimiser state")
        if ckpt["num_classes"] != self.C.num_classes:
            raise ValueError(f"--resume: {path} predicts {ckpt['num_classes']} classes, this config has "
                             f"num_classes={self.C.num_classes}; resume with num_classes={ckpt['num_classes']}, "
                             f"or train the new setting in its own output_dir")
        model_state = ckpt["model"]
        if isinstance(self.model, CPSPair):
            model_state = {**{f"branch_a.{k}": v for k, v in ckpt["model"].items()},
                           **{f"branch_b.{k}": v for k, v in ckpt["model_b"].items()}}
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt.get("scaler", {}))
        torch.set_rng_state(ckpt["rng"])
        self.epoch, self.train_seconds = ckpt["epoch"], ckpt["train_seconds"]
        self.val_history = list(ckpt.get("val", {}).get("history", []))
        self.val_best = ckpt.get("val", {}).get("best")
        self.skip = ckpt.get("iteration", self.epoch * self.iters_per_epoch) - self.epoch * self.iters_per_epoch
        if self.skip:  # saved after the epoch's DataLoaders drew their seeds from it: restore it after they do
            self.resume_rng = ckpt["rng"]
        if not 0 <= self.skip < self.iters_per_epoch:
            raise ValueError(f"--resume: {path} is at iteration {ckpt.get('iteration')}, epoch {self.epoch}, which "
                             f"does not fit iters_per_epoch={self.iters_per_epoch}")
        self.log.info(f"resumed from {path} at epoch {self.epoch}"
                      + (f", iteration {self.skip} of epoch {self.epoch + 1}" if self.skip else ""))

    def _save(self, iteration: Optional[int] = None, train_seconds: Optional[float] = None) -> None:
        """At the end of epoch self.epoch (epoch-N.pth every save_every epochs, and last.pth); with `iteration`,
        in the middle of the epoch after that many iterations in all (last.pth only, save_every_iters)."""
        # Every process checks (they hold the same weights), so all stop together: a non-finite weight
        # must never replace the last good checkpoint (the loss check cannot see an update that overflows
        # on the last step of an epoch).
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(
                f"non-finite weights after {'epoch ' + str(self.epoch) if iteration is None else 'iteration ' + str(iteration)} ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); "
                f"not saved, the last good checkpoint {osp.join(self.snapshot_dir, 'last.pth')} is kept. "
                f"Lower lr or check the data.")
        if not self.info.is_main:
            return
        state = {"model": self.deployable.state_dict(), "network": self.C.network,
                 "num_classes": self.C.num_classes, "method": self.C.method, "epoch": self.epoch,
                 "iteration": self.epoch * self.iters_per_epoch if iteration is None else iteration,
                 "train_seconds": self.train_seconds if train_seconds is None else train_seconds,
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": torch.get_rng_state(), "config": dict(self.C), "losses": self.last_losses,
                 "val": {"history": self.val_history, "best": self.val_best}}
        if isinstance(self.model, CPSPair):
            state["model_b"] = self.model.branch_b.state_dict()
        if iteration is None and self._new_best:
            # before last.pth: a crash in between resumes from the previous last.pth, which redoes this epoch and
            # its validation; the other order could leave a last.pth naming a best.pth that was never written
            save_checkpoint(state, osp.join(self.snapshot_dir, "best.pth"))
            self._new_best = False
        if iteration is None and (self.epoch % self.C.save_every == 0 or self.epoch == self.C.epochs):
            save_checkpoint(state, osp.join(self.snapshot_dir, f"epoch-{self.epoch}.pth"))
        save_checkpoint(state, osp.join(self.snapshot_dir, "last.pth"))

    def _batches(self, epoch: int, start: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        C, info, n = self.C, self.info, self.iters_per_epoch
        labeled = stream_loader(self.datasets["labeled"], C, info, LABELED, epoch, n, start)
        if C.method == "supervised":
            for b in labeled:
                yield {"x_l": b["image"], "y_l": b["label"]}
            return
        u0 = stream_loader(self.datasets["unlabeled"], C, info, UNLABELED_0, epoch, n, start)
        u1 = stream_loader(self.datasets["unlabeled"], C, info, UNLABELED_1, epoch, n, start)
        for b, b0, b1 in zip(labeled, u0, u1):
            yield training_batch(b, b0, b1)

    def _step(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        C, dev, world = self.C, self.info.device, self.info.world_size
        if C.method == "supervised":
            return supervised_step(self.step_model, batch, C, dev, world)
        if C.method == "cps":
            return cps_step(self.step_model, batch, C, dev, world)
        return mgd_step(self.step_model, self.teachers, batch, C, dev, world)

    def fit(self) -> dict:
        C, info = self.C, self.info
        if self.epoch >= C.epochs:
            self.log.info(f"nothing to do: already trained for {self.epoch} epochs")
            return self.summary()
        if info.is_main:
            self.log.info("config " + json.dumps(C, default=str))
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(osp.join(C.output_dir, "tb"))
        self.model.train()
        while self.epoch < C.epochs:
            start = time.time()
            bar = tqdm(total=self.iters_per_epoch, desc=f"{C.exp_name} {C.method} epoch {self.epoch + 1}/{C.epochs}",
                       disable=not info.is_main, dynamic_ncols=True, leave=False, initial=self.skip)
            for i, batch in enumerate(self._batches(self.epoch, self.skip), self.skip):
                it = self.epoch * self.iters_per_epoch + i
                if self.resume_rng is not None:
                    torch.set_rng_state(self.resume_rng)
                    self.resume_rng = None
                lr = poly_lr(C, it, self.total_iters)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
                if C.method != "supervised":
                    batch["mask"] = cutmix_masks(C, info, it).to(info.device)
                values = self.last_losses = self._forward_backward(batch, it)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                bar.update()
                if info.is_main:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
                    if it % C.log_every == 0:
                        for k, v in values.items():
                            writer.add_scalar(f"loss/{k}", v, it)
                        writer.add_scalar("lr", lr, it)
                self._save_within_epoch(it + 1, start)
            bar.close()
            self.epoch, self.skip = self.epoch + 1, 0
            self.train_seconds += time.time() - start
            if info.is_main:
                self.log.info(f"epoch {self.epoch}/{C.epochs} " + " ".join(f"{k}={v:.4f}" for k, v in values.items())
                              + f" lr={lr:.6f} time={time.time() - start:.1f}s {peak_memory(info.device)}")
            if self.val_every and (self.epoch % self.val_every == 0 or self.epoch == C.epochs):
                self._validate(writer if info.is_main else None)
            self._save()
        if info.is_main:
            writer.close()
        return self.summary()

    def _forward_backward(self, batch: Dict[str, torch.Tensor], it: int) -> Dict[str, float]:
        """The step's gradient, in C.accum_steps micro-batches (micro_batches) whose gradients add up: each
        micro-batch's loss is divided by accum_steps, and DDP averages across processes only after the last.
        Returns the loss terms averaged over processes and micro-batches; a non-finite one stops before any
        update."""
        accum = self.C.accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        if accum == 1:
            loss, terms = self._step(batch)
            values = self._check_finite(loss, terms, it)
            self.scaler.scale(loss).backward()
            return values
        n = next(iter(batch.values())).shape[0]
        group = self.C.gpu_batch if self.C.loss_scope == "per_gpu" else 1
        total: Dict[str, float] = {}
        for m, index in enumerate(micro_batches(n, group, accum)):
            micro = {k: v[index.to(v.device)] for k, v in batch.items()}
            last = m == accum - 1
            with nullcontext() if last or not self.info.distributed else self.step_model.no_sync():
                loss, terms = self._step(micro)
                values = self._check_finite(loss, terms, it)
                self.scaler.scale(loss / accum).backward()
            total = {k: total.get(k, 0.0) + v / accum for k, v in values.items()}
        return total

    def _validate(self, writer) -> dict:
        """The configured evaluation (furnace.evaluate: sliding windows, every process its share of the images)
        of the deployable network on the validation images, logged to train.log and TensorBoard; marks a new
        best for best.pth. It must not change the training: it runs in eval mode (BatchNorm uses, and does not
        update, its running statistics) and leaves the RNG state as it found it."""
        C, info, start = self.C, self.info, time.time()
        rng = torch.get_rng_state()  # evaluation draws no random numbers today; this keeps training safe if it does
        conf = evaluate_dataset(self.deployable, self.val_set, C, info.device, info.rank, info.world_size)
        torch.set_rng_state(rng)
        miou, iou = mean_iou(conf), iou_per_class(conf)
        record = {"epoch": self.epoch, "miou": miou, "iou": iou.tolist(), "images": len(self.val_set),
                  "seconds": round(time.time() - start, 3)}
        self.val_history.append(record)
        if not math.isnan(miou) and (self.val_best is None or miou > self.val_best["miou"]):
            self.val_best, self._new_best = {"epoch": self.epoch, "miou": miou}, True
        if writer is not None:
            it = self.epoch * self.iters_per_epoch
            writer.add_scalar("val/mIoU", miou, it)
            for name, value in zip(C.class_names, iou):
                if not math.isnan(value):
                    writer.add_scalar(f"val/IoU/{name}", value, it)
            writer.flush()
        per_class = " ".join(f"{n}={'absent' if math.isnan(v) else f'{100 * v:.2f}'}" for n, v in zip(C.class_names, iou))
        best = self.val_best and f"best {100 * self.val_best['miou']:.2f} at epoch {self.val_best['epoch']}; "
        self.log.info(f"val epoch {self.epoch}/{C.epochs}: mIoU={100 * miou:.2f} on {len(self.val_set)} images "
                      f"({record['seconds']:.1f} s); {best or ''}IoU {per_class}")
        return record

    def _save_within_epoch(self, iterations: int, epoch_start: float) -> None:
        """last.pth every save_every_iters iterations, except at an epoch's end (saved there anyway)."""
        every = self.C.save_every_iters
        if every and iterations % every == 0 and iterations % self.iters_per_epoch:
            self._save(iteration=iterations, train_seconds=self.train_seconds + time.time() - epoch_start)

    def _check_finite(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], it: int) -> Dict[str, float]:
        """Loss terms averaged over processes; stops every process on a non-finite loss, before the update."""
        values = torch.stack([loss.detach().float()] + [t.float() for t in terms.values()]).cpu()
        all_reduce_sum(values)
        values /= self.info.world_size
        if not torch.isfinite(values).all():
            last = osp.join(self.snapshot_dir, "last.pth")
            kept = f"the last good checkpoint {last} is kept" if osp.isfile(last) else "no checkpoint was written yet"
            detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(["total", *terms], values.tolist()))
            raise FloatingPointError(f"non-finite loss at iteration {it} (epoch {self.epoch + 1}): {detail}; "
                                     f"training stopped, {kept}. Lower lr or check the data.")
        return dict(zip(["total", *terms], values.tolist()))

    def summary(self) -> dict:
        """What the run reports: its last checkpoint, and with validation the last epoch's mIoU (the number a
        run reports; README) beside the best one (best.pth)."""
        out = {"checkpoint": osp.join(self.snapshot_dir, "last.pth"), "epochs": self.epoch,
               "train_seconds": self.train_seconds}
        if self.val_history:
            out["val"] = {"last": self.val_history[-1], "best": self.val_best,
                          "best_checkpoint": osp.join(self.snapshot_dir, "best.pth")}
        return out


def main(C: EasyDict, argv: Optional[List[str]] = None) -> dict:
    """The body of every experiment's train.py."""
    parser = argparse.ArgumentParser(description=f"train {C.exp_name} ({C.method})")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/snapshot/last.pth "
                        "(without it, a folder that holds checkpoints is refused)")
    C, args = config_from_cli(C, parser, argv)
    if "LOCAL_RANK" in os.environ:  # a torchrun worker (its own session): die with the launcher, no orphans
        run.die_with_parent()
    with run.claim(C, args.resume, rank=int(os.environ.get("RANK", 0))):  # lock, identity, no overwrite
        trainer = Trainer(C, resume=args.resume)
        try:
            return trainer.fit()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
