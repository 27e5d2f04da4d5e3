#!/usr/bin/env python
"""PASCAL VOC 2012 train_aug from the official downloads, in one command.

    python tools/prepare_voc.py --voc VOCtrainval_11-May-2012.tar --sbd benchmark.tgz --out DATA/pascal_voc

Inputs (archives or their extracted folders):
  --voc  VOCtrainval_11-May-2012.tar  (VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation})
  --sbd  benchmark.tgz                (benchmark_RELEASE/dataset/{img, cls, train.txt, val.txt}); its extracted
                                      benchmark_RELEASE folder or benchmark_RELEASE/dataset itself also work

Output (DATA/pascal_voc):
  train_aug/image/NAME.jpg, train_aug/label/NAME.png   10,582 = (SBD train + SBD val + VOC train) - VOC val
  val/image/NAME.jpg, val/label/NAME.png                1,449 = VOC val
  lists/train_aug.txt, lists/val.txt, lists/labeled_1-{16,8,4,2}.txt, lists/unlabeled_1-{16,8,4,2}.txt

Labels are single-channel PNGs of class indices (0..20, 255 = ignore). A train_aug image in VOC train keeps
its VOC SegmentationClass label (with the 255 object borders); the others get the SBD `GTcls.Segmentation`
label (no borders). Images are the VOC JPEG bytes, or SBD's where VOC lacks the image.

Partitions: when train_aug is the published one (10,582 images, as a set), the published lists shipped in
furnace/data/published_splits/voc are installed (protocol train_aug; --protocol pseudoseg for the PseudoSeg
lists of VOC train); otherwise, or with --partition-source seeded / --seed N, seeded ones are generated.
--partition-dir DIR installs a folder of published lists of your own. The output says which.

Each archive is read in one forward pass (plus, for a compressed archive, a pass that stops at the split
lists), and only the files above are written. Re-running skips finished files, and skips the archives
altogether when the previous run finished and its files are unchanged.
"""
from __future__ import annotations

import argparse
import io
import os.path as osp
import re
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # the sibling module prepare_utils

from furnace.data import VOC_CLASS_NAMES  # noqa: E402
from furnace.data.splits import PARTITIONS  # noqa: E402
from prepare_utils import (PartitionChoice, PrepareError, PublishedLists, Source, TaskPool,  # noqa: E402
                           add_common_args, check_counts, check_magic, check_same_sizes, class_histogram, cli_main,
                           copy_done, decode_png, expected_or_none, incomplete_error, parse_names, partition_choice,
                           png_complete, read_index_png, resolve_partitions, save_index_png, save_manifest,
                           shipped_published, try_skip, write_bytes_atomic, write_lists_and_partitions)

NUM_CLASSES = len(VOC_CLASS_NAMES)
TRAIN_AUG_SIZE, VAL_SIZE = 10582, 1449
VOC_HINT = "download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
SBD_HINT = ("download benchmark.tgz from "
            "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz")

# The split lists locate the dataset root inside the archive/folder; members are then matched below it.
VOC_LISTS = {
    "train": (r"(^|/)ImageSets/Segmentation/train\.txt$", "ImageSets/Segmentation/train.txt"),
    "val": (r"(^|/)ImageSets/Segmentation/val\.txt$", "ImageSets/Segmentation/val.txt"),
}
# benchmark.tgz holds benchmark_RELEASE/dataset/{train.txt, val.txt, img, cls, inst}; the archive, the extracted
# benchmark_RELEASE folder (or any folder above it) and benchmark_RELEASE/dataset itself (the folder other
# tools call the SBD root) are all accepted.
SBD_LISTS = {
    "train": (r"(^|/)dataset/train\.txt$|^train\.txt$", "benchmark_RELEASE/dataset/train.txt"),
    "val": (r"(^|/)dataset/val\.txt$|^val\.txt$", "benchmark_RELEASE/dataset/val.txt"),
}
SBD_WHERE = ("pass benchmark.tgz, the benchmark_RELEASE folder extracted from it, or its dataset folder "
             "(benchmark_RELEASE/dataset, which holds train.txt, val.txt, img/ and cls/)")


def _root_of(member: str, suffix: str) -> str:
    """The prefix of `member` before `suffix` ('' or ending in '/')."""
    return member[: len(member) - len(suffix)]


def _check_label_values(label: np.ndarray, where: str) -> None:
    bad = np.unique(label[(label >= NUM_CLASSES) & (label != 255)])
    if bad.size:
        raise PrepareError(f"{where}: label values {bad.tolist()[:5]} are not VOC classes (0..20, 255)")


