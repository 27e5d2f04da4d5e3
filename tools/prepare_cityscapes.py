#!/usr/bin/env python
"""Cityscapes from the official downloads, in one command.

    python tools/prepare_cityscapes.py --images leftImg8bit_trainvaltest.zip \\
        --labels gtFine_trainvaltest.zip --out DATA/city

Inputs (archives or their extracted folders): leftImg8bit_trainvaltest.zip (leftImg8bit/{train,val,test}/CITY/
*_leftImg8bit.png) and gtFine_trainvaltest.zip (gtFine/{train,val,test}/CITY/*_gtFine_{labelIds,color,
instanceIds}.png + *_polygons.json).

Output (DATA/city), the official layout reduced to what training reads:
  leftImg8bit/{train,val}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
  gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png
  gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelTrainIds.png   (written here: 0..18, 255 = ignore,
                                                                    the table of furnace.data.cityscapes_labels)
  lists/train.txt (2,975), lists/val.txt (500): names '{split}/{city}/{city}_{seq}_{frame}'
  lists/labeled_1-{16,8,4,2}.txt, lists/unlabeled_1-{16,8,4,2}.txt

Partitions: when the training list is the published one (2,975 images, as a set), the published lists shipped
in furnace/data/published_splits/cityscapes are installed, their '/images/train/CITY_SEQ_FRAME.png' lines
mapped to the names above; otherwise, or with --partition-source seeded / --seed N, seeded ones are generated.
--partition-dir DIR installs a folder of published lists of your own. The output says which.

The test split, colour and instance images and polygons are not extracted. When --out is the folder the
downloads were extracted into, the official files stay where they are and only the train-id PNGs are added.
Re-running skips finished files, and skips the archives when the previous run finished intact.
"""
from __future__ import annotations

import argparse
import os.path as osp
import re
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # the sibling module prepare_utils

from furnace.data.cityscapes_labels import CITYSCAPES_CLASS_NAMES, label_ids_to_train_ids  # noqa: E402
from furnace.data.splits import PARTITIONS  # noqa: E402
from prepare_utils import (PartitionChoice, PrepareError, PublishedLists, Source, TaskPool,  # noqa: E402
                           add_common_args, check_counts, check_magic, check_same_sizes, class_histogram, cli_main,
                           copy_done, decode_png, expected_or_none, incomplete_error, partition_choice, png_complete,
                           read_index_png, resolve_partitions, save_index_png, save_manifest, shipped_published,
                           try_skip, write_bytes_atomic, write_lists_and_partitions)

NUM_CLASSES = len(CITYSCAPES_CLASS_NAMES)
TRAIN_SIZE, VAL_SIZE = 2975, 500
HINT = "download it from https://www.cityscapes-dataset.com/downloads/ (login needed)"
SPLITS = ("train", "val")

IMAGE_RX = re.compile(r"(?:^|/)leftImg8bit/(train|val)/([^/]+)/([^/]+)_leftImg8bit\.png$")
LABEL_RX = re.compile(r"(?:^|/)gtFine/(train|val)/([^/]+)/([^/]+)_gtFine_labelIds\.png$")
_KEY_RX = re.compile(r"([^/\s]+?_\d{6}_\d{6})(?:_[A-Za-z0-9]+)*(?:\.\w+)?$")


