"""The training engine: data streams, model, optimiser, checkpoints, validation and the loop, for any method.

What differs between methods (their data, model, step and checkpoint contents) is behind
furnace.methods.base.Method; this file names none of them. Determinism (furnace.sampling): the augmentation
of every sample and the CutMix boxes of every step are functions of the seed and the position in training,
so training state is just weights, optimiser and iteration counter, which makes `--resume` exact and lets
1 and N processes see the same global batch.
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
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from furnace import run
from furnace.amp import amp_reason, resolve_amp
from furnace.checkpoint import load_checkpoint, save_checkpoint
from furnace.config import config_from_cli
from furnace.data import read_list
from furnace.distributed import all_reduce_sum, init_distributed, rank0_choice, synchronised_batchnorm
from furnace.evaluate import evaluate_dataset
from furnace.methods import build_method
from furnace.metrics import iou_per_class, mean_iou
from furnace.models import build_segmentor, zero_init_residual_
from furnace.sampling import LABELED, UNLABELED_0, UNLABELED_1, cutmix_masks, micro_batches, stream_loader, training_batch


# ----------------------------------------------------------------------------------------------- data
def peak_memory(device: torch.device) -> str:
    """This process's peak memory so far: CUDA memory allocated by tensors, or on CPU the peak resident set."""
    if device.type == "cuda":
        return f"peak_mem={torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}MiB(cuda)"
    return f"peak_mem={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MiB(rss)"  # KiB on Linux


def build_datasets(C: EasyDict, unlabeled: bool) -> Dict[str, Dataset]:
    """The training datasets (labeled, and unlabeled if the method uses them), checked file by file before any
    training."""
    from furnace.data import build_dataset, check_dataset
    splits = ["labeled"] + (["unlabeled"] if unlabeled else [])
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
        requested_amp, C.amp = C.amp, rank0_choice(resolve_amp(C.amp, self.info.device))
        if C.amp == "fp16" and self.info.device.type != "cuda":
            raise ValueError("config: amp='fp16' needs CUDA; use 'bf16' or 'off' on CPU")
        self.snapshot_dir = osp.join(C.output_dir, "snapshot")
        self.log = self._make_logger()
        self.log.info(f"amp={requested_amp!r} -> {C.amp!r}"
                      + (f" ({amp_reason(self.info.device)})" if requested_amp == "auto" else " (set in the config)"))

        self.method = build_method(C, self.info, self.log)
        self.datasets = self.method.prepare(build_datasets(C, self.method.uses_unlabeled))
        torch.manual_seed(C.seed)  # same initialisation on every process
        model = self.method.build_model(self._new_network)
        self.model = synchronised_batchnorm(model, self.info).to(self.info.device)
        if C.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # fused: one kernel over all parameters instead of a loop of small ops per parameter
        self.optimizer = torch.optim.SGD(param_groups(self.model, C.weight_decay), lr=C.lr, momentum=C.momentum,
                                         fused=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=C.amp == "fp16")
        sizes = [len(d) for d in self.datasets.values()]
        if "unlabeled" not in self.datasets and C.get("unlabeled_list") and osp.isfile(C.unlabeled_list):
            # a method on labeled images only gets the semi-supervised runs' schedule (same iterations per epoch, same
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
        """What a checkpoint's 'model' holds (the method says: e.g. CPS branch a, the teacher to distil from)."""
        return self.method.deployable(self.model)

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
        self.method.load_state(self.model, ckpt)
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
        state.update(self.method.extra_state(self.model))
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
        if not self.method.uses_unlabeled:
            for b in labeled:
                yield training_batch(b)
            return
        u0 = stream_loader(self.datasets["unlabeled"], C, info, UNLABELED_0, epoch, n, start)
        u1 = stream_loader(self.datasets["unlabeled"], C, info, UNLABELED_1, epoch, n, start)
        for b, b0, b1 in zip(labeled, u0, u1):
            yield training_batch(b, b0, b1)

    def _step(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self.method.step(self.step_model, batch)

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
                if self.method.uses_unlabeled:
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