def decode_sbd_mat(data: bytes, where: str) -> np.ndarray:
    """SBD cls/NAME.mat -> HxW uint8: the `Segmentation` field of its `GTcls` struct."""
    try:
        import scipy.io
    except ImportError as e:
        raise PrepareError("scipy is needed to read the SBD .mat labels: pip install scipy") from e
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), struct_as_record=False, squeeze_me=True)
    except Exception as e:  # scipy raises several types for damaged files
        raise PrepareError(f"cannot read {where} as a MATLAB file: {e}") from e
    seg = getattr(mat.get("GTcls"), "Segmentation", None)
    if seg is None:
        raise PrepareError(f"{where} has no GTcls.Segmentation (is it an SBD cls/ file?)")
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise PrepareError(f"{where}: GTcls.Segmentation has shape {seg.shape}, expected HxW")
    if seg.min() < 0 or seg.max() > 255:
        raise PrepareError(f"{where}: GTcls.Segmentation values outside 0..255")
    return seg.astype(np.uint8)


# Tasks run in the pool; each returns (name, histogram or None).
def _copy_task(path: Path, data: bytes, name: str):
    write_bytes_atomic(path, data)
    return name, None


def _label_task(path: Path, data: bytes, where: str, decode, name: str, want_hist: bool):
    label = decode(data, where)
    _check_label_values(label, where)
    save_index_png(path, label)
    return name, class_histogram(label, NUM_CLASSES) if want_hist else None


def _existing_label_task(path: Path, name: str):
    return name, class_histogram(read_index_png(path), NUM_CLASSES)


def _decode_voc_png(data: bytes, where: str) -> np.ndarray:
    return decode_png(data, where, modes=("P", "L"))


def name_key(token: str) -> str:
    """VOC image name of a list token: '2007_000032', 'JPEGImages/2007_000032.jpg', ... (Path.stem, faster)."""
    base = token.rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and stem and ext else base


def prepare_voc(voc, sbd, out="DATA/pascal_voc", partition_dir: Optional[Path] = None, seed: Optional[int] = None,
                denominators: Sequence[int] = PARTITIONS, expect_train: Optional[int] = TRAIN_AUG_SIZE,
                expect_val: Optional[int] = VAL_SIZE, workers: int = 2, force: bool = False,
                partition_source: str = "auto", protocol: Optional[str] = None,
                published: Optional[PublishedLists] = None) -> dict:
    """Build DATA/pascal_voc from the official archives (see the module docstring). Returns a summary:
    counts, partitions {d: (n_labeled, n_unlabeled, source)}, partition_note, max_balance_diff
    {d: max_c |f_l(c)-f(c)|}, skipped (True when the archives were not read because an earlier run had
    finished). Partitions: see PartitionChoice; `published` replaces the shipped published lists."""
    out = Path(out)
    choice = PartitionChoice(partition_source, seed, protocol, partition_dir,
                             published if published is not None else shipped_published("pascal_voc"))

    def check_partitions(train):  # before any file is written
        resolve_partitions(train, name_key, denominators, choice)

    manifest = try_skip(out, "pascal_voc", force)
    if manifest is not None:
        lists, hists = manifest["lists"], manifest["hist"]
    else:
        lists, hists = _build(voc, sbd, out, workers, force, check_partitions)
    check_counts({"train_aug": len(lists["train_aug"]), "val": len(lists["val"])},
                 {"train_aug": expect_train, "val": expect_val}, "pascal_voc")
    summary = write_lists_and_partitions(out / "lists", lists, "train_aug", hists, VOC_CLASS_NAMES,
                                         key_fn=name_key, denominators=denominators, choice=choice)
    summary["skipped"] = manifest is not None
    return summary


