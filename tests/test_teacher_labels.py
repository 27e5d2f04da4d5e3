"""Offline teachers (furnace/teacher_labels.py, C.teacher_labels='offline'): the stored maps are the teachers'
whole-image argmax, the datasets augment them exactly as labels, the offline step equals the online step
when it is given the online pseudo-labels (with fewer teacher images), and a finished or foreign cache is
reused or refused, never overwritten."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from easydict import EasyDict

from furnace.config import collect_overrides, load_experiment, resolve
from furnace.data import build_dataset, paste, paste_labels, read_image, read_label
from furnace.data.transforms import normalize
from furnace.distributed import DistInfo
from furnace.engine import Trainer
from furnace.evaluate import predict_probs
from furnace.losses import pseudo_label_ce
from furnace.methods.mgd import mgd_step
from furnace.models import build_segmentor
from furnace.sampling import cutmix_masks
from furnace.teacher_labels import agreement, label_path, precompute
from furnace.teachers import FrozenTeacher
from trainkit import (EXP, NUM_CLASSES, TORCHRUN, clean_env, make_teacher, overrides, torch_threads,
                      train_in_process)

pytestmark = pytest.mark.usefixtures("one_thread")


def config(toy, out, **changes):
    return resolve(load_experiment(EXP), collect_overrides([], overrides(toy, out, **changes)))


FAST = dict(setting="fast")  # offline teachers are one of the fast setting's choices


def dict_config(C, **changes):
    return EasyDict(dict(C, **changes))


@pytest.fixture(scope="module")
def teacher_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline_teachers")
    return str(make_teacher(d / "deep.pth", seed=1)), str(make_teacher(d / "wide.pth", seed=2))


def test_pseudo_label_ce_ignores_255_and_pasted_labels_are_the_argmax_of_pasted_logits():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])             # (1, 2 classes, 1, 2 pixels)
    p = logits.softmax(1)
    labels_u0, labels_u1 = torch.tensor([[[0, 1]]]), torch.tensor([[[1, 255]]])
    mask = torch.tensor([[[[0.0, 1.0]]]])                              # pixel 1 from u1: no label there
    assert pseudo_label_ce(logits, paste_labels(labels_u0, labels_u1, mask)).item() == pytest.approx(
        -float(p[0, 0, 0, 0].log()))
    assert pseudo_label_ce(logits, labels_u0).item() == pytest.approx(
        -float(p[0, 0, 0, 0].log() + p[0, 1, 0, 1].log()) / 2)
    # online teachers' labels are made by argmax first: with a 0/1 mask that is exactly the argmax of the
    # pasted logits (the published order), so the loss is the same to the bit
    g = torch.Generator().manual_seed(0)
    t0, t1, s = (torch.randn(2, 3, 4, 5, generator=g) for _ in range(3))
    m = (torch.rand(2, 1, 4, 5, generator=g) > 0.5).float()
    assert torch.equal(paste(t0, t1, m).argmax(1), paste_labels(t0.argmax(1), t1.argmax(1), m))
    assert torch.equal(pseudo_label_ce(s, paste(t0, t1, m).argmax(1)),
                       pseudo_label_ce(s, paste_labels(t0.argmax(1), t1.argmax(1), m)))


def test_datasets_augment_teacher_maps_exactly_like_labels(toy, tmp_path):
    C = config(toy, tmp_path)
    labeled, unlabeled = build_dataset(C, "labeled"), build_dataset(C, "unlabeled")
    for role in ("deep", "wide"):  # the ground truth stored as both teachers' maps: must come back as the label
        shutil.copytree(toy / "train_aug" / "label", tmp_path / "maps" / role)
    plain = build_dataset(C, "labeled")
    labeled, unlabeled = (ds.with_teacher_labels(str(tmp_path / "maps")) for ds in (labeled, unlabeled))
    assert "teacher_deep" not in plain[0] and "teacher_deep" in labeled[0]  # a copy: the original is unchanged
    as_labeled = build_dataset(C, "labeled")
    as_labeled.names = unlabeled.names
    for key in [(0, (1, 2, 3)), (1, (7, 0, 0, 5)), (2, (3,))]:
        a, b = labeled[key], plain[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["teacher_deep"], a["label"]) and torch.equal(a["teacher_wide"], a["label"])
        u, ref = unlabeled[key], as_labeled[key]
        assert "label" not in u and torch.equal(u["image"], ref["image"])
        assert torch.equal(u["teacher_deep"], ref["label"]) and torch.equal(u["teacher_wide"], ref["label"])
    (tmp_path / "maps" / "wide" / f"{labeled.names[0]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"wide/{labeled.names[0]}.png"):
        labeled[0]


def test_offline_step_equals_online_step_given_the_online_pseudo_labels(toy, tmp_path, monkeypatch):
    """Same batch: offline mgd_step with the online teachers' argmax as its labels gives the same loss terms
    and student gradients as the online step, and its teachers see only the mixed images."""
    C = config(toy, tmp_path, method="mgd", **FAST)
    torch.manual_seed(0)
    student = build_segmentor("mobilenet_v2", NUM_CLASSES).eval()  # eval: both steps see the same BN statistics
    networks = {r: build_segmentor("mobilenet_v2", NUM_CLASSES).eval().requires_grad_(False) for r in ("deep", "wide")}
    teachers = {r: FrozenTeacher(net) for r, net in networks.items()}
    g = torch.Generator().manual_seed(3)
    batch = {k: torch.randn(2, 3, 32, 32, generator=g) for k in ("x_l", "u0", "u1")}
    batch["y_l"] = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)
    batch["mask"] = cutmix_masks(C, DistInfo(0, 1, 0, torch.device("cpu")), 0)
    seen = []  # images per teacher call
    for teacher in teachers.values():
        original = teacher.predict
        monkeypatch.setattr(teacher, "predict", lambda x, *a, original=original: seen.append(x.shape[0]) or original(x, *a))
    results = {}
    for mode in ("online", "offline"):
        labels = None
        if mode == "offline":
            with torch.no_grad():
                labels = {role: {"u0": t(batch["u0"]).argmax(1), "u1": t(batch["u1"]).argmax(1),
                                 "x_l": t(batch["x_l"]).argmax(1)} for role, t in networks.items()}
        seen.clear()
        student.zero_grad(set_to_none=True)
        loss, terms = mgd_step(student, teachers, batch, labels, dict_config(C, teacher_labels=mode), torch.device("cpu"))
        loss.backward()
        results[mode] = (terms, [p.grad.clone() for p in student.parameters()], list(seen))
    (on_terms, on_grads, on_seen), (off_terms, off_grads, off_seen) = results["online"], results["offline"]
    assert set(on_terms) == set(off_terms) == {"sup", "pix_u", "pix_l", "semantic", "region"}
    for k in on_terms:
        assert torch.allclose(on_terms[k], off_terms[k], rtol=1e-5, atol=1e-7), k
    scale = max(float(g.abs().max()) for g in on_grads)
    assert max(float((a - b).abs().max()) for a, b in zip(on_grads, off_grads)) <= 1e-5 * scale
    assert on_seen == [8, 8] and off_seen == [2, 2]  # (u0, u1, u_m, x_l) per teacher online, u_m offline


def test_offline_run_stores_each_teachers_argmax_then_reuses_and_guards_it(toy, tmp_path, teacher_paths):
    deep, wide = teacher_paths
    args = dict(method="mgd", epochs=1, iters_per_epoch=2, teacher_deep=deep, teacher_wide=wide,
                teacher_labels="offline", eval_crop_size=48, **FAST)
    train_in_process(overrides(toy, tmp_path / "run", **args))
    root = tmp_path / "run" / "teacher_labels"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["teachers"]["deep"]["precision"] == "fp32" and manifest["inference"]["crop_size"] == [48, 48]
    C = config(toy, tmp_path / "run", **args)
    names = set(build_dataset(C, "labeled").names) | set(build_dataset(C, "unlabeled").names)
    assert {p.stem for p in (root / "deep").glob("*.png")} == names == {p.stem for p in (root / "wide").glob("*.png")}
    # a stored map is the teacher's argmax over the whole image (sliding windows of eval_crop_size)
    name = sorted(names)[0]
    teacher = build_segmentor("mobilenet_v2", NUM_CLASSES)
    teacher.load_state_dict(torch.load(deep, weights_only=False)["model"])
    image = normalize(read_image(toy / "train_aug" / "image" / f"{name}.jpg"))
    x = torch.from_numpy(image.transpose(2, 0, 1)).unsqueeze(0)
    with torch.no_grad():
        expected = predict_probs(teacher.eval(), x, crop_size=48).argmax(1)[0].numpy()
    stored = read_label(label_path(str(root), "deep", name))
    assert (stored == expected).mean() >= 0.999  # threads may flip a near-tie
    log = (tmp_path / "run" / "train.log").read_text()
    assert "offline teacher labels in" in log and "epoch 1/1" in log

    # a second run reuses the maps (not rewritten) and removes the leftovers of a write cut short ...
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    stale = root / "deep" / f"{name}.tmp123.png"
    stale.write_bytes(b"half a PNG")
    train_in_process(overrides(toy, tmp_path / "run2", **args, teacher_label_dir=str(root)))
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before and not stale.exists()
    # ... and other teachers are refused by name, leaving the maps as they were
    with pytest.raises(ValueError, match=f"teacher_label_dir {root} holds pseudo-labels made with other teachers"):
        Trainer(config(toy, tmp_path / "run3", **dict(args, teacher_deep=wide, teacher_wide=deep),
                       teacher_label_dir=str(root)))
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before


def test_offline_agreement_counts_only_labelled_pixels():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1] = 1.0                                                  # online argmax: class 1 everywhere
    assert agreement(torch.tensor([[[1, 1, 0, 255]]]), logits) == pytest.approx(2 / 3)


def test_offline_with_train_mode_teacher_bn_is_refused(toy, tmp_path, teacher_paths):
    with pytest.raises(ValueError, match=r"teacher_labels='offline' needs teacher_bn='eval'"):
        config(toy, tmp_path, method="mgd", teacher_labels="offline", teacher_bn="train")
    with pytest.raises(ValueError, match="set teacher_labels='online' for train-mode teachers"):
        config(toy, tmp_path, method="mgd", teacher_bn="train", **FAST)  # fast is offline: the error says what to do
    published = config(toy, tmp_path, method="mgd")
    assert (published.teacher_labels, published.teacher_bn) == ("online", "train")
    assert config(toy, tmp_path, method="cps", teacher_bn="train", **FAST).teacher_labels == "offline"  # no teachers
    with pytest.raises(ValueError, match="teacher_labels='sometimes'"):
        config(toy, tmp_path, method="mgd", teacher_labels="sometimes")


def test_two_processes_share_the_precomputation_and_store_what_one_process_stores(toy, tmp_path, teacher_paths):
    """torchrun, 2 gloo processes: each predicts half of the images, both wait for all, then train."""
    deep, wide = teacher_paths
    args = overrides(toy, tmp_path / "two", method="mgd", batch_size=4, epochs=1, iters_per_epoch=1, teacher_deep=deep,
                     teacher_wide=wide, teacher_labels="offline", eval_crop_size=48, **FAST)
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(EXP / "train.py"), *args],
                            capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "two" / "snapshot" / "last.pth").is_file()
    C = config(toy, tmp_path / "one", method="mgd", teacher_deep=deep, teacher_wide=wide, teacher_labels="offline",
               eval_crop_size=48, **FAST)
    datasets = {s: build_dataset(C, s) for s in ("labeled", "unlabeled")}
    teachers = {}
    for role, path in (("deep", deep), ("wide", wide)):
        network = build_segmentor("mobilenet_v2", NUM_CLASSES).eval()
        network.load_state_dict(torch.load(path, weights_only=False)["model"])
        teachers[role] = FrozenTeacher(network)
    with torch_threads(1):
        one = precompute(teachers, datasets, C, DistInfo(0, 1, 0, torch.device("cpu")))
    two = tmp_path / "two" / "teacher_labels"
    maps = sorted(p.relative_to(one) for p in Path(one).rglob("*.png"))
    assert len(maps) == 2 * 24 and maps == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    assert all((read_label(Path(one) / m) == read_label(two / m)).all() for m in maps)
