"""tools/prepare_voc.py and tools/prepare_cityscapes.py on miniature archives in the official formats."""
import gzip
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

import make_toy_data
import prepare_cityscapes
import prepare_voc
from furnace.data.splits import partition, read_list
from prepare_utils import (PartitionChoice, PrepareError, PublishedLists, find_published, is_published_set,
                           list_tokens, published_protocols, resolve_partitions, shipped_published)

# ------------------------------------------------------------------------------------------ miniature VOC
VOC_TRAIN = [f"2007_{i:06d}" for i in (1, 2, 3, 4)]
VOC_VAL = [f"2007_{i:06d}" for i in (10, 11, 12)]
SBD_TRAIN = [f"2008_{i:06d}" for i in range(20, 32)] + ["2007_000002", "2007_000010"]  # one VOC train, one VOC val
SBD_VAL = [f"2008_{i:06d}" for i in range(40, 46)] + ["2007_000003"]
NOT_IN_VOC = "2008_000045"  # an SBD image the VOC archive lacks: its JPEG must come from SBD
EXTRA = "2009_000999"  # in VOC JPEGImages but in no list: must not be written
TRAIN_AUG = sorted((set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL))
assert len(TRAIN_AUG) == 22


def voc_palette() -> list:
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def jpeg_bytes(rng, h, w, quality) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def palette_png(label) -> bytes:
    img = Image.fromarray(label)
    img.putpalette(voc_palette())
    assert img.mode == "P"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sbd_mat(seg) -> bytes:
    """A cls/NAME.mat as SBD ships it: struct GTcls with Boundaries (cell of sparse), Segmentation, CategoriesPresent."""
    bounds = np.empty((20, 1), dtype=object)
    for k in range(20):
        bounds[k, 0] = scipy.sparse.csc_matrix((seg == k + 1).astype(np.float64))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": {"Boundaries": bounds, "Segmentation": seg,
                                     "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8)}})
    return buf.getvalue()


def make_voc_sources(root: Path, seed: int = 0):
    """Files {member name: bytes} of a miniature VOC trainval tar and SBD benchmark tgz, plus the truth."""
    rng = np.random.default_rng(seed)
    voc, sbd = {}, {}
    truth = {"voc_jpg": {}, "sbd_jpg": {}, "voc_label": {}, "sbd_label": {}}
    voc_root, sbd_root = "VOCdevkit/VOC2012/", "benchmark_RELEASE/dataset/"
    all_names = sorted(set(VOC_TRAIN) | set(VOC_VAL) | set(SBD_TRAIN) | set(SBD_VAL) | {EXTRA})
    sizes = {n: (int(rng.integers(5, 10)), int(rng.integers(6, 11))) for n in all_names}
    for n in all_names:
        h, w = sizes[n]
        if n != NOT_IN_VOC:
            truth["voc_jpg"][n] = voc[f"{voc_root}JPEGImages/{n}.jpg"] = jpeg_bytes(rng, h, w, 90)
            voc[f"{voc_root}Annotations/{n}.xml"] = b"<annotation/>"
        if n in VOC_TRAIN or n in VOC_VAL:
            lab = rng.integers(0, 21, (h, w)).astype(np.uint8)
            lab[0, :] = lab[-1, :] = 255  # object borders
            truth["voc_label"][n] = lab
            voc[f"{voc_root}SegmentationClass/{n}.png"] = palette_png(lab)
            voc[f"{voc_root}SegmentationObject/{n}.png"] = palette_png(np.zeros_like(lab))
        if n in SBD_TRAIN or n in SBD_VAL:
            truth["sbd_jpg"][n] = sbd[f"{sbd_root}img/{n}.jpg"] = jpeg_bytes(rng, h, w, 60)
            seg = rng.integers(0, 21, (h, w)).astype(np.uint8)
            truth["sbd_label"][n] = seg
            sbd[f"{sbd_root}cls/{n}.mat"] = sbd_mat(seg)
            sbd[f"{sbd_root}inst/{n}.mat"] = b"not read"
    voc[f"{voc_root}ImageSets/Segmentation/train.txt"] = "".join(f"{n}\n" for n in VOC_TRAIN).encode()
    voc[f"{voc_root}ImageSets/Segmentation/val.txt"] = "".join(f"{n}\n" for n in VOC_VAL).encode()
    voc[f"{voc_root}ImageSets/Segmentation/trainval.txt"] = "".join(f"{n}\n" for n in VOC_TRAIN + VOC_VAL).encode()
    # lists last in the .tgz, so finding them streams the whole compressed archive
    sbd[f"{sbd_root}train.txt"] = "".join(f"{n}\n" for n in SBD_TRAIN).encode()
    sbd[f"{sbd_root}val.txt"] = "".join(f"{n}\n" for n in SBD_VAL).encode()
    return voc, sbd, truth


