"""tools/make_toy_data.py: layout, label values, determinism by seed, readable by both datasets."""
import json

import numpy as np
import pytest
from PIL import Image

import make_toy_data as toy_gen
from furnace.data import CityscapesDataset, VOCDataset, check_dataset, read_image, read_label, read_list
from furnace.data.cityscapes_labels import LABEL_ID_TO_TRAIN_ID

COUNTS = dict(num_train=32, num_val=8, num_city_train=16, num_city_val=4)


def _generate(out, seed):
    toy_gen.generate(out, seed=seed, log=lambda *a: None, **COUNTS)
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("toy_a"), 0)


def test_layout_lists_and_meta(toy):
    voc, city = toy / "pascal_voc", toy / "city"
    train, val = read_list(voc / "lists" / "train_aug.txt"), read_list(voc / "lists" / "val.txt")
    assert len(train) == 32 and len(val) == 8 and not set(train) & set(val)
    for d in (16, 8, 4, 2):
        lab, unl = read_list(voc / "lists" / f"labeled_1-{d}.txt"), read_list(voc / "lists" / f"unlabeled_1-{d}.txt")
        assert len(lab) == 32 // d and sorted(lab + unl) == sorted(train)
    assert (voc / "train_aug" / "image" / f"{train[0]}.jpg").is_file()
    meta = json.loads((voc / "toy_meta.json").read_text())
    assert meta["num_classes"] == 6 and len(meta["class_names"]) == 6 and meta["class_names"][0] == "background"
    ctrain = read_list(city / "lists" / "train.txt")
    assert len(ctrain) == 16 and len(read_list(city / "lists" / "labeled_1-8.txt")) == 2
    n = ctrain[0]
    assert n.count("/") == 2 and n.startswith("train/")
    assert (city / "leftImg8bit" / f"{n}_leftImg8bit.png").is_file()
    assert (city / "gtFine" / f"{n}_gtFine_labelIds.png").is_file()
    cmeta = json.loads((city / "toy_meta.json").read_text())
    assert cmeta["num_classes"] == 19 and cmeta["present_classes"] == [0, 1, 2, 5, 8, 10, 11, 13]


def test_voc_labels_match_generator_and_formats(toy):
    voc = toy / "pascal_voc"
    name = read_list(voc / "lists" / "train_aug.txt")[5]
    image, label = toy_gen.voc_sample(np.random.default_rng([0, 0, False, 5]))
    path = voc / "train_aug" / "label" / f"{name}.png"
    assert Image.open(path).mode == "P"  # train labels: palette PNGs
    np.testing.assert_array_equal(read_label(path), label)
    # JPEG q95: close to the generator's pixels, not equal
    assert np.abs(read_image(voc / "train_aug" / "image" / f"{name}.jpg").astype(int) - image).mean() < 6
    vname = read_list(voc / "lists" / "val.txt")[0]
    assert Image.open(voc / "val" / "label" / f"{vname}.png").mode == "L"  # val labels: index PNGs
    _, vlabel = toy_gen.voc_sample(np.random.default_rng([0, 0, True, 0]))
    np.testing.assert_array_equal(read_label(voc / "val" / "label" / f"{vname}.png"), vlabel)


def test_voc_label_statistics(toy):
    voc = toy / "pascal_voc"
    ds = VOCDataset(voc, voc / "lists" / "train_aug.txt", "val", 6, split_dir="train_aug")
    assert check_dataset(ds) == 32
    counts, sizes = np.zeros(256, np.int64), set()
    for i in range(len(ds)):
        lab = ds[i]["label"].numpy()
        sizes.add(lab.shape)
        assert 88 <= lab.shape[0] <= 112 and 112 <= lab.shape[1] <= 144
        counts += np.bincount(lab.ravel(), minlength=256)
    assert set(np.nonzero(counts)[0]) == {0, 1, 2, 3, 4, 5, 255}  # all classes + ignore borders, nothing else
    total = counts.sum()
    assert 0.6 < counts[0] / total < 0.95  # mostly background, as in VOC
    assert 0.02 < counts[255] / total < 0.12  # a thin ignore band at object borders
    assert min(counts[1:6]) / total > 0.005  # every object class is present in earnest
    assert len(sizes) > 5  # sizes vary


def test_city_label_ids(toy):
    city = toy / "city"
    ds = CityscapesDataset(city, city / "lists" / "train.txt", "val")
    assert check_dataset(ds) == 16
    raw_counts = np.zeros(256, np.int64)
    for n in ds.names:
        raw = read_label(city / "gtFine" / f"{n}_gtFine_labelIds.png")
        assert raw.shape == (64, 128)
        raw_counts += np.bincount(raw.ravel(), minlength=256)
    used = set(np.nonzero(raw_counts)[0].tolist())
    assert used <= set(toy_gen.CITY_IDS.values())
    assert {7, 8, 11, 21, 23, 24, 26} <= used and used & {0, 1, 4}  # classes and some void
    train_ids = set(np.nonzero(np.bincount(LABEL_ID_TO_TRAIN_ID[np.nonzero(raw_counts)[0]], minlength=256))[0])
    assert {0, 1, 2, 8, 10, 11, 13} <= train_ids


def test_determinism_by_seed(toy, tmp_path):
    again = _generate(tmp_path / "again", 0)
    other = _generate(tmp_path / "other", 1)
    files = sorted(p.relative_to(toy) for p in toy.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (toy / rel).read_bytes() == (again / rel).read_bytes(), rel
    labels = [r for r in files if r.suffix == ".png" and ("label" in r.parts or "gtFine" in r.parts)]
    different = sum((toy / r).read_bytes() != (other / r).read_bytes() for r in labels)
    assert different == len(labels)


def test_sample_is_independent_of_counts(tmp_path):
    small = tmp_path / "small"
    toy_gen.generate(small, seed=0, num_train=16, num_val=2, num_city_train=2, num_city_val=1, log=lambda *a: None)
    _, label = toy_gen.voc_sample(np.random.default_rng([0, 0, False, 3]))
    np.testing.assert_array_equal(read_label(small / "pascal_voc" / "train_aug" / "label" / "train_000003.png"), label)
