"""What each training step sees: the samples of its data streams, its CutMix boxes, its micro-batches.

Determinism: the augmentation of every sample is a pure function of (seed, stream, epoch, position in the
epoch) and the CutMix boxes of every step a function of (seed, iteration). Training state is therefore
just weights, optimiser and iteration counter, which makes `--resume` exact and lets 1 and N processes
see the same global batch.
"""
import math
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from easydict import EasyDict
from torch.utils.data import DataLoader, Dataset, Sampler

from furnace.config import crop_hw
from furnace.data import cutmix_box_mask
from furnace.distributed import DistInfo

LABELED, UNLABELED_0, UNLABELED_1, CUTMIX, CALIBRATION = 0, 1, 2, 3, 4  # random streams


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


def training_batch(labeled: dict, unlabeled_0: Optional[dict] = None, unlabeled_1: Optional[dict] = None
                   ) -> Dict[str, torch.Tensor]:
    """One step's batch from its streams' samples: x_l, y_l (labeled image and label) and, for a method that
    uses unlabeled images, u0, u1. Any other map a sample carries (e.g. an offline teacher's pseudo-label,
    'teacher_deep') comes along as <key>_l, <key>_u0, <key>_u1."""
    batch = {"x_l": labeled["image"], "y_l": labeled["label"]}
    for suffix, sample in (("l", labeled), ("u0", unlabeled_0), ("u1", unlabeled_1)):
        if sample is None:
            continue
        if suffix != "l":
            batch[suffix] = sample["image"]
        batch.update((f"{k}_{suffix}", v) for k, v in sample.items()
                     if k not in ("image", "label", "name") and isinstance(v, torch.Tensor))
    return batch


def cutmix_masks(C: EasyDict, info: DistInfo, iteration: int) -> torch.Tensor:
    """This process's share of the step's global batch of CutMix masks."""
    seed = int(np.random.SeedSequence([C.seed, CUTMIX, iteration]).generate_state(1)[0])
    h, w = crop_hw(C.crop_size)
    masks = cutmix_box_mask(C.batch_size, h, w, generator=torch.Generator().manual_seed(seed),
                            toggle_overlaps=C.cutmix_overlap == "toggle")
    return masks[info.rank::info.world_size]


def micro_batches(n: int, group: int, accum: int) -> List[torch.Tensor]:
    """Indices cutting a process batch of n images into `accum` micro-batches (gradient accumulation), each
    made of whole groups of `group` images (image j is in group j mod n // group, as
    furnace.methods.base.per_gpu_mean groups them) and ordered so that per_gpu_mean finds the same groups in
    the micro-batch.

    Micro-batch m holds the process's groups m * q ... (m + 1) * q - 1 (q = groups per micro-batch). The
    sampler deals global groups to processes in turn, so over all processes micro-batch m holds global groups
    m * Q ... (m + 1) * Q - 1 whatever the process count: BatchNorm (synchronised across processes) normalises
    the same images in 1 and N processes. With group 1 (loss_scope='global') it is the m-th contiguous slice."""
    k = n // group
    q = k // accum
    return [torch.tensor([m * q + g + k * t for t in range(group) for g in range(q)]) for m in range(accum)]


def fixed_crops(dataset: Dataset, C: EasyDict, count: int, stream: int
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`count` training crops (images, labels or None) spread over `dataset`, augmented by the training transform
    with keys of their own: the same on every process and every run."""
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    samples = [dataset[(int(i), (C.seed, stream, 0, pos))] for pos, i in enumerate(indices)]
    labels = torch.stack([s["label"] for s in samples]) if all("label" in s for s in samples) else None
    return torch.stack([s["image"] for s in samples]), labels
