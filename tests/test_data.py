"""furnace.data: IO, datasets on the toy data, transforms, CutMix masks, palettes, splits, bad-input errors."""
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import make_splits
import make_toy_data
from furnace.data import (CITYSCAPES_PALETTE, IMAGENET_MEAN, IMAGENET_STD, VOC_PALETTE, CityscapesDataset,
                          DatasetError, TrainTransform, ValTransform, VOCDataset, build_dataset, check_dataset,
                          cutmix_box_mask, partition, read_image, read_label, read_list, write_label, write_list)
from furnace.data.cityscapes_labels import LABEL_ID_TO_TRAIN_ID

MEAN, STD = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_data.generate(out, seed=3, num_train=16, num_val=4, num_city_train=6, num_city_val=2,
                           log=lambda *a: None)
    return out


@pytest.fixture
def voc_copy(toy, tmp_path):
    """A private copy of the VOC toy data that a test may damage."""
    return Path(shutil.copytree(toy / "pascal_voc", tmp_path / "voc"))


# ---- io ------------------------------------------------------------------------------------------------
def test_read_image_is_rgb(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0], bgr[..., 2] = 200, 10  # blue 200, red 10 in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "a.png"), bgr)
    rgb = read_image(tmp_path / "a.png")
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == 10).all() and (rgb[..., 2] == 200).all()