def name_key(token: str) -> Optional[str]:
    """'{city}_{seq}_{frame}' of any spelling of a Cityscapes file or list name, e.g.
    'leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png' or 'train/aachen/aachen_000000_000019'."""
    m = _KEY_RX.search(token.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def image_path(out: Path, name: str) -> Path:
    return out / "leftImg8bit" / f"{name}_leftImg8bit.png"


def label_ids_path(out: Path, name: str) -> Path:
    return out / "gtFine" / f"{name}_gtFine_labelIds.png"


def train_ids_path(out: Path, name: str) -> Path:
    return out / "gtFine" / f"{name}_gtFine_labelTrainIds.png"


def _same_file(src: Optional[Path], dst: Path) -> bool:
    return src is not None and src.resolve() == dst.resolve()


def _copy_task(dst: Path, data: bytes):
    write_bytes_atomic(dst, data)
    return None


def _label_task(out: Path, name: str, data: bytes, where: str, copy_ids: bool, want_hist: bool):
    label_ids = decode_png(data, where, modes=("L",))
    train_ids = label_ids_to_train_ids(label_ids)
    if copy_ids:
        write_bytes_atomic(label_ids_path(out, name), data)
    save_index_png(train_ids_path(out, name), train_ids)
    return (name, class_histogram(train_ids, NUM_CLASSES)) if want_hist else None


def _existing_label_task(out: Path, name: str):
    return name, class_histogram(read_index_png(train_ids_path(out, name)), NUM_CLASSES)


def _scan(src: Source, rx: re.Pattern, desc: str, handle) -> Dict[str, str]:
    """Apply handle(member, name, split) to the members matching rx; returns {name: member name}."""
    seen: Dict[str, str] = {}
    for m in src.members(desc=desc):
        hit = rx.search(m.name)
        if not hit:
            continue
        split, city, stem = hit.groups()
        name = f"{split}/{city}/{stem}"
        if name in seen:
            raise PrepareError(f"{src} holds {name} twice: {seen[name]} and {m.name}; point to one dataset copy")
        seen[name] = m.name
        handle(m, name, split)
    return seen


def prepare_cityscapes(images, labels, out="DATA/city", partition_dir: Optional[Path] = None,
                       seed: Optional[int] = None, denominators: Sequence[int] = PARTITIONS,
                       expect_train: Optional[int] = TRAIN_SIZE, expect_val: Optional[int] = VAL_SIZE,
                       workers: int = 2, force: bool = False, partition_source: str = "auto",
                       protocol: Optional[str] = None, published: Optional[PublishedLists] = None) -> dict:
    """Build DATA/city from the official archives (see the module docstring). Returns the summary of
    write_lists_and_partitions plus skipped (True when the archives were not read). Partitions: see
    PartitionChoice (the published lists' '/images/train/CITY_SEQ_FRAME.png' lines become our names
    'train/CITY/CITY_SEQ_FRAME'); `published` replaces the shipped published lists."""
    out = Path(out)
    choice = PartitionChoice(partition_source, seed, protocol, partition_dir,
                             published if published is not None else shipped_published("cityscapes"))

    def check_partitions(train):  # before any file is written
        resolve_partitions(train, name_key, denominators, choice)

    manifest = try_skip(out, "cityscapes", force)
    if manifest is not None:
        lists, hists = manifest["lists"], manifest["hist"]
    else:
        lists, hists = _build(images, labels, out, workers, force, check_partitions)
    check_counts({s: len(lists[s]) for s in SPLITS}, {"train": expect_train, "val": expect_val}, "cityscapes")
    summary = write_lists_and_partitions(out / "lists", lists, "train", hists, CITYSCAPES_CLASS_NAMES,
                                         key_fn=name_key, denominators=denominators, choice=choice)
    summary["skipped"] = manifest is not None
    return summary


def _build(images, labels, out: Path, workers: int, force: bool, check_partitions=None) -> Tuple[dict, dict]:
    img_src = Source(images, "Cityscapes leftImg8bit archive", HINT)
    lbl_src = Source(labels, "Cityscapes gtFine archive", HINT)
    listed = img_src.cheap_names()  # a zip or folder: check the partitions before writing anything
    if check_partitions is not None and listed is not None:
        train = sorted({"train/{}/{}".format(*m.groups()[1:]) for m in map(IMAGE_RX.search, listed)
                        if m and m.group(1) == "train"})
        if train:
            check_partitions(train)

    with TaskPool(workers) as pool:
        def handle_image(m, name, split):
            dst = image_path(out, name)
            if _same_file(m.fs_path, dst) or (not force and copy_done(dst, m.size)):
                return
            data = m.read()
            check_magic(data, "png", f"{img_src} {m.name}")
            pool.submit(_copy_task, dst, data)

        def handle_label(m, name, split):
            copy_ids = not _same_file(m.fs_path, label_ids_path(out, name))
            ids_done = not copy_ids or copy_done(label_ids_path(out, name), m.size)
            want_hist = split == "train"
            if force or not (ids_done and png_complete(train_ids_path(out, name))):
                pool.submit(_label_task, out, name, m.read(), f"{lbl_src} {m.name}",
                            copy_ids and (force or not ids_done), want_hist)
            elif want_hist:
                pool.submit(_existing_label_task, out, name)

        image_names = _scan(img_src, IMAGE_RX, f"leftImg8bit {img_src.path.name}", handle_image)
        pool.finish()
        if not image_names:
            raise PrepareError(f"{img_src} holds no leftImg8bit/{{train,val}}/CITY/*_leftImg8bit.png; "
                               "is it leftImg8bit_trainvaltest.zip?")
        label_names = _scan(lbl_src, LABEL_RX, f"gtFine {lbl_src.path.name}", handle_label)
        hists = dict(r for r in pool.finish() if r is not None)
        if not label_names:
            raise PrepareError(f"{lbl_src} holds no gtFine/{{train,val}}/CITY/*_gtFine_labelIds.png; "
                               "is it gtFine_trainvaltest.zip?")

    for src in (img_src, lbl_src):  # a tar cut at a member boundary after the last file needed
        src.check_complete()
    no_label = sorted(set(image_names) - set(label_names))
    no_image = sorted(set(label_names) - set(image_names))
    if no_label or no_image:
        raise incomplete_error({
            f"labelIds of images in {img_src} ({lbl_src})": [f"gtFine/{n}_gtFine_labelIds.png" for n in no_label],
            f"images of labels in {lbl_src} ({img_src})": [f"leftImg8bit/{n}_leftImg8bit.png" for n in no_image],
        }, [img_src, lbl_src])

    names = sorted(image_names)
    lists = {s: [n for n in names if n.split("/", 1)[0] == s] for s in SPLITS}
    check_same_sizes([(image_path(out, n), train_ids_path(out, n)) for n in names])
    files = [f(out, n) for n in names for f in (image_path, label_ids_path, train_ids_path)]
    save_manifest(out, "cityscapes", files, lists, hists, CITYSCAPES_CLASS_NAMES)
    return lists, hists


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="leftImg8bit_trainvaltest.zip or its extracted folder")
    parser.add_argument("--labels", required=True, help="gtFine_trainvaltest.zip or its extracted folder")
    add_common_args(parser, "DATA/city", TRAIN_SIZE, VAL_SIZE)
    args = parser.parse_args(argv)
    c = partition_choice(args, "cityscapes")
    prepare_cityscapes(args.images, args.labels, args.out, partition_dir=c.partition_dir, seed=c.seed,
                       denominators=args.partitions, expect_train=expected_or_none(args.expect_train),
                       expect_val=expected_or_none(args.expect_val), workers=args.workers,
                       force=args.force, partition_source=c.source, protocol=c.protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
