"""What every training method is to the engine (`Method`), and the loss pieces the methods share.

A step gets the model and one batch (dict: x_l, y_l labeled; u0, u1 unlabeled; mask the CutMix boxes,
1 where u1 is pasted into u0; see furnace.sampling.training_batch) and returns (total loss, {term name:
detached value}). Loss weights come from the config; a term whose weight is 0 is not computed.
"""
import logging
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
from easydict import EasyDict
from torch.utils.data import Dataset

from furnace.distributed import DistInfo, all_reduce_sum
from furnace.losses import ce_loss, count_valid, ohem_ce

Terms = Dict[str, torch.Tensor]


class Method:
    """One training method: the data it needs, the model(s) it trains, its step, what a checkpoint holds.

    Subclasses override what differs; the defaults are those of a single network trained on labeled images."""

    uses_unlabeled = False  # True: each batch also holds two unlabeled streams (u0, u1) and CutMix masks

    def __init__(self, C: EasyDict, info: DistInfo, log: logging.Logger):
        self.C, self.info, self.log = C, info, log

    def prepare(self, datasets: Dict[str, Dataset]) -> Dict[str, Dataset]:
        """Whatever is made once before training (MGD: the teachers); returns the training datasets to use."""
        return datasets

    def build_model(self, new_network: Callable[[], nn.Module]) -> nn.Module:
        """The trained module, from the engine's factory of freshly initialised networks."""
        return new_network()

    def deployable(self, model: nn.Module) -> nn.Module:
        """The network a checkpoint's 'model' holds (what evaluation and distillation load)."""
        return model

    def extra_state(self, model: nn.Module) -> dict:
        """Checkpoint entries beside 'model' needed to resume (e.g. a second network)."""
        return {}

    def load_state(self, model: nn.Module, ckpt: dict) -> None:
        """Restore `model` from a checkpoint written with deployable() and extra_state()."""
        model.load_state_dict(ckpt["model"])

    def step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Terms]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ shared losses
def per_gpu_mean(fn: Callable[..., torch.Tensor], group: int, *inputs) -> torch.Tensor:
    """mean_g fn(inputs of group g) over the k = batch / `group` groups of this process's batch; image j is in
    group j mod k (a tensor input is split along its first dimension, a tuple input element by element).

    This is what the published update is made of: each GPU computes every loss on its own `group` images, and
    the all-reduce / world size / DDP average turns these into a mean over GPUs (docs/method.md). The engine's
    sampler deals the global batch to W processes in turn (image i to process i mod W), so with groups taken
    in turn too, group g holds global images g, g + G, g + 2G, ... (G groups in all) whatever W: 1 and N
    processes compute the same groups, and a process of the run holds k = G / W of them."""
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


def finish(terms: Terms) -> Tuple[torch.Tensor, Terms]:
    """(the sum of the weighted terms, the terms detached for logging)."""
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}