def test_palette_and_index_png_give_same_indices(tmp_path):
    label = np.random.default_rng(0).integers(0, 21, (7, 9)).astype(np.uint8)
    label[0, :3] = 255
    write_label(tmp_path / "p.png", label, VOC_PALETTE)
    write_label(tmp_path / "i.png", label)
    assert Image.open(tmp_path / "p.png").mode == "P" and Image.open(tmp_path / "i.png").mode == "L"
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), label)
    np.testing.assert_array_equal(read_label(tmp_path / "i.png"), label)
    # the colours of the palette PNG are VOC colours, not indices: reading must not use them
    rgb = np.array(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(rgb, VOC_PALETTE[label])


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_label(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        read_label(tmp_path / "bad.png")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb.png.*'RGB'"):
        read_label(tmp_path / "rgb.png")


def test_palettes():
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 5: (128, 0, 128),
                15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    for i, colour in expected.items():
        assert tuple(VOC_PALETTE[i]) == colour
    assert CITYSCAPES_PALETTE.shape == (19, 3) and tuple(CITYSCAPES_PALETTE[0]) == (128, 64, 128)


# ---- datasets ------------------------------------------------------------------------------------------
def test_voc_val_sample_values(toy):
    root = toy / "pascal_voc"
    ds = VOCDataset(root, root / "lists" / "val.txt", "val", num_classes=6)
    s = ds[1]
    name = read_list(root / "lists" / "val.txt")[1]
    raw = read_image(root / "val" / "image" / f"{name}.jpg")
    assert s["name"] == name and s["image"].dtype == torch.float32 and s["label"].dtype == torch.int64
    assert s["image"].shape == (3,) + raw.shape[:2]
    np.testing.assert_allclose(s["image"][:, 5, 7].numpy(), (raw[5, 7] / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s["label"].numpy(), read_label(root / "val" / "label" / f"{name}.png"))
    assert check_dataset(ds) == 4


def test_voc_train_reads_palette_labels_and_unlabeled_mode(toy):
    root = toy / "pascal_voc"
    ds = VOCDataset(root, root / "lists" / "labeled_1-2.txt", "labeled", 6)
    name = ds.names[0]
    assert Image.open(root / "train_aug" / "label" / f"{name}.png").mode == "P"
    palette_indices = np.array(Image.open(root / "train_aug" / "label" / f"{name}.png"))
    np.testing.assert_array_equal(ds[0]["label"].numpy(), palette_indices)
    un = VOCDataset(root, root / "lists" / "unlabeled_1-2.txt", "unlabeled", 6, TrainTransform(32))
    s = un[(0, (4, 2))]
    assert set(s) == {"image", "name"} and s["image"].shape == (3, 32, 32)
    assert un.validate() == 8


def test_cityscapes_maps_label_ids(toy):
    root = toy / "city"
    ds = CityscapesDataset(root, root / "lists" / "val.txt", "val")
    name = ds.names[0]
    assert name.startswith("val/toyfurt/toyfurt_000000_")
    raw = read_label(root / "gtFine" / f"{name}_gtFine_labelIds.png")
    lab = ds[0]["label"].numpy()
    np.testing.assert_array_equal(lab, LABEL_ID_TO_TRAIN_ID[raw])
    # official ids: road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, sky 23 -> 10, car 26 -> 13; void 0/1 -> 255
    for label_id, train_id in ((7, 0), (8, 1), (11, 2), (23, 10), (26, 13), (0, 255), (1, 255)):
        if (raw == label_id).any():
            assert (lab[raw == label_id] == train_id).all()
    assert (raw == 7).any() and (raw == 23).any()
    assert ds[0]["image"].shape == (3, 64, 128)
    assert check_dataset(CityscapesDataset(root, root / "lists" / "train.txt", "labeled")) == 6


def test_rng_key_determinism(toy):
    root = toy / "pascal_voc"
    ds = VOCDataset(root, root / "lists" / "train_aug.txt", "labeled", 6,
                    TrainTransform((40, 48), [0.5, 0.75, 1.0, 1.5, 2.0]))
    a, b = ds[(3, (7, 1))], ds[(3, (7, 1))]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    others = [ds[(3, (7, k))]["image"] for k in range(2, 8)]
    assert sum(not torch.equal(a["image"], o) for o in others) >= 5
    assert torch.equal(ds[5]["image"], ds[(5, (5,))]["image"])  # plain int i uses key (i,)
    with pytest.raises(IndexError):
        ds[16]


# ---- transforms ----------------------------------------------------------------------------------------
def test_crop_sizes_and_padding_values():
    img = np.full((10, 12, 3), 200, np.uint8)
    lab = np.full((10, 12), 3, np.uint8)
    for size, hw in ((20, (20, 20)), ((16, 30), (16, 30)), ((6, 8), (6, 8))):
        x, y = TrainTransform(size, flip=False)(img, lab, np.random.default_rng(0))
        assert x.shape == (3,) + hw and y.shape == hw and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = TrainTransform((16, 30), flip=False)(img, lab, np.random.default_rng(0))
    # 10x12 centred in 16x30: rows 3..12, cols 9..20
    inside = torch.zeros(16, 30, dtype=torch.bool)
    inside[3:13, 9:21] = True
    assert (y[inside] == 3).all() and (y[~inside] == 255).all()
    assert (x[:, ~inside] == 0).all()
    np.testing.assert_allclose(x[:, 5, 10].numpy(), (200 / 255 - MEAN) / STD, rtol=1e-5)


def test_scale_and_flip_keep_image_and_label_aligned():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, (12, 16)).astype(np.uint8)
    img = np.repeat((lab * 50)[..., None], 3, axis=2).astype(np.uint8)
    flips = 0
    for key in range(20):
        x, y = TrainTransform((12, 16), [1.0])(img, lab, np.random.default_rng(key))
        value = np.round(((x[0].numpy() * STD[0]) + MEAN[0]) * 255)
        np.testing.assert_array_equal(value, y.numpy() * 50)  # label follows the image
        flips += int(np.array_equal(y.numpy(), lab[:, ::-1]))
    assert 3 <= flips <= 17  # both flipped and unflipped samples happen
    x, y = TrainTransform(40, [2.0], flip=False)(img, lab, np.random.default_rng(0))
    inside = y != 255
    assert inside.sum() == 24 * 32  # 12x16 scaled by 2
    assert set(np.unique(y[inside].numpy())) <= set(np.unique(lab))  # nearest: no new label values


def test_val_transform_normalises_only():
    img = np.full((5, 6, 3), (0, 128, 255), np.uint8)
    x, y = ValTransform()(img, np.zeros((5, 6), np.uint8))
    assert x.shape == (3, 5, 6) and y.shape == (5, 6)
    np.testing.assert_allclose(x[:, 2, 3].numpy(), (np.array([0, 128, 255]) / 255 - MEAN) / STD, rtol=1e-5)


# ---- CutMix ----------------------------------------------------------------------------------------------
def _reference_union_fraction(n_samples, n_boxes, h, w, rng):
    """Covered fraction by the recipe of docs/method.md, "CutMix", written independently with numpy."""
    fr = []
    for _ in range(n_samples):
        m = np.zeros((h, w), bool)
        for _ in range(n_boxes):
            prop = rng.uniform(0.25, 0.5)
            hp = np.exp(rng.uniform() * np.log(prop))
            bh, bw = np.round(hp * np.sqrt(1 / n_boxes) * h), np.round(prop / hp * np.sqrt(1 / n_boxes) * w)
            y0, x0 = np.round((h - bh) * rng.uniform()), np.round((w - bw) * rng.uniform())
            m[int(y0):int(y0 + bh), int(x0):int(x0 + bw)] = True
        fr.append(m.mean())
    return float(np.mean(fr))


def test_cutmix_mask_shape_values_determinism():
    m = cutmix_box_mask(4, 32, 48, generator=torch.Generator().manual_seed(1))
    assert m.shape == (4, 1, 32, 48) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m, cutmix_box_mask(4, 32, 48, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(m, cutmix_box_mask(4, 32, 48, generator=torch.Generator().manual_seed(2)))


def test_cutmix_single_box_is_a_rectangle_of_area_prop():
    h = w = 64
    m = cutmix_box_mask(1000, h, w, n_boxes=1, generator=torch.Generator().manual_seed(0))[:, 0]
    frac = m.mean(dim=(1, 2))
    # area = prop * H * W with prop ~ U(0.25, 0.5), up to the rounding of each side (<= 0.5 px)
    tol = (0.5 * h + 0.5 * w + 0.25) / (h * w)
    assert frac.min() >= 0.25 - tol and frac.max() <= 0.5 + tol
    assert abs(frac.mean().item() - 0.375) < 0.01
    for mk in m[:50]:
        ys, xs = torch.nonzero(mk, as_tuple=True)
        bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert mk.sum() == bh * bw  # one solid box, inside the image
        assert bh >= 16 and bw >= 16  # h_prop = prop^U >= prop >= 0.25


def test_cutmix_three_boxes_mean_coverage():
    g = torch.Generator().manual_seed(0)
    m = cutmix_box_mask(2000, 40, 60, generator=g)
    mean = m.mean().item()
    # three boxes of expected area 0.375/3 each: the union covers at most 0.375 on average
    expected = _reference_union_fraction(2000, 3, 40, 60, np.random.default_rng(0))
    assert 0.29 < expected < 0.36
    assert abs(mean - expected) < 0.012
    toggled = cutmix_box_mask(2000, 40, 60, generator=torch.Generator().manual_seed(0), toggle_overlaps=True)
    assert toggled.mean().item() < mean  # overlaps flip back to 0
    with pytest.raises(ValueError, match="n_boxes"):
        cutmix_box_mask(1, 8, 8, n_boxes=0)


# ---- splits ----------------------------------------------------------------------------------------------
def test_make_splits_cli(tmp_path):
    names = [f"img_{i:04d}" for i in range(100)]
    write_list(tmp_path / "train.txt", names)
    for out, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        make_splits.main([str(tmp_path / "train.txt"), "--out-dir", str(tmp_path / out), "--seed", seed])
    for d in (16, 8, 4, 2):
        lab, unl = f"labeled_1-{d}.txt", f"unlabeled_1-{d}.txt"
        assert (tmp_path / "a" / lab).read_bytes() == (tmp_path / "b" / lab).read_bytes()
        labeled, unlabeled = read_list(tmp_path / "a" / lab), read_list(tmp_path / "a" / unl)
        assert len(labeled) == 100 // d and not set(labeled) & set(unlabeled)
        assert sorted(labeled + unlabeled) == names
    assert read_list(tmp_path / "a" / "labeled_1-8.txt") != read_list(tmp_path / "c" / "labeled_1-8.txt")
    # the choice does not depend on the input order
    assert partition(names[::-1], 8, 0) == partition(names, 8, 0)


# ---- bad inputs -----------------------------------------------------------------------------------------
def _voc(root, mode="val", lst="val.txt"):
    return VOCDataset(root, root / "lists" / lst, mode, num_classes=6)


def test_missing_image_and_label(voc_copy):
    names = read_list(voc_copy / "lists" / "val.txt")
    (voc_copy / "val" / "image" / f"{names[0]}.jpg").unlink()
    (voc_copy / "val" / "label" / f"{names[1]}.png").unlink()
    ds = _voc(voc_copy)
    with pytest.raises(FileNotFoundError, match=f"{names[0]}.jpg"):
        ds[0]
    with pytest.raises(FileNotFoundError, match=f"{names[1]}.png"):
        ds[1]
    with pytest.raises(DatasetError, match=rf"(?s)2 of 4 items.*{names[0]}.jpg.*{names[1]}.png"):
        check_dataset(ds)
    # unlabeled mode does not need labels
    unl = VOCDataset(voc_copy, voc_copy / "lists" / "val.txt", "unlabeled", 6, split_dir="val")
    assert unl[1]["image"].shape[0] == 3
    with pytest.raises(DatasetError, match=f"{names[0]}.jpg"):
        unl.validate()


def test_corrupt_image(voc_copy):
    name = read_list(voc_copy / "lists" / "val.txt")[2]
    (voc_copy / "val" / "image" / f"{name}.jpg").write_bytes(b"\x00\x01 not an image at all")
    ds = _voc(voc_copy)
    with pytest.raises(ValueError, match=f"{name}.jpg"):
        ds[2]
    with pytest.raises(DatasetError, match=f"{name}.jpg"):
        check_dataset(ds)


def test_size_mismatch_and_out_of_range_label(voc_copy):
    names = read_list(voc_copy / "lists" / "val.txt")
    write_label(voc_copy / "val" / "label" / f"{names[0]}.png", np.zeros((10, 10), np.uint8))
    bad = read_label(voc_copy / "val" / "label" / f"{names[1]}.png")
    bad[0, 0] = 7  # num_classes is 6; 255 stays allowed
    write_label(voc_copy / "val" / "label" / f"{names[1]}.png", bad)
    ds = _voc(voc_copy)
    with pytest.raises(ValueError, match=rf"{names[0]}.jpg is \d+x\d+ but its label .*{names[0]}.png is 10x10"):
        ds[0]
    with pytest.raises(ValueError, match=rf"{names[1]}.png has values \[7\]"):
        ds[1]
    with pytest.raises(DatasetError, match=rf"(?s){names[0]}.png is 10x10.*{names[1]}.png has values"):
        check_dataset(ds)


def test_cityscapes_non_label_id_value(toy, tmp_path):
    root = Path(shutil.copytree(toy / "city", tmp_path / "city"))
    name = read_list(root / "lists" / "val.txt")[0]
    path = root / "gtFine" / f"{name}_gtFine_labelIds.png"
    raw = read_label(path)
    raw[0, 0] = 40
    write_label(path, raw)
    with pytest.raises(ValueError, match=r"gtFine_labelIds.png has values \[40\]"):
        CityscapesDataset(root, root / "lists" / "val.txt", "val")[0]


def test_bad_lists_and_mode(voc_copy):
    (voc_copy / "lists" / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="empty.txt"):
        _voc(voc_copy, lst="empty.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        _voc(voc_copy, lst="missing.txt")
    with pytest.raises(ValueError, match="mode"):
        _voc(voc_copy, mode="train")


# ---- build_dataset -----------------------------------------------------------------------------------------
def test_build_dataset(toy):
    C = dict(dataset="voc", data_root=str(toy / "pascal_voc"), labeled_list="lists/labeled_1-4.txt",
             unlabeled_list="lists/unlabeled_1-4.txt", val_list="lists/val.txt", num_classes=6,
             crop_size=(48, 64), train_scales=[0.5, 1.0, 2.0], image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    lab, unl, val = (build_dataset(C, s) for s in ("labeled", "unlabeled", "val"))
    assert (len(lab), len(unl), len(val)) == (4, 12, 4)
    assert lab[0]["label"].shape == (48, 64) and unl[0]["image"].shape == (3, 48, 64) and "label" not in unl[0]
    assert val.split_dir == "val" and isinstance(val.transform, ValTransform)
    assert val[0]["image"].shape[1:] == val[0]["label"].shape and val[0]["image"].shape[1] >= 88
    city = build_dataset(dict(C, dataset="cityscapes", data_root=str(toy / "city"), num_classes=19,
                              labeled_list="lists/labeled_1-2.txt"), "labeled")
    assert isinstance(city, CityscapesDataset) and len(city) == 3
    with pytest.raises(KeyError, match="crop_size"):
        build_dataset({k: v for k, v in C.items() if k != "crop_size"}, "labeled")
    with pytest.raises(ValueError, match="dataset"):
        build_dataset(dict(C, dataset="coco"), "val")
