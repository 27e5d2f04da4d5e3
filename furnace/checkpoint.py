"""Checkpoint files: atomic writes, loading with errors that name the file, and the deployable network.

A checkpoint is a dict with at least: model (state dict of the deployable network: the student, or CPS
branch a), network (preset name), num_classes; training checkpoints add epoch, iteration, method, config,
optimizer, rng, train_seconds (and model_b, CPS branch b).
"""
import os
import os.path as osp
from typing import Optional

import torch
import torch.nn as nn

from furnace.models import build_segmentor


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically: a crash during the write leaves the previous file at `path` untouched."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """torch.load on CPU, with errors that name the file."""
    if not osp.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        try:  # memory-mapped: only the tensors used are read (a CPS teacher's file also holds branch b and momenta)
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # a file in the legacy (non-zip) format cannot be mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise RuntimeError(f"checkpoint {path} is corrupt or not a checkpoint of this project: {e}") from None
    if not isinstance(ckpt, dict) or not {"model", "network", "num_classes"} <= set(ckpt):
        raise RuntimeError(f"checkpoint {path} lacks 'model', 'network' or 'num_classes': not saved by furnace")
    return ckpt


def segmentor_from_checkpoint(ckpt: dict, path: str, network: Optional[str] = None,
                              num_classes: Optional[int] = None, role: str = "checkpoint") -> nn.Module:
    """The deployable network of a loaded checkpoint (CPU, train mode), checked against the expected
    architecture and class count."""
    if network is not None and ckpt["network"] != network:
        raise ValueError(f"{role} {path} is a {ckpt['network']} network, expected {network}")
    if num_classes is not None and ckpt["num_classes"] != num_classes:
        raise ValueError(f"{role} {path} predicts {ckpt['num_classes']} classes, expected {num_classes}")
    model = build_segmentor(ckpt["network"], int(ckpt["num_classes"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise RuntimeError(f"{role} {path}: weights do not fit a {ckpt['network']} network: {e}") from None
    return model


def load_segmentor(path: str, network: Optional[str] = None, num_classes: Optional[int] = None,
                   role: str = "checkpoint") -> nn.Module:
    """load_checkpoint + segmentor_from_checkpoint."""
    return segmentor_from_checkpoint(load_checkpoint(path), path, network, num_classes, role)
