"""Your own data: tools/prepare_custom.py on the toy images in the custom layout (lists, partitions, errors on
bad data before anything is written), the custom dataset and config reading the files, and a short training
and evaluation through exp.custom's command line."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare_custom as prep
from furnace.config import collect_overrides, load_experiment, resolve
from furnace.data import CustomDataset, build_dataset, read_list, write_label
from furnace.data.splits import partition
from prepare_utils import PrepareError
from trainkit import ROOT, TOY_CLASSES, overrides, train_in_process

EXP = ROOT / "exp.custom" / "custom8.resnet18_deeplabv3plus"
PALETTE = [[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200]]


def custom_from_toy(voc: Path, out: Path) -> Path:
    """The README's recipe: the toy VOC images and labels (train: palette PNGs, val: index PNGs) in one folder,
    with classes.txt and palette.txt."""
    for sub, pattern in (("images", "*/image/*.jpg"), ("labels", "*/label/*.png")):
        (out / sub).mkdir(parents=True)
        for f in voc.glob(pattern):
            shutil.copy(f, out / sub / f.name)
    (out / "classes.txt").write_text("\n".join(TOY_CLASSES) + "\n")
    (out / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in PALETTE))
    return out


@pytest.fixture(scope="module")
def custom(toy, tmp_path_factory):
    root = custom_from_toy(toy, tmp_path_factory.mktemp("custom") / "custom")
    prep.prepare_custom(root, val_list=toy / "lists" / "val.txt", denominators=(8, 4, 2), workers=1)
    return root


def lists(root: Path) -> dict:
    return {p.name: read_list(p) for p in sorted((root / "lists").glob("*.txt"))}


def test_lists_and_partitions(custom, toy, capsys):
    got = lists(custom)
    train, val = read_list(toy / "lists" / "train_aug.txt"), read_list(toy / "lists" / "val.txt")
    assert got["train.txt"] == sorted(train) and got["val.txt"] == sorted(val)
    for d in (8, 4, 2):
        labeled, unlabeled = got[f"labeled_1-{d}.txt"], got[f"unlabeled_1-{d}.txt"]
        assert len(labeled) == len(train) // d and not set(labeled) & set(unlabeled)
        assert sorted(labeled + unlabeled) == sorted(train)
        assert (labeled, unlabeled) == partition(train, d, 0)  # seeded: the same lists from the same seed
    # the same options again: the same lists; other options are refused (runs trained on the lists), --force
    prep.prepare_custom(custom, val_list=toy / "lists" / "val.txt", denominators=(8, 4, 2), workers=1)
    assert lists(custom) == got
    with pytest.raises(PrepareError, match="would change.*--force"):
        prep.prepare_custom(custom, val_list=toy / "lists" / "val.txt", seed=1, denominators=(8, 4, 2), workers=1)
    assert lists(custom) == got
    assert prep.main([str(custom), "--val-list", str(toy / "lists" / "val.txt"), "--seed", "1", "--partitions",
                      "8", "4", "2", "--force", "--workers", "1"]) == 0
    assert lists(custom)["labeled_1-8.txt"] == partition(train, 8, 1)[0] != got["labeled_1-8.txt"]
    prep.prepare_custom(custom, val_list=toy / "lists" / "val.txt", denominators=(8, 4, 2), workers=1, force=True)
    assert lists(custom) == got
    # without a validation list: a seeded share of the images
    names = sorted(train + val)
    a, b = prep.split_val(names, None, 0.25, 5), prep.split_val(names, None, 0.25, 6)
    assert a == prep.split_val(names, None, 0.25, 5) and len(a) == round(0.25 * len(names)) and a != b
    assert "partition 1/8: 3 labeled, 21 unlabeled" in capsys.readouterr().out


def test_dataset_and_config_read_the_files(custom, toy):
    C = resolve(load_experiment(EXP), collect_overrides(pairs=[f"data_root={custom}"]))
    assert (C.dataset, C.num_classes, C.class_names, C.palette) == ("custom", 6, TOY_CLASSES, PALETTE)
    val = build_dataset(C, "val")
    assert isinstance(val, CustomDataset) and len(val) == 5
    sample = val[0]
    png = np.array(Image.open(custom / "labels" / f"{sample['name']}.png"))  # an index ('L') PNG
    assert np.array_equal(sample["label"].numpy(), png) and sample["image"].shape[1:] == png.shape
    # a palette PNG gives its indices, not its colours
    train = CustomDataset(custom, custom / "lists" / "train.txt", "val", 6)
    path = custom / "labels" / f"{train.names[0]}.png"
    with Image.open(path) as im:
        assert im.mode == "P"
        indices = np.array(im)
    assert np.array_equal(train[0]["label"].numpy(), indices) and set(np.unique(indices)) - {255} <= set(range(6))
    with pytest.raises(ValueError, match="num_classes=7 but .* has 6"):
        resolve(load_experiment(EXP), collect_overrides(pairs=[f"data_root={custom}", "num_classes=7"]))
    with pytest.raises(FileNotFoundError, match="classes.txt.*prepare_custom"):
        resolve(load_experiment(EXP), collect_overrides(pairs=[f"data_root={toy}"]))


def small_folder(root: Path, n: int = 6) -> Path:
    """n tiny images (jpg and png) with 3-class index labels, and classes.txt."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.{'jpg' if i % 2 else 'png'}")
        write_label(root / "labels" / f"im{i}.png", rng.integers(0, 3, (12, 16)).astype(np.uint8))
    (root / "classes.txt").write_text("a\nb\nc\n")
    return root


