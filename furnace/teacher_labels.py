"""Offline teachers: each frozen teacher's pseudo-label of every training image, computed once and reused.

Online (C.teacher_labels = 'online', as published), every MGD step runs both teachers on u0, u1 and x_l just
to take an argmax, about three quarters of all teacher work. Offline (setting=fast) the trainer first predicts every
training image once per teacher (whole image, scale 1, the evaluation's sliding windows; C.eval_*), stores
the argmax as a PNG, and the datasets (`SegmentationDataset.with_teacher_labels`) load those maps beside each image and put them through the same flip,
scale (nearest) and crop as the image, exactly as they do ground-truth labels. Teachers then only run on the
mixed image u_m, and only when the image-level or region-level term needs them.

What changes against online teachers: a pseudo-label is the teacher's view of the whole image at scale 1,
resized with the crop, instead of its view of the augmented crop itself; crop padding gets no pseudo-label
(255, ignored) where an online teacher labels the padding too. tools/benchmark.py times the fast setting that
uses them; README has how often the two agreed (an earlier benchmark) and the toy-set mIoU of both.

Layout: DIR/manifest.json (the teachers and inference settings the maps were made with) and
DIR/<role>/<image name>.png. A run that finds maps made by other teachers or settings stops with an error
naming DIR instead of overwriting them; an interrupted precomputation resumes where it stopped.
"""
import json
import os
import os.path as osp
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from easydict import EasyDict
from torch.utils.data import Dataset
from tqdm import tqdm

from furnace.data import read_image, write_label
from furnace.data.transforms import normalize
from furnace.distributed import DistInfo
from furnace.evaluate import inference_options, predict_probs
from furnace.data import IGNORE_INDEX
from furnace.teachers import ROLES, FrozenTeacher


def label_dir(C: EasyDict) -> str:
    """Where the offline pseudo-labels live: C.teacher_label_dir, or <output_dir>/teacher_labels."""
    return C.teacher_label_dir or osp.join(C.output_dir, "teacher_labels")


def label_path(root: str, role: str, name: str) -> Path:
    return Path(root) / role / f"{name}.png"


def manifest(C: EasyDict, precisions: Dict[str, str]) -> dict:
    """What determines the maps: each teacher's checkpoint file (path, size, modification time) and
    precision, the dataset and the inference settings."""
    teachers = {}
    for role in ROLES:
        path = C[f"teacher_{role}"]  # None: a network made in memory (tools/benchmark.py)
        st = os.stat(path) if path else None
        teachers[role] = dict(checkpoint=osp.realpath(path) if path else None, size=st and st.st_size,
                              mtime_ns=st and st.st_mtime_ns, network=C[f"teacher_{role}_network"],
                              precision=precisions[role])
    options = inference_options(C)
    options["crop_size"] = list(options["crop_size"])
    return dict(teachers=teachers, dataset=C.dataset, data_root=osp.realpath(C.data_root),
                num_classes=C.num_classes, inference=options)


def _claim(root: str, wanted: dict) -> None:
    """Write the manifest, or check that the one already in `root` describes the same teachers."""
    path = osp.join(root, "manifest.json")
    if osp.isfile(path):
        with open(path) as f:
            found = json.load(f)
        if found != wanted:
            diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ValueError(f"teacher_label_dir {root} holds pseudo-labels made with other {', '.join(diff)} "
                             f"({path}); delete that folder or set teacher_label_dir to a new one")
        return
    os.makedirs(root, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(wanted, f, indent=1)
    os.replace(tmp, path)


def _barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def precompute(teachers: Dict[str, FrozenTeacher], datasets: Dict[str, Dataset], C: EasyDict, info: DistInfo) -> str:
    """Each teacher's argmax on every image of the training datasets, written as PNGs under label_dir(C);
    images whose maps exist are skipped. Process r of W predicts images r, r + W, ...; all wait for all.
    Returns the folder."""
    root = label_dir(C)
    precisions = {role: t.precision for role, t in teachers.items()}
    if info.is_main:
        _claim(root, manifest(C, precisions))
        for stale in Path(root).rglob("*.tmp*.png"):  # maps whose write a crash cut short
            stale.unlink()
    _barrier(info)
    if not info.is_main:
        _claim(root, manifest(C, precisions))  # only checks
    names: List[tuple] = []
    seen = set()
    for ds in datasets.values():
        for name in ds.names:
            if name not in seen:
                seen.add(name)
                names.append((ds, name))
    todo = [(ds, n) for ds, n in names[info.rank::info.world_size]
            if not all(label_path(root, r, n).is_file() for r in teachers)]
    options = inference_options(C)
    for ds, name in tqdm(todo, desc="offline teacher labels", disable=not info.is_main or not todo,
                         dynamic_ncols=True):
        image = normalize(read_image(ds.image_path(name)), ds.transform.mean, ds.transform.std)
        x = torch.from_numpy(image.transpose(2, 0, 1)).unsqueeze(0).to(info.device)
        for role, teacher in teachers.items():
            pred = predict_probs(teacher.evaluated, x, **options).argmax(1)[0].to(torch.uint8).cpu().numpy()
            target = label_path(root, role, name)
            tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}.png")
            write_label(tmp, pred)
            os.replace(tmp, target)  # a map is either whole or absent
    _barrier(info)
    missing = [str(label_path(root, r, n)) for _, n in names for r in teachers if not label_path(root, r, n).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} offline teacher labels missing after precomputing, e.g. {missing[0]}")
    return root


def agreement(offline: torch.Tensor, online_logits: torch.Tensor) -> float:
    """Share of the pixels that have an offline pseudo-label (not IGNORE_INDEX) where it equals the online
    argmax."""
    valid = offline != IGNORE_INDEX
    same = (online_logits.argmax(1) == offline) & valid
    return float(same.sum()) / max(int(valid.sum()), 1)
