#!/usr/bin/env python
"""Your own dataset: check a folder of images and label PNGs, write its split lists and partitions.

    python tools/prepare_custom.py DATA/custom [--val-list val_names.txt | --val-fraction 0.2] [--seed N]

The folder (furnace/data/custom.py):
  images/NAME.jpg|.jpeg|.png   RGB images, any size
  labels/NAME.png              class indices: single-channel PNG, or palette ('P') PNG whose indices are the
                               classes (its colours are not read); 255 = ignore
  classes.txt                  one class name per line, class 0 first (2 to 254 classes)
  palette.txt                  optional: 'R G B' per class, the colours of predictions (default: VOC's map)

Written (nothing else is touched; images and labels are read where they are):
  lists/train.txt, lists/val.txt, lists/labeled_1-{16,8,4,2}.txt, lists/unlabeled_1-{16,8,4,2}.txt

Every image and label is read and checked before any list is written: each image has a label of its size
and the reverse, images decode, labels are index or palette PNGs with values in 0..K-1 or 255; the problems
are listed by file. Validation images come from --val-list (names or image paths, one per line), else a
seeded --val-fraction of the images. Partitions are seeded (--seed), or your published lists
(--partition-dir). Re-running with the same options rewrites the same lists; lists of an earlier run that
would change are refused unless --force.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # the sibling module prepare_utils

from furnace.data import CustomDataset, DatasetError, check_dataset  # noqa: E402
from furnace.data import custom  # noqa: E402
from furnace.data.splits import PARTITIONS, partition_paths, read_list  # noqa: E402
from prepare_utils import (PartitionChoice, PrepareError, add_partition_args, class_histogram, cli_main,  # noqa: E402
                           resolve_partitions, write_lists_and_partitions)

MAX_REPORT = 20


def _pairs(root: Path) -> List[str]:
    """Names having both an image and a label; a file without its partner, or one name with two images, is
    an error listing them."""
    for sub in (custom.IMAGE_DIR, custom.LABEL_DIR):
        if not (root / sub).is_dir():
            raise PrepareError(f"{root / sub} is not a folder (expected {custom.IMAGE_DIR}/ and {custom.LABEL_DIR}/ "
                               f"under {root})")
    images: Dict[str, List[str]] = {}
    for p in sorted((root / custom.IMAGE_DIR).iterdir()):
        if p.is_file() and p.suffix.lower() in custom.IMAGE_EXTENSIONS:
            images.setdefault(p.stem, []).append(p.name)
    labels = {p.stem for p in (root / custom.LABEL_DIR).iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    problems = [f"{root / custom.IMAGE_DIR}: several images named {n}: {', '.join(f)}"
                for n, f in images.items() if len(f) > 1]
    problems += [f"image {root / custom.IMAGE_DIR / f[0]} has no label {root / custom.LABEL_DIR / (n + '.png')}"
                 for n, f in images.items() if n not in labels]
    problems += [f"label {root / custom.LABEL_DIR / (n + '.png')} has no image in {root / custom.IMAGE_DIR}"
                 for n in sorted(labels - set(images))]
    if problems:
        raise PrepareError(_listing(problems, f"{root} has images and labels that do not pair up"))
    if not images:
        raise PrepareError(f"{root / custom.IMAGE_DIR} holds no images ({', '.join(custom.IMAGE_EXTENSIONS)})")
    return sorted(images)


def _listing(problems: Sequence[str], head: str) -> str:
    more = f"\n  ... and {len(problems) - MAX_REPORT} more" if len(problems) > MAX_REPORT else ""
    return f"{head} ({len(problems)} problems):\n  " + "\n  ".join(problems[:MAX_REPORT]) + more


def split_val(names: Sequence[str], val_list: Optional[Path], val_fraction: float, seed: int) -> List[str]:
    """The validation names: those of val_list (each must be an image of the folder), else a seeded
    round(val_fraction * N) of them (at least one, and one image left for training)."""
    known = set(names)
    if val_list is not None:
        try:
            lines = read_list(val_list)
        except (OSError, ValueError) as e:
            raise PrepareError(str(e)) from e
        val = [custom.name_of(line) for line in lines]
        unknown = [(i, line) for i, (line, n) in enumerate(zip(lines, val), 1) if n not in known]
        if unknown:
            i, line = unknown[0]
            raise PrepareError(f"{val_list} line {i}: {line!r} is not an image of the folder"
                               + (f" (and {len(unknown) - 1} more lines)" if len(unknown) > 1 else ""))
        if len(set(val)) != len(val):
            raise PrepareError(f"{val_list} lists some images twice")
    else:
        if not 0 < val_fraction < 1:
            raise PrepareError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        n_val = min(max(1, round(val_fraction * len(names))), len(names) - 1)
        chosen = set(np.random.default_rng(seed).permutation(len(names))[:n_val].tolist())
        val = [n for i, n in enumerate(names) if i in chosen]
    if len(set(val)) == len(names):
        raise PrepareError("every image is a validation image: none is left for training")
    return sorted(val)


def _changed_lists(list_dir: Path, planned: Dict[Path, List[str]]) -> List[Path]:
    """Lists already on disk that the planned ones would change."""
    changed = []
    for path, names in planned.items():
        if path.is_file():
            try:
                old = read_list(path)
            except ValueError:
                old = []
            if old != list(names):
                changed.append(path)
    return changed


def prepare_custom(root, val_list: Optional[Path] = None, val_fraction: float = 0.2, seed: Optional[int] = None,
                   denominators: Sequence[int] = PARTITIONS, partition_source: str = "auto",
                   protocol: Optional[str] = None, partition_dir: Optional[Path] = None,
                   workers: int = 2, force: bool = False) -> dict:
    """Check the folder and write its lists (see the module docstring). Returns the summary of
    write_lists_and_partitions: counts, partitions {d: (n_labeled, n_unlabeled, source)}, ..."""
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(f"dataset folder not found: {root}")
    try:
        classes = custom.dataset_classes(root)
    except (OSError, ValueError) as e:
        raise PrepareError(str(e)) from e
    names = _pairs(root)
    val = split_val(names, val_list, val_fraction, 0 if seed is None else seed)
    in_val = set(val)
    train = [n for n in names if n not in in_val]
    # every file decoded and checked (sizes, label values) before anything is written
    ds = CustomDataset(root, root / custom.IMAGE_DIR, "val", classes["num_classes"], names=names)
    try:
        check_dataset(ds, workers=max(1, workers), max_report=MAX_REPORT)
    except DatasetError as e:
        raise PrepareError(str(e)) from e
    choice = PartitionChoice(partition_source, seed, protocol, partition_dir, None)
    parts = resolve_partitions(train, custom.name_of, denominators, choice).parts
    list_dir = root / "lists"
    planned = {list_dir / "train.txt": train, list_dir / "val.txt": val}
    for p in parts:
        lpath, upath = partition_paths(list_dir, p.denominator)
        planned.update({lpath: p.labeled, upath: p.unlabeled})
    changed = _changed_lists(list_dir, planned)
    if changed and not force:
        raise PrepareError(f"{len(changed)} lists of an earlier run would change, e.g. {changed[0]} (other options "
                           "or other images?); runs trained on them would no longer match: pass --force to "
                           "replace them")
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PNG decoding releases the GIL
        hists = dict(zip(train, pool.map(lambda n: class_histogram(ds.load_label(n), classes["num_classes"]), train)))
    print(f"custom dataset {root}: {len(classes['class_names'])} classes "
          f"({', '.join(classes['class_names'][:8])}{', ...' if len(classes['class_names']) > 8 else ''}); "
          f"palette {'from ' + custom.PALETTE_FILE if classes['palette'] else 'VOC colour map (no palette.txt)'}")
    print(f"custom train: {len(train)} images, val: {len(val)} images "
          f"({'from ' + str(val_list) if val_list else f'seeded, fraction {val_fraction}'})")
    return write_lists_and_partitions(list_dir, {"train": train, "val": val}, "train", hists,
                                      classes["class_names"], custom.name_of, denominators, choice)


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the dataset folder (images/, labels/, classes.txt)")
    parser.add_argument("--val-list", type=Path, default=None,
                        help="validation images, one name (or image path) per line; the rest is training")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="without --val-list: this share of the images, chosen with --seed (default 0.2)")
    add_partition_args(parser)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads reading files")
    parser.add_argument("--force", action="store_true", help="replace lists of an earlier run that would change")
    args = parser.parse_args(argv)
    prepare_custom(args.root, args.val_list, args.val_fraction, args.seed, args.partitions,
                   args.partition_source, args.protocol, args.partition_dir, args.workers, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