BAD = {  # what is done to a good folder -> what the error says
    "no class file": (lambda r: (r / "classes.txt").unlink(), r"class-name file not found: .*classes.txt"),
    "one class": (lambda r: (r / "classes.txt").write_text("a\n"), r"classes.txt names 1 classes"),
    "bad palette": (lambda r: (r / "palette.txt").write_text("0 0 0\n1 2\n3 4 5\n"), r"palette.txt:2: expected 'R G B'"),
    "short palette": (lambda r: (r / "palette.txt").write_text("0 0 0\n"), r"palette.txt has 1 colours for 3 classes"),
    "label value": (lambda r: write_label(r / "labels" / "im1.png", np.full((12, 16), 7, np.uint8)),
                    r"labels/im1.png has values \[7\] outside \[0, 3\)"),
    "label size": (lambda r: write_label(r / "labels" / "im2.png", np.zeros((12, 15), np.uint8)),
                   r"images/im2.png is 12x16 but its label .*labels/im2.png is 12x15"),
    "colour label": (lambda r: Image.new("RGB", (16, 12)).save(r / "labels" / "im3.png"),
                     r"labels/im3.png is a 'RGB' image"),
    "truncated image": (lambda r: (r / "images" / "im1.jpg").write_bytes((r / "images" / "im1.jpg").read_bytes()[:60]),
                        r"cannot decode image .*images/im1.jpg"),
    "no label": (lambda r: (r / "labels" / "im4.png").unlink(), r"images/im4.png has no label .*labels/im4.png"),
    "no image": (lambda r: (r / "images" / "im5.jpg").unlink(), r"labels/im5.png has no image"),
    "two images": (lambda r: shutil.copy(r / "images" / "im0.png", r / "images" / "im0.jpg"),
                   r"several images named im0: im0.jpg, im0.png"),
    "val list": (lambda r: (r / "val.txt").write_text("im0\nnope\n"), r"val.txt line 2: 'nope' is not an image"),
}


def test_bad_data_is_named_before_any_list_is_written(tmp_path):
    good = small_folder(tmp_path / "good")
    assert prep.prepare_custom(good, val_fraction=0.2, denominators=(2,), workers=1)["counts"] == dict(train=5, val=1)
    with pytest.raises(PrepareError, match="1/16 of 5 images leaves no labeled image"):
        prep.prepare_custom(small_folder(tmp_path / "few"), denominators=(16,), workers=1)
    assert not (tmp_path / "few" / "lists").exists()
    for case, (spoil, message) in BAD.items():
        root = shutil.copytree(good, tmp_path / case.replace(" ", "_"), ignore=shutil.ignore_patterns("lists"))
        spoil(root)
        val_list = root / "val.txt" if (root / "val.txt").exists() else None
        with pytest.raises(PrepareError, match=message):
            prep.prepare_custom(root, val_list=val_list, denominators=(2,), workers=1)
        assert not (root / "lists").exists(), case


def test_train_and_evaluate_through_the_experiment_folder(custom, tmp_path, one_thread):
    """Two steps of the experiment's train.py (its config and command line, in this process: a subprocess
    would add seconds of imports), evaluation with saved predictions, prediction from Python."""
    from furnace.evaluate import evaluate_checkpoints
    from furnace.inference import Segmenter
    args = overrides(custom, tmp_path / "run", method="supervised", epochs=1, network="mobilenet_v2",
                     class_names=None, num_classes=None, eval_crop_size=144)  # classes: from the folder
    train_in_process(args, EXP)
    last = tmp_path / "run" / "snapshot" / "last.pth"
    seg = Segmenter.from_checkpoint(last, device="cpu")
    assert seg.num_classes == 6 and seg.class_names == TOY_CLASSES
    assert np.array_equal(seg.palette[:6], PALETTE)  # the checkpoint carries the folder's colours
    C = resolve(load_experiment(EXP), collect_overrides(pairs=args))
    (result,) = evaluate_checkpoints(C, checkpoints=[str(last)], save_path=str(tmp_path / "pred"), device="cpu",
                                     verbose=False)
    assert 0 <= result["miou"] <= 1
    name = read_list(custom / "lists" / "val.txt")[0]
    with Image.open(tmp_path / "pred" / "color" / f"{name}.png") as im:
        assert im.mode == "P" and np.array_equal(np.array(im.getpalette()[:18]).reshape(6, 3), PALETTE)
        colour = np.array(im)
    assert np.array_equal(colour, seg.predict(custom / "images" / f"{name}.jpg"))