def write_tar(path: Path, files: dict, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, files: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def write_folder(root: Path, files: dict) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def voc_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocsrc")
    voc, sbd, truth = make_voc_sources(root)
    return {
        "voc": voc, "sbd": sbd, "truth": truth,
        "voc_tar": write_tar(root / "VOCtrainval_11-May-2012.tar", voc),
        "sbd_tgz": write_tar(root / "benchmark.tgz", sbd, "w:gz"),
    }


MINI_VOC = ["--expect-train", "22", "--expect-val", "3", "--workers", "2"]


@pytest.fixture(scope="module")
def voc_out(voc_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocout") / "pascal_voc"
    rc = prepare_voc.main(["--voc", str(voc_data["voc_tar"]), "--sbd", str(voc_data["sbd_tgz"]),
                           "--out", str(out)] + MINI_VOC)
    assert rc == 0
    return out


def files_under(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_sbd_mat_reads_like_sbd():
    seg = np.arange(12, dtype=np.uint8).reshape(3, 4) % 21
    mat = scipy.io.loadmat(io.BytesIO(sbd_mat(seg)), struct_as_record=False, squeeze_me=True)
    assert np.array_equal(mat["GTcls"].Segmentation, seg)
    assert mat["GTcls"].Boundaries.shape == (20,)
    assert np.array_equal(prepare_voc.decode_sbd_mat(sbd_mat(seg), "x.mat"), seg)
    with pytest.raises(PrepareError, match="bad.mat has no GTcls.Segmentation"):
        buf = io.BytesIO()
        scipy.io.savemat(buf, {"GTinst": {"Segmentation": seg}})
        prepare_voc.decode_sbd_mat(buf.getvalue(), "bad.mat")


def test_voc_output_file_by_file(voc_data, voc_out):
    truth = voc_data["truth"]
    expected = {"lists/train_aug.txt", "lists/val.txt", ".prepared.json"}
    for d in (16, 8, 4, 2):
        expected |= {f"lists/labeled_1-{d}.txt", f"lists/unlabeled_1-{d}.txt"}
    for split, names in (("train_aug", TRAIN_AUG), ("val", VOC_VAL)):
        expected |= {f"{split}/image/{n}.jpg" for n in names} | {f"{split}/label/{n}.png" for n in names}
    assert files_under(voc_out) == expected  # nothing else (no EXTRA, no VOC val image in train_aug, no .part)

    for n in TRAIN_AUG + VOC_VAL:
        split = "val" if n in VOC_VAL else "train_aug"
        src = truth["sbd_jpg"][n] if n == NOT_IN_VOC else truth["voc_jpg"][n]
        assert (voc_out / split / "image" / f"{n}.jpg").read_bytes() == src, n  # VOC bytes win
        lab = Image.open(voc_out / split / "label" / f"{n}.png")
        assert lab.mode == "L"
        want = truth["voc_label"][n] if n in VOC_TRAIN or n in VOC_VAL else truth["sbd_label"][n]
        assert np.array_equal(np.array(lab), want), n
    # VOC train images that SBD also has keep the VOC label with its 255 borders
    assert (np.array(Image.open(voc_out / "train_aug/label/2007_000002.png"))[0] == 255).all()

    assert read_list(voc_out / "lists/train_aug.txt") == TRAIN_AUG
    assert read_list(voc_out / "lists/val.txt") == VOC_VAL
    for d, n_lab in ((16, 1), (8, 2), (4, 5), (2, 11)):
        lab = read_list(voc_out / f"lists/labeled_1-{d}.txt")
        unl = read_list(voc_out / f"lists/unlabeled_1-{d}.txt")
        assert (lab, unl) == partition(TRAIN_AUG, d, 0)
        assert len(lab) == n_lab and sorted(lab + unl) == TRAIN_AUG


def test_voc_counts_and_balance_printed(voc_data, voc_out, capsys):
    summary = prepare_voc.prepare_voc(voc_data["voc_tar"], voc_data["sbd_tgz"], voc_out,
                                      expect_train=22, expect_val=3)
    text = capsys.readouterr().out
    assert "pascal_voc train_aug: 22 images (ok)" in text and "pascal_voc val: 3 images (ok)" in text
    assert "partition 1/4: 5 labeled, 17 unlabeled (seed 0)" in text
    # balance recomputed from the written labels: max_c |f_labeled(c) - f_all(c)|
    def freq(names):
        h = sum(np.bincount(np.array(Image.open(voc_out / f"train_aug/label/{n}.png")).ravel(), minlength=256)[:21]
                for n in names)
        return h / h.sum()
    for d in (16, 8, 4, 2):
        lab = read_list(voc_out / f"lists/labeled_1-{d}.txt")
        want = np.abs(freq(lab) - freq(TRAIN_AUG)).max()
        assert summary["max_balance_diff"][d] == pytest.approx(want, abs=1e-12)
    assert f"{100 * summary['max_balance_diff'][2]:10.2f}" in text.splitlines()[-1]
    assert "aeroplane" in text


def test_voc_rerun_skips_and_repairs(voc_data, voc_out, tmp_path):
    out = tmp_path / "pascal_voc"
    shutil.copytree(voc_out, out)
    old = 1_000_000_000
    for p in out.rglob("*"):
        os.utime(p, (old, old))
    # finished run: archives are not even opened (they may be gone)
    s = prepare_voc.prepare_voc(tmp_path / "gone.tar", tmp_path / "gone.tgz", out, expect_train=22, expect_val=3)
    assert s["skipped"] and s["counts"] == {"train_aug": 22, "val": 3}
    assert all(p.stat().st_mtime == old for p in out.rglob("*") if "lists" not in p.parts and p.is_file())
    # a lost image and label are rewritten, nothing else is
    (out / "train_aug/image/2008_000045.jpg").unlink()
    (out / "val/label/2007_000011.png").unlink()
    s = prepare_voc.prepare_voc(voc_data["voc_tar"], voc_data["sbd_tgz"], out, expect_train=22, expect_val=3)
    assert not s["skipped"]
    changed = {p.relative_to(out).as_posix() for p in out.rglob("*")
               if p.is_file() and p.stat().st_mtime != old and "lists" not in p.parts}
    assert changed == {"train_aug/image/2008_000045.jpg", "val/label/2007_000011.png", ".prepared.json"}
    assert (out / "train_aug/image/2008_000045.jpg").read_bytes() == voc_data["truth"]["sbd_jpg"][NOT_IN_VOC]
    assert np.array_equal(np.array(Image.open(out / "val/label/2007_000011.png")),
                          voc_data["truth"]["voc_label"]["2007_000011"])
    # --force rewrites every file
    s = prepare_voc.prepare_voc(voc_data["voc_tar"], voc_data["sbd_tgz"], out, expect_train=22, expect_val=3,
                                force=True)
    assert not s["skipped"]
    assert all(p.stat().st_mtime != old for p in out.rglob("*") if p.is_file())


def test_voc_from_extracted_folders_matches_archives(voc_data, voc_out, tmp_path):
    vdir = write_folder(tmp_path / "voc", voc_data["voc"])
    sdir = write_folder(tmp_path / "sbd", voc_data["sbd"])
    out = tmp_path / "pascal_voc"
    assert prepare_voc.main(["--voc", str(vdir / "VOCdevkit"), "--sbd", str(sdir), "--out", str(out),
                             "--workers", "0"] + MINI_VOC[:4]) == 0
    assert files_under(out) == files_under(voc_out)
    for rel in files_under(out) - {".prepared.json"}:
        assert (out / rel).read_bytes() == (voc_out / rel).read_bytes(), rel


@pytest.mark.parametrize("which", ["voc", "sbd"])
def test_voc_truncated_archive_is_named(voc_data, tmp_path, capsys, which):
    src = voc_data["voc_tar"] if which == "voc" else voc_data["sbd_tgz"]
    cut = tmp_path / src.name
    data = src.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    args = {"voc": voc_data["voc_tar"], "sbd": voc_data["sbd_tgz"], which: cut}
    with pytest.raises(PrepareError) as err:
        prepare_voc.prepare_voc(args["voc"], args["sbd"], tmp_path / "out", expect_train=22, expect_val=3)
    msg = str(err.value)
    assert str(cut) in msg and ("truncated" in msg or "has no" in msg)
    assert prepare_voc.main(["--voc", str(args["voc"]), "--sbd", str(args["sbd"]),
                             "--out", str(tmp_path / "out")] + MINI_VOC) == 1
    assert str(cut) in capsys.readouterr().err


def test_voc_truncated_inside_a_member(voc_data, tmp_path):
    # cut in the middle of a JPEG's data: the tar stream ends early
    data = voc_data["voc_tar"].read_bytes()
    with tarfile.open(voc_data["voc_tar"]) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith(f"{VOC_VAL[1]}.jpg"))
    cut = tmp_path / "VOCtrainval_11-May-2012.tar"
    cut.write_bytes(data[: m.offset_data + m.size // 2])
    with pytest.raises(PrepareError, match="truncated or corrupt") as err:
        prepare_voc.prepare_voc(cut, voc_data["sbd_tgz"], tmp_path / "out", expect_train=22, expect_val=3)
    assert str(cut) in str(err.value)


def test_voc_truncated_between_members(voc_data, tmp_path):
    # lists first, then a cut exactly at a member header: tarfile itself stops silently there
    voc = dict(sorted(voc_data["voc"].items(), key=lambda kv: "ImageSets" not in kv[0]))
    full = write_tar(tmp_path / "full.tar", voc)
    with tarfile.open(full) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith(f"JPEGImages/{VOC_VAL[0]}.jpg"))
    cut = tmp_path / "VOCtrainval_11-May-2012.tar"
    cut.write_bytes(full.read_bytes()[: m.offset])
    with pytest.raises(PrepareError) as err:
        prepare_voc.prepare_voc(cut, voc_data["sbd_tgz"], tmp_path / "out", expect_train=22, expect_val=3)
    msg = str(err.value)
    assert f"{cut} is truncated (it stops before its end-of-archive marker)" in msg
    assert f"{VOC_VAL[0]}.jpg" in msg


def test_voc_missing_files_are_named(voc_data, tmp_path):
    voc = {k: v for k, v in voc_data["voc"].items() if not k.endswith(f"JPEGImages/{VOC_VAL[1]}.jpg")}
    sbd = {k: v for k, v in voc_data["sbd"].items() if not k.endswith("cls/2008_000021.mat")}
    vt = write_tar(tmp_path / "voc.tar", voc)
    st = write_tar(tmp_path / "sbd.tgz", sbd, "w:gz")
    with pytest.raises(PrepareError) as err:
        prepare_voc.prepare_voc(vt, st, tmp_path / "out", expect_train=22, expect_val=3)
    msg = str(err.value)
    assert f"{VOC_VAL[1]}.jpg" in msg and "2008_000021.mat" in msg
    assert str(vt) in msg and str(st) in msg
    # an archive without the split lists, and an absent archive
    vt2 = write_tar(tmp_path / "nolists.tar", {k: v for k, v in voc.items() if "ImageSets" not in k})
    with pytest.raises(PrepareError, match="has no ImageSets/Segmentation/train.txt"):
        prepare_voc.prepare_voc(vt2, st, tmp_path / "out2")
    with pytest.raises(PrepareError, match="VOC2012 trainval archive not found: .*nope.tar"):
        prepare_voc.prepare_voc(tmp_path / "nope.tar", st, tmp_path / "out3")


def test_voc_count_check(voc_data, voc_out, capsys):
    with pytest.raises(PrepareError, match="train_aug has 22 images, expected 10582; val has 3 images, expected 1449"):
        prepare_voc.prepare_voc(voc_data["voc_tar"], voc_data["sbd_tgz"], voc_out)
    assert "pascal_voc train_aug: 22 images (EXPECTED 10582)" in capsys.readouterr().out


def test_published_partitions_used_as_is(voc_data, voc_out, tmp_path):
    out = tmp_path / "pascal_voc"
    shutil.copytree(voc_out, out)
    pub = tmp_path / "published"
    lab8 = [TRAIN_AUG[5], TRAIN_AUG[0], TRAIN_AUG[9]]  # published order is kept
    unl8 = [n for n in TRAIN_AUG if n not in lab8][:-1]  # and so is an unlabeled list that omits one
    (pub / "subset_train_aug").mkdir(parents=True)
    (pub / "subset_train_aug/train_aug_labeled_1-8.txt").write_text(
        "".join(f"train_aug/image/{n}.jpg\ttrain_aug/label/{n}.png\n" for n in lab8))
    (pub / "subset_train_aug/train_aug_unlabeled_1-8.txt").write_text(
        "".join(f"train_aug/image/{n}.jpg\ttrain_aug/label/{n}.png\n" for n in unl8))
    (pub / "1_4").mkdir()
    (pub / "1_4/labeled.txt").write_text("".join(f"JPEGImages/{n}.jpg SegmentationClass/{n}.png\n"
                                                 for n in TRAIN_AUG[:6]))
    s = prepare_voc.prepare_voc(None, None, out, partition_dir=pub, expect_train=22, expect_val=3)
    assert read_list(out / "lists/labeled_1-8.txt") == lab8
    assert read_list(out / "lists/unlabeled_1-8.txt") == unl8
    assert read_list(out / "lists/labeled_1-4.txt") == TRAIN_AUG[:6]
    assert read_list(out / "lists/unlabeled_1-4.txt") == TRAIN_AUG[6:]
    assert (read_list(out / "lists/labeled_1-16.txt"), read_list(out / "lists/unlabeled_1-16.txt")) == \
        partition(TRAIN_AUG, 16, 0)
    assert "train_aug_labeled_1-8.txt" in s["partitions"][8][2] and s["partitions"][16][2] == "seed 0"
    assert set(find_published(pub)) == {(8, "labeled"), (8, "unlabeled"), (4, "labeled")}
    (pub / "1_4/labeled.txt").write_text("2007_000010\n")  # a VOC val image
    with pytest.raises(PrepareError, match=r"labeled.txt line 1: '2007_000010' is not an image of the training"):
        prepare_voc.prepare_voc(None, None, out, partition_dir=pub, expect_train=22, expect_val=3)


# ------------------------------------------------------------------------------------ miniature Cityscapes
CITY_SPLITS = {"train": {"aachen": 9, "bochum": 7}, "val": {"frankfurt": 3}, "test": {"berlin": 2}}
# the official table, written out independently of furnace.data.cityscapes_labels
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITY_TRAIN = sorted(f"train/{c}/{c}_{i:06d}_{19 + i:06d}" for c, k in CITY_SPLITS["train"].items() for i in range(k))
CITY_VAL = sorted(f"val/{c}/{c}_{i:06d}_{19 + i:06d}" for c, k in CITY_SPLITS["val"].items() for i in range(k))


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def city_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("citysrc")
    rng = np.random.default_rng(1)
    img, gt = {"README": b"readme", "license.txt": b"license"}, {"README": b"readme", "license.txt": b"license"}
    truth = {}
    for split, cities in CITY_SPLITS.items():
        for city, k in cities.items():
            for i in range(k):
                stem = f"{city}_{i:06d}_{19 + i:06d}"
                h, w = 4 + i % 3, 8
                img[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = png_bytes(
                    rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                ids = rng.integers(0, 34, (h, w)).astype(np.uint8)
                ids[0, :3] = (7, 0, 33)
                base = f"gtFine/{split}/{city}/{stem}_gtFine_"
                gt[base + "labelIds.png"] = png_bytes(ids)
                gt[base + "color.png"] = png_bytes(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
                gt[base + "instanceIds.png"] = png_bytes(ids.astype(np.uint16) * 1000)  # 16-bit as the official files
                gt[base + "polygons.json"] = json.dumps({"imgHeight": h, "imgWidth": w, "objects": []}).encode()
                truth[f"{split}/{city}/{stem}"] = ids
    return {"img": img, "gt": gt, "truth": truth,
            "img_zip": write_zip(root / "leftImg8bit_trainvaltest.zip", img),
            "gt_zip": write_zip(root / "gtFine_trainvaltest.zip", gt)}


MINI_CITY = ["--expect-train", "16", "--expect-val", "3", "--workers", "2"]


def city_expected_files():
    exp = {"lists/train.txt", "lists/val.txt", ".prepared.json"}
    for d in (16, 8, 4, 2):
        exp |= {f"lists/labeled_1-{d}.txt", f"lists/unlabeled_1-{d}.txt"}
    for n in CITY_TRAIN + CITY_VAL:
        exp |= {f"leftImg8bit/{n}_leftImg8bit.png", f"gtFine/{n}_gtFine_labelIds.png",
                f"gtFine/{n}_gtFine_labelTrainIds.png"}
    return exp


def test_cityscapes_from_zips_file_by_file(city_data, tmp_path, capsys):
    out = tmp_path / "city"
    args = ["--images", str(city_data["img_zip"]), "--labels", str(city_data["gt_zip"]), "--out", str(out)]
    assert prepare_cityscapes.main(args + MINI_CITY) == 0
    text = capsys.readouterr().out
    assert "cityscapes train: 16 images (ok)" in text and "cityscapes val: 3 images (ok)" in text
    assert files_under(out) == city_expected_files()  # no test split, colour, instance or polygon files
    lut = np.full(256, 255, np.uint8)
    for k, v in OFFICIAL.items():
        lut[k] = v
    for n in CITY_TRAIN + CITY_VAL:
        assert (out / f"leftImg8bit/{n}_leftImg8bit.png").read_bytes() == \
            city_data["img"][f"leftImg8bit/{n}_leftImg8bit.png"]
        assert (out / f"gtFine/{n}_gtFine_labelIds.png").read_bytes() == city_data["gt"][f"gtFine/{n}_gtFine_labelIds.png"]
        tid = Image.open(out / f"gtFine/{n}_gtFine_labelTrainIds.png")
        assert tid.mode == "L"
        tid = np.array(tid)
        assert np.array_equal(tid, lut[city_data["truth"][n]]) and tuple(tid[0, :3]) == (0, 255, 18)
    assert read_list(out / "lists/train.txt") == CITY_TRAIN and read_list(out / "lists/val.txt") == CITY_VAL
    assert CITY_TRAIN[0] == "train/aachen/aachen_000000_000019"
    for d in (16, 8, 4, 2):
        assert (read_list(out / f"lists/labeled_1-{d}.txt"), read_list(out / f"lists/unlabeled_1-{d}.txt")) == \
            partition(CITY_TRAIN, d, 0)
    assert "road" in text and "max |diff|" in text

    # re-run: archives not read; lists identical
    old = 1_000_000_000
    for p in out.rglob("*"):
        os.utime(p, (old, old))
    s = prepare_cityscapes.prepare_cityscapes(tmp_path / "gone.zip", tmp_path / "gone.zip", out,
                                              expect_train=16, expect_val=3)
    assert s["skipped"] and read_list(out / "lists/train.txt") == CITY_TRAIN
    # a lost train-id PNG is rebuilt alone
    (out / f"gtFine/{CITY_VAL[0]}_gtFine_labelTrainIds.png").unlink()
    s = prepare_cityscapes.prepare_cityscapes(city_data["img_zip"], city_data["gt_zip"], out,
                                              expect_train=16, expect_val=3)
    changed = {p.relative_to(out).as_posix() for p in out.rglob("*")
               if p.is_file() and p.stat().st_mtime != old and "lists" not in p.parts}
    assert not s["skipped"]
    assert changed == {f"gtFine/{CITY_VAL[0]}_gtFine_labelTrainIds.png", ".prepared.json"}


def test_cityscapes_in_place_folder(city_data, tmp_path):
    root = write_folder(tmp_path / "cityscapes", {**city_data["img"], **city_data["gt"]})
    s = prepare_cityscapes.prepare_cityscapes(root, root, root, expect_train=16, expect_val=3, workers=0)
    assert s["counts"] == {"train": 16, "val": 3}
    for n in CITY_TRAIN + CITY_VAL:
        assert np.array_equal(np.array(Image.open(root / f"gtFine/{n}_gtFine_labelTrainIds.png")),
                              prepare_cityscapes.label_ids_to_train_ids(city_data["truth"][n]))
    # the official files were left alone (no copies made) and the test split got no train ids
    assert not list(root.rglob("*.part")) and not list((root / "gtFine/test").rglob("*labelTrainIds*"))


def test_cityscapes_missing_and_truncated(city_data, tmp_path):
    lost = f"gtFine/{CITY_TRAIN[3]}_gtFine_labelIds.png"
    gz = write_zip(tmp_path / "gtFine_trainvaltest.zip", {k: v for k, v in city_data["gt"].items() if k != lost})
    with pytest.raises(PrepareError) as err:
        prepare_cityscapes.prepare_cityscapes(city_data["img_zip"], gz, tmp_path / "o1", expect_train=16,
                                              expect_val=3)
    assert lost in str(err.value) and str(gz) in str(err.value)

    data = city_data["img_zip"].read_bytes()
    cut = tmp_path / "leftImg8bit_trainvaltest.zip"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrepareError, match="truncated or corrupt") as err:
        prepare_cityscapes.prepare_cityscapes(cut, city_data["gt_zip"], tmp_path / "o2")
    assert str(cut) in str(err.value)

    with pytest.raises(PrepareError, match="train has 16 images, expected 2975; val has 3 images, expected 500"):
        prepare_cityscapes.prepare_cityscapes(city_data["img_zip"], city_data["gt_zip"], tmp_path / "o3")
    with pytest.raises(PrepareError, match="holds no gtFine"):
        prepare_cityscapes.prepare_cityscapes(city_data["img_zip"], city_data["img_zip"], tmp_path / "o4")


def test_cityscapes_name_key():
    k = prepare_cityscapes.name_key
    assert k("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png") == "aachen_000000_000019"
    assert k("train/aachen/aachen_000000_000019") == "aachen_000000_000019"
    assert k("aachen_000000_000019_gtFine_labelTrainIds.png") == "aachen_000000_000019"
    assert k("nonsense.png") is None


# ------------------------------------------------------------------- published partitions shipped with us
SHIPPED = Path(__file__).resolve().parents[1] / "furnace" / "data" / "published_splits"
SHARED_SPLITS = Path(__file__).resolve().parents[1].parent / "shared" / "splits"  # ../shared beside the clone
DATASET_KEY = {"voc": prepare_voc.name_key, "cityscapes": prepare_cityscapes.name_key}


def keys_of(path, key_fn):
    keys = [key_fn(t) for t in list_tokens(path)]
    assert None not in keys and len(set(keys)) == len(keys), path
    return set(keys)


@pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason=f"no published lists at {SHARED_SPLITS}")
@pytest.mark.parametrize("ds", ["voc", "cityscapes"])
def test_shipped_partitions_equal_the_published_ones(ds):
    key_fn, ship, shared = DATASET_KEY[ds], SHIPPED / ds, SHARED_SPLITS / ds
    # every partition list of every protocol is shipped, and nothing else is taken for one
    assert {p: set(g) for p, g in published_protocols(ship).items()} == \
        {p: set(g) for p, g in published_protocols(shared).items()}
    files = sorted(p.name for p in ship.glob("*.txt"))
    protocol_lists = {"voc": ["train.txt", "train_aug.txt", "val.txt"], "cityscapes": ["train.txt", "val.txt"]}[ds]
    assert set(protocol_lists) <= set(files)
    for name in files:
        assert keys_of(ship / name, key_fn) == keys_of(shared / name, key_fn), name
        assert (ship / name).read_bytes() == (shared / name).read_bytes(), name  # shipped unchanged
    assert (SHIPPED / "SOURCE.md").is_file()
    # the partitions as the preparer installs them for the published training list (Cityscapes names mapped)
    pub = shipped_published("pascal_voc" if ds == "voc" else "cityscapes")
    if ds == "voc":
        train = list_tokens(ship / "train_aug.txt")
    else:
        train = [f"train/{k.split('_')[0]}/{k}" for k in map(key_fn, list_tokens(ship / "train.txt"))]
    want = {"voc": {16: 662, 8: 1323, 4: 2646, 2: 5291}, "cityscapes": {16: 186, 8: 372, 4: 744, 2: 1488}}[ds]
    for protocol in (["train_aug", "pseudoseg"] if ds == "voc" else ["train_aug"]):
        r = resolve_partitions(train, key_fn, (16, 8, 4, 2), PartitionChoice(protocol=protocol, published=pub))
        for p in r.parts:
            for kind, names in (("labeled", p.labeled), ("unlabeled", p.unlabeled)):
                f = shared / f"{protocol}_{kind}_1-{p.denominator}.txt"
                assert {key_fn(n) for n in names} == keys_of(f, key_fn), f
                assert set(names) <= set(train)
            if protocol == "train_aug":
                assert len(p.labeled) == want[p.denominator]
                assert sorted(p.labeled + p.unlabeled) == sorted(train)
    if ds == "cityscapes":
        assert r.parts[0].labeled[0] == "train/jena/jena_000078_000019"
        assert prepare_cityscapes.image_path(Path("o"), r.parts[0].labeled[0]).as_posix() == \
            "o/leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png"


def test_is_published_set():
    voc = ["2007_000032", "2007_000039"]
    assert is_published_set(voc, ["2007_000039", "2007_000032"], prepare_voc.name_key)
    assert not is_published_set(voc[:1], voc, prepare_voc.name_key)
    assert not is_published_set(voc + ["2008_000001"], voc, prepare_voc.name_key)
    ck = prepare_cityscapes.name_key
    ours = ["train/jena/jena_000078_000019", "train/ulm/ulm_000001_000019"]
    theirs = ["/images/train/ulm_000001_000019.png", "/images/train/jena_000078_000019.png"]
    assert is_published_set(ours, theirs, ck) and not is_published_set(ours[:1], theirs, ck)


def write_published(folder: Path, files: dict) -> Path:
    """A folder of published lists {file name: [line, ...]}, written with CRLF as the published ones are."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_bytes("\r\n".join(lines).encode())
    return folder


def voc_published(folder: Path, train=TRAIN_AUG) -> PublishedLists:
    rng = np.random.default_rng(7)
    files = {"train_aug.txt": list(rng.permutation(train)), "val.txt": VOC_VAL}
    for d in (16, 8, 4, 2):
        order = list(rng.permutation(TRAIN_AUG))
        k = max(1, len(TRAIN_AUG) // d)
        files[f"train_aug_labeled_1-{d}.txt"], files[f"train_aug_unlabeled_1-{d}.txt"] = order[:k], order[k:]
        files[f"pseudoseg_labeled_1-{d}.txt"] = VOC_TRAIN[: 1 + 4 // d]
        files[f"pseudoseg_unlabeled_1-{d}.txt"] = VOC_TRAIN[4 // d:]  # shares one image, as published
    write_published(folder, files)
    return PublishedLists(folder, "train_aug.txt")


def lists_of(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((out / "lists").glob("*.txt"))}


def test_voc_published_partitions_installed(voc_out, tmp_path, capsys):
    out = tmp_path / "pascal_voc"
    shutil.copytree(voc_out, out)
    pub = voc_published(tmp_path / "published")
    kw = dict(expect_train=22, expect_val=3, published=pub)
    s = prepare_voc.prepare_voc(None, None, out, **kw)  # the training list is the published one
    text = capsys.readouterr().out
    assert f"partitions: the published train_aug lists shipped in {pub.folder} (the training list is the " \
           "published one)" in text
    for d in (16, 8, 4, 2):
        for kind in ("labeled", "unlabeled"):
            assert read_list(out / f"lists/{kind}_1-{d}.txt") == read_list(pub.folder / f"train_aug_{kind}_1-{d}.txt")
        assert "train_aug_labeled_1-%d.txt" % d in s["partitions"][d][2]
    # another published protocol, by name; its shared image is kept and reported
    s = prepare_voc.prepare_voc(None, None, out, protocol="pseudoseg", **kw)
    text = capsys.readouterr().out
    assert read_list(out / "lists/labeled_1-8.txt") == VOC_TRAIN[:1]
    assert read_list(out / "lists/unlabeled_1-8.txt") == VOC_TRAIN
    assert read_list(out / "lists/labeled_1-2.txt") == VOC_TRAIN[:3]
    assert read_list(out / "lists/unlabeled_1-2.txt") == VOC_TRAIN[2:]
    assert f"1 image(s) in both lists, kept as published: {VOC_TRAIN[2]}" in text
    # seeded on request
    for kw2 in (dict(partition_source="seeded", seed=3), dict(seed=3)):
        s = prepare_voc.prepare_voc(None, None, out, **kw, **kw2)
        assert "partitions: seeded (seed 3), as asked" in capsys.readouterr().out
        for d in (16, 8, 4, 2):
            assert (read_list(out / f"lists/labeled_1-{d}.txt"), read_list(out / f"lists/unlabeled_1-{d}.txt")) == \
                partition(TRAIN_AUG, d, 3)
    # a training list that is not the published one gets seeded partitions, and says why
    pub2 = voc_published(tmp_path / "published2", train=TRAIN_AUG[1:])
    prepare_voc.prepare_voc(None, None, out, expect_train=22, expect_val=3, published=pub2)
    text = capsys.readouterr().out
    assert "partitions: seeded (seed 0), since the training list (22 images) is not the published one " \
           f"({pub2.folder / 'train_aug.txt'}, 21 images)" in text
    assert "partition 1/4: 5 labeled, 17 unlabeled (seed 0)" in text
    assert read_list(out / "lists/labeled_1-4.txt") == partition(TRAIN_AUG, 4, 0)[0]


def test_voc_default_is_seeded_for_other_sets(voc_data, voc_out, capsys):
    # the shipped lists are the default; the miniature set is not the published one
    s = prepare_voc.prepare_voc(voc_data["voc_tar"], voc_data["sbd_tgz"], voc_out, expect_train=22, expect_val=3)
    text = capsys.readouterr().out
    assert "partitions: seeded (seed 0), since the training list (22 images) is not the published one " \
           f"({SHIPPED / 'voc' / 'train_aug.txt'}, 10582 images)" in text
    assert all(s["partitions"][d][2] == "seed 0" for d in (16, 8, 4, 2))
    # asking for the published lists: the first image they name that the set lacks is the error
    with pytest.raises(PrepareError, match=r"train_aug_labeled_1-16.txt line 1: '2007_000032' is not an image "
                                           "of the training list"):
        prepare_voc.prepare_voc(None, None, voc_out, expect_train=22, expect_val=3, partition_source="published")


def test_published_list_error_before_any_file_is_written(voc_data, voc_out, city_data, tmp_path, capsys):
    pub = voc_published(tmp_path / "published")
    bad = pub.folder / "train_aug_unlabeled_1-4.txt"
    bad.write_bytes(bad.read_bytes() + b"\r\n2011_009999")
    # an archive run: refused after reading the split lists, before any image is written
    out = tmp_path / "new"
    with pytest.raises(PrepareError) as err:
        prepare_voc.prepare_voc(voc_data["voc_tar"], voc_data["sbd_tgz"], out, expect_train=22, expect_val=3,
                                published=pub, partition_source="published")
    assert f"{bad} line 18: '2011_009999' is not an image of the training list" in str(err.value)
    assert not out.exists()
    # a finished set: the lists are left as they were
    done = tmp_path / "done"
    shutil.copytree(voc_out, done)
    before = lists_of(done)
    with pytest.raises(PrepareError, match="2011_009999"):
        prepare_voc.prepare_voc(None, None, done, expect_train=22, expect_val=3, published=pub,
                                partition_source="published")
    assert lists_of(done) == before
    # Cityscapes from a zip: checked before any file is written too
    city_pub = write_published(tmp_path / "city_pub", {
        "train.txt": [f"/images/train/{Path(n).name}.png\t/segmentation/train/{Path(n).name}_gtFine.png"
                      for n in CITY_TRAIN],
        "train_aug_labeled_1-8.txt": ["/images/train/aachen_000099_000019.png\t/segmentation/train/x.png"]})
    out = tmp_path / "city"
    with pytest.raises(PrepareError, match=r"train_aug_labeled_1-8.txt line 1: '/images/train/aachen_000099_000019"):
        prepare_cityscapes.prepare_cityscapes(city_data["img_zip"], city_data["gt_zip"], out, expect_train=16,
                                              expect_val=3, published=PublishedLists(city_pub, "train.txt"))
    assert not out.exists()


def test_cityscapes_published_partitions_mapped(city_data, tmp_path, capsys):
    rng = np.random.default_rng(3)
    spelled = {n: (f"/images/train/{Path(n).name}.png", f"/segmentation/train/{Path(n).name}_gtFine.png")
               for n in CITY_TRAIN}
    files = {"train.txt": ["\t".join(spelled[n]) for n in rng.permutation(CITY_TRAIN)]}
    want = {}
    for d in (16, 8, 4, 2):
        order = list(rng.permutation(CITY_TRAIN))
        k = max(1, len(order) // d)
        want[d] = order[:k], order[k:]
        files[f"train_aug_labeled_1-{d}.txt"] = ["\t".join(spelled[n]) for n in order[:k]]
        files[f"train_aug_unlabeled_1-{d}.txt"] = ["\t".join(spelled[n]) for n in order[k:]]
    pub = PublishedLists(write_published(tmp_path / "pub", files), "train.txt")
    out = tmp_path / "city"
    s = prepare_cityscapes.prepare_cityscapes(city_data["img_zip"], city_data["gt_zip"], out, expect_train=16,
                                              expect_val=3, published=pub, workers=0)
    assert "partitions: the published train_aug lists shipped in" in capsys.readouterr().out
    for d in (16, 8, 4, 2):
        assert (read_list(out / f"lists/labeled_1-{d}.txt"), read_list(out / f"lists/unlabeled_1-{d}.txt")) == want[d]
    assert s["partitions"][16][0] == 1


def test_partition_dir_protocol_at_the_command_line(voc_out, tmp_path, capsys):
    out = tmp_path / "pascal_voc"
    shutil.copytree(voc_out, out)
    pub = voc_published(tmp_path / "published").folder
    base = ["--voc", "gone.tar", "--sbd", "gone.tgz", "--out", str(out)] + MINI_VOC  # finished: archives not read
    assert prepare_voc.main(base + ["--partition-dir", str(pub), "--protocol", "pseudoseg"]) == 0
    assert read_list(out / "lists/labeled_1-8.txt") == VOC_TRAIN[:1]
    assert "the folder holds the protocols 'pseudoseg', 'train_aug'" in capsys.readouterr().out
    assert prepare_voc.main(base + ["--partition-dir", str(pub)]) == 0  # train_aug by default
    assert read_list(out / "lists/labeled_1-8.txt") == read_list(pub / "train_aug_labeled_1-8.txt")
    capsys.readouterr()
    for f in pub.glob("train_aug_*"):
        f.rename(f.with_name(f.name.replace("train_aug", "other")))
    before = lists_of(out)
    assert prepare_voc.main(base + ["--partition-dir", str(pub)]) == 1
    err = capsys.readouterr().err
    assert f"--partition-dir {pub} holds the lists of several protocols ('other', 'pseudoseg'); choose one " \
           "with --protocol NAME" in err
    assert prepare_voc.main(base + ["--partition-dir", str(pub), "--protocol", "nope"]) == 1
    assert "has no partition lists of protocol 'nope'; its protocols: 'other', 'pseudoseg'" in capsys.readouterr().err
    assert prepare_voc.main(base + ["--partition-source", "seeded", "--protocol", "pseudoseg"]) == 1
    assert "pass only one of them" in capsys.readouterr().err
    assert lists_of(out) == before


def tar_cut(full: Path, where: str) -> bytes:
    """The bytes of `full` cut at the header of its last member, or at its end-of-archive marker."""
    with tarfile.open(full) as tf:
        last = tf.getmembers()[-1]
    if where == "last member":
        return full.read_bytes()[: last.offset]
    return full.read_bytes()[: last.offset_data + -(-last.size // 512) * 512]


@pytest.mark.parametrize("which,where", [("voc", "last member"), ("voc", "end marker"), ("sbd", "end marker")])
def test_tar_cut_after_the_last_file_read(voc_data, tmp_path, capsys, which, where):
    if which == "voc":
        full, cut = voc_data["voc_tar"], tmp_path / "VOCtrainval_11-May-2012.tar"
        assert list(voc_data["voc"])[-1].endswith("ImageSets/Segmentation/trainval.txt")  # not read by the tool
        cut.write_bytes(tar_cut(full, where))
        args = ["--voc", str(cut), "--sbd", str(voc_data["sbd_tgz"])]
    else:
        plain = write_tar(tmp_path / "benchmark.tar", voc_data["sbd"])
        cut = tmp_path / "benchmark.tgz"
        with gzip.open(cut, "wb") as f:  # the tar inside is cut; the gzip stream itself is whole
            f.write(tar_cut(plain, where))
        args = ["--voc", str(voc_data["voc_tar"]), "--sbd", str(cut)]
    out = tmp_path / "out"
    assert prepare_voc.main(args + ["--out", str(out)] + MINI_VOC) == 1
    err = capsys.readouterr().err
    assert f"{cut} is truncated (it stops after " in err and "before its end-of-archive marker); download it again" in err
    assert not (out / ".prepared.json").exists()


def test_sbd_dataset_folder_accepted(voc_data, voc_out, tmp_path, capsys):
    sdir = write_folder(tmp_path / "sbd", voc_data["sbd"])
    for i, sbd in enumerate([sdir / "benchmark_RELEASE", sdir / "benchmark_RELEASE" / "dataset"]):
        out = tmp_path / f"out{i}"
        assert prepare_voc.main(["--voc", str(voc_data["voc_tar"]), "--sbd", str(sbd), "--out", str(out)]
                                + MINI_VOC) == 0, capsys.readouterr().err
        assert files_under(out) == files_under(voc_out)
        assert all((out / r).read_bytes() == (voc_out / r).read_bytes() for r in files_under(out) - {".prepared.json"})
    wrong = sdir / "benchmark_RELEASE" / "dataset" / "cls"
    assert prepare_voc.main(["--voc", str(voc_data["voc_tar"]), "--sbd", str(wrong), "--out",
                             str(tmp_path / "o")] + MINI_VOC) == 1
    err = capsys.readouterr().err
    assert f"SBD archive {wrong} has no benchmark_RELEASE/dataset/train.txt, benchmark_RELEASE/dataset/val.txt; " \
           "pass benchmark.tgz, the benchmark_RELEASE folder extracted from it, or its dataset folder" in err


def test_toy_data_gets_seeded_partitions_and_says_so(tmp_path):
    log = []
    make_toy_data.generate(tmp_path, seed=5, num_train=16, num_val=2, num_city_train=4, num_city_val=2, log=log.append)
    assert any("(16 train, 2 val; seeded partitions, seed 5" in line for line in log)
    voc = tmp_path / "pascal_voc" / "lists"
    train = read_list(voc / "train_aug.txt")
    for d in (16, 8, 4, 2):
        assert (read_list(voc / f"labeled_1-{d}.txt"), read_list(voc / f"unlabeled_1-{d}.txt")) == partition(train, d, 5)


def test_published_set_other_fractions(voc_out, tmp_path, capsys):
    out = tmp_path / "pascal_voc"
    shutil.copytree(voc_out, out)
    pub = voc_published(tmp_path / "published")
    s = prepare_voc.prepare_voc(None, None, out, expect_train=22, expect_val=3, published=pub, denominators=[3, 8])
    assert s["partitions"][3][2] == "seed 0" and "train_aug_labeled_1-8.txt" in s["partitions"][8][2]
    s = prepare_voc.prepare_voc(None, None, out, expect_train=22, expect_val=3, published=pub, denominators=[3])
    assert "have no 1/3" in s["partition_note"] and s["partitions"][3][2] == "seed 0"
    assert read_list(out / "lists/labeled_1-3.txt") == partition(TRAIN_AUG, 3, 0)[0]