def _build(voc, sbd, out: Path, workers: int, force: bool, check_partitions=None):
    voc_src = Source(voc, "VOC2012 trainval archive", VOC_HINT)
    sbd_src = Source(sbd, "SBD archive", SBD_HINT)

    voc_lists = voc_src.find(VOC_LISTS)
    sbd_lists = sbd_src.find(SBD_LISTS, hint=SBD_WHERE)
    voc_train = parse_names(voc_lists["train"][1], f"{voc_src} {voc_lists['train'][0]}")
    voc_val = parse_names(voc_lists["val"][1], f"{voc_src} {voc_lists['val'][0]}")
    sbd_train = parse_names(sbd_lists["train"][1], f"{sbd_src} {sbd_lists['train'][0]}")
    sbd_val = parse_names(sbd_lists["val"][1], f"{sbd_src} {sbd_lists['val'][0]}")
    voc_root = _root_of(voc_lists["train"][0], "ImageSets/Segmentation/train.txt")
    sbd_root = _root_of(sbd_lists["train"][0], "train.txt")

    val = sorted(voc_val)
    val_set = set(val)
    train = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - val_set)
    train_set = set(train)
    if check_partitions is not None:
        check_partitions(train)
    voc_labeled = set(voc_train) - val_set  # train_aug images whose label comes from VOC
    split_of = {n: "train_aug" for n in train}
    split_of.update({n: "val" for n in val})

    def image_path(name: str) -> Path:
        return out / split_of[name] / "image" / f"{name}.jpg"

    def label_path(name: str) -> Path:
        return out / split_of[name] / "label" / f"{name}.png"

    hists: Dict[str, np.ndarray] = {}
    voc_rx = re.compile("^" + re.escape(voc_root) + r"(JPEGImages|SegmentationClass)/([^/]+)\.(jpg|png)$")
    sbd_rx = re.compile("^" + re.escape(sbd_root) + r"(img|cls)/([^/]+)\.(jpg|mat)$")

    voc_images = set()  # names whose JPEG the VOC archive holds
    with TaskPool(workers) as pool:
        # Pass over VOC: val images/labels, train_aug images, and labels of VOC train images.
        for m in voc_src.members(desc=f"VOC2012 {voc_src.path.name}"):
            hit = voc_rx.match(m.name)
            if not hit or hit.group(2) not in split_of:
                continue
            folder, name, ext = hit.groups()
            where = f"{voc_src} {m.name}"
            if folder == "JPEGImages" and ext == "jpg":
                voc_images.add(name)
                dst = image_path(name)
                if force or not copy_done(dst, m.size):
                    data = m.read()
                    check_magic(data, "jpg", where)
                    pool.submit(_copy_task, dst, data, name)
            elif folder == "SegmentationClass" and ext == "png" and (name in val_set or name in voc_labeled):
                dst = label_path(name)
                want_hist = name in train_set
                if force or not png_complete(dst):
                    pool.submit(_label_task, dst, m.read(), where, _decode_voc_png, name, want_hist)
                elif want_hist:
                    pool.submit(_existing_label_task, dst, name)
        hists.update({n: h for n, h in pool.finish() if h is not None})

        # Pass over SBD: labels of the other train_aug images, and images VOC did not have.
        for m in sbd_src.members(desc=f"SBD {sbd_src.path.name}"):
            hit = sbd_rx.match(m.name)
            if not hit or hit.group(2) not in train_set:
                continue
            folder, name, ext = hit.groups()
            where = f"{sbd_src} {m.name}"
            if folder == "img" and ext == "jpg":
                dst = image_path(name)
                if name in voc_images:
                    continue  # the VOC copy of the image wins
                if force or not copy_done(dst, m.size):
                    data = m.read()
                    check_magic(data, "jpg", where)
                    pool.submit(_copy_task, dst, data, name)
            elif folder == "cls" and ext == "mat" and name not in voc_labeled:
                dst = label_path(name)
                if force or not png_complete(dst):
                    pool.submit(_label_task, dst, m.read(), where, decode_sbd_mat, name, True)
                else:
                    pool.submit(_existing_label_task, dst, name)
        hists.update({n: h for n, h in pool.finish() if h is not None})

    missing = {
        f"VOC JPEGImages of val images ({voc_src})": [f"{n}.jpg" for n in val if not image_path(n).exists()],
        f"VOC SegmentationClass of val images ({voc_src})":
            [f"{n}.png" for n in val if not label_path(n).exists()],
        f"VOC SegmentationClass of VOC train images ({voc_src})":
            [f"{n}.png" for n in sorted(voc_labeled) if not label_path(n).exists()],
        f"SBD cls of SBD images ({sbd_src})":
            [f"{n}.mat" for n in train if n not in voc_labeled and not label_path(n).exists()],
        f"train_aug images, in neither VOC JPEGImages nor SBD img ({voc_src}, {sbd_src})":
            [f"{n}.jpg" for n in train if not image_path(n).exists()],
    }
    if any(missing.values()):
        raise incomplete_error(missing, [voc_src, sbd_src])
    for src in (voc_src, sbd_src):  # cut at a member boundary after the last file needed
        src.check_complete()
    names = val + train
    check_same_sizes([(image_path(n), label_path(n)) for n in names])
    files = [image_path(n) for n in names] + [label_path(n) for n in names]
    lists = {"train_aug": train, "val": val}
    save_manifest(out, "pascal_voc", files, lists, hists, VOC_CLASS_NAMES)
    return lists, hists


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc", required=True, help="VOCtrainval_11-May-2012.tar or its extracted folder")
    parser.add_argument("--sbd", required=True,
                        help="SBD benchmark.tgz, its extracted benchmark_RELEASE folder, or benchmark_RELEASE/dataset")
    add_common_args(parser, "DATA/pascal_voc", TRAIN_AUG_SIZE, VAL_SIZE)
    args = parser.parse_args(argv)
    c = partition_choice(args, "pascal_voc")
    prepare_voc(args.voc, args.sbd, args.out, partition_dir=c.partition_dir, seed=c.seed,
                denominators=args.partitions, expect_train=expected_or_none(args.expect_train),
                expect_val=expected_or_none(args.expect_val), workers=args.workers, force=args.force,
                partition_source=c.source, protocol=c.protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
