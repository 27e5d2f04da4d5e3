import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from easydict import EasyDict
from PIL import Image

from furnace.data import CITYSCAPES_PALETTE, VOC_PALETTE
from furnace.evaluate import (evaluate_checkpoints, evaluate_dataset, main, predict_probs, resolve_checkpoints,
                              sliding_probs, whole_probs)
from furnace.metrics import confusion_matrix
from furnace.models import build_segmentor


class TinyNet(nn.Module):
    """Small conv net with a 5x5 receptive field and a global term, so position and context matter."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, padding=1))
        self.num_classes = num_classes

    def forward(self, x):
        y = self.body(x)
        return y + y.mean((2, 3), keepdim=True)


class ToyDataset(torch.utils.data.Dataset):
    """Val-mode samples of assorted sizes; labels include ignore pixels."""

    def __init__(self, n=5, num_classes=3):
        g = torch.Generator().manual_seed(1)
        self.items = []
        for i in range(n):
            h, w = 12 + 3 * i, 20 - 2 * i
            label = torch.randint(0, num_classes, (h, w), generator=g)
            label[0, :3] = 255
            self.items.append(dict(image=torch.randn(3, h, w, generator=g), label=label, name=f"img_{i}"))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _cfg(**kw):
    C = EasyDict(dataset="voc", num_classes=3, class_names=["a", "b", "c"], eval_crop_size=16, eval_stride_rate=2 / 3,
                 eval_scales=[1.0], eval_flip=False, eval_mode="sliding", device="cpu")
    C.update(kw)
    return C


@pytest.fixture(scope="module")
def segmentor():
    torch.manual_seed(0)
    return build_segmentor("mobilenet_v2", 6).eval()  # the fastest real segmentor on CPU


def test_sliding_equals_whole_when_one_window_is_the_image(segmentor):
    x = torch.randn(1, 3, 40, 56)
    whole = whole_probs(segmentor, x)
    torch.testing.assert_close(sliding_probs(segmentor, x, (40, 56)), whole, rtol=0, atol=1e-6)
    assert torch.equal(predict_probs(segmentor, x, "sliding", (40, 56)).argmax(1), whole.argmax(1))
    torch.testing.assert_close(whole.sum(1), torch.ones(1, 40, 56))


def test_image_smaller_than_crop_is_zero_padded_centred_then_cut(segmentor):
    x = torch.randn(1, 3, 40, 56)
    out = sliding_probs(segmentor, x, 64)
    assert out.shape == (1, 6, 40, 56)
    padded = F.pad(x, (4, 4, 12, 12))  # 64-56 = 8 -> 4 left/right; 64-40 = 24 -> 12 top/bottom
    torch.testing.assert_close(out, whole_probs(segmentor, padded)[:, :, 12:52, 4:60], rtol=0, atol=1e-6)
    # a tall thin image: padded along W only, several windows along H
    tall = predict_probs(segmentor, torch.randn(1, 3, 100, 20), "sliding", 64, scales=[0.5, 1.0], flip=True)
    assert tall.shape == (1, 6, 100, 20) and torch.allclose(tall.sum(1), torch.ones(1, 100, 20))


def test_sliding_windows_are_averaged():
    net = TinyNet().eval()
    x = torch.randn(2, 3, 20, 30)
    # crop 16, stride ceil(16*2/3) = 11: rows start at 0, 4; columns at 0, 11, 14
    acc, cnt = torch.zeros(2, 3, 20, 30), torch.zeros(20, 30)
    for y in (0, 4):
        for xx in (0, 11, 14):
            acc[:, :, y:y + 16, xx:xx + 16] += net(x[:, :, y:y + 16, xx:xx + 16]).softmax(1)
            cnt[y:y + 16, xx:xx + 16] += 1
    for max_batch in (1, 4, 64):  # batching the windows must not change the result
        torch.testing.assert_close(sliding_probs(net, x, 16, 2 / 3, max_batch), acc / cnt)
    # a per-pixel model has no context: any window layout gives the whole-image result
    pointwise = nn.Conv2d(3, 3, 1).eval()
    torch.testing.assert_close(sliding_probs(pointwise, x, (7, 9)), whole_probs(pointwise, x))


@pytest.mark.parametrize("mode,scales", [("whole", [1.0]), ("sliding", [1.0]), ("sliding", [0.75, 1.25])])
def test_flip_averaging_is_symmetric(segmentor, mode, scales):
    x = torch.randn(1, 3, 29, 45)
    kw = dict(mode=mode, crop_size=24, scales=scales)
    p = predict_probs(segmentor, x, flip=True, **kw)
    p_flipped = predict_probs(segmentor, x.flip(3), flip=True, **kw)
    if scales == [1.0]:
        assert torch.equal(p_flipped, p.flip(3))  # exact: each flip pair is summed before anything else
    torch.testing.assert_close(p_flipped, p.flip(3), rtol=0, atol=1e-6)
    assert torch.equal(p_flipped.argmax(1), p.argmax(1).flip(-1))
    no_flip = predict_probs(segmentor, x, flip=False, **kw)
    assert not torch.allclose(predict_probs(segmentor, x.flip(3), flip=False, **kw), no_flip.flip(3), atol=1e-4)


def _expected_confusion(net, ds, C):
    conf = torch.zeros(3, 3, dtype=torch.int64)
    for s in ds:
        pred = sliding_probs(net, s["image"][None], C.eval_crop_size, C.eval_stride_rate).argmax(1)[0]
        conf += confusion_matrix(pred, s["label"], 3)
    return conf


def test_evaluate_dataset_and_saved_pngs(tmp_path):
    net, ds = TinyNet(), ToyDataset()
    for dataset, palette in (("voc", VOC_PALETTE), ("cityscapes", CITYSCAPES_PALETTE)):
        C = _cfg(dataset=dataset)
        out = tmp_path / dataset
        conf = evaluate_dataset(net, ds, C, torch.device("cpu"), save_path=str(out))
        assert torch.equal(conf, _expected_confusion(net, ds, C))
        assert int(conf.sum()) == sum(int((s["label"] != 255).sum()) for s in ds)
        for s in ds:
            pred = sliding_probs(net, s["image"][None], 16).argmax(1)[0].numpy()
            raw = Image.open(out / "label" / f"{s['name']}.png")
            color = Image.open(out / "color" / f"{s['name']}.png")
            assert raw.mode == "L" and color.mode == "P"
            assert np.array_equal(np.array(raw), pred) and np.array_equal(np.array(color), pred)
            pal = np.array(color.getpalette(), dtype=np.uint8).reshape(-1, 3)
            assert np.array_equal(pal[:len(palette)], palette)
            assert np.array_equal(np.array(color.convert("RGB")), palette[pred])
    assert net.training  # evaluate_dataset restores the mode it found


def _dist_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    conf = evaluate_dataset(TinyNet(), ToyDataset(), _cfg(), torch.device("cpu"), rank, world)
    if rank == 0:
        torch.save(conf, out_file)
    dist.destroy_process_group()


def test_two_processes_give_the_one_process_confusion(tmp_path):
    net, ds, C = TinyNet(), ToyDataset(), _cfg()
    single = evaluate_dataset(net, ds, C, torch.device("cpu"))
    # the rank slices partition the dataset (5 samples over 2 ranks: 3 + 2, nothing padded or repeated)
    parts = [evaluate_dataset(net, ds, C, torch.device("cpu"), r, 2) for r in range(2)]
    assert torch.equal(parts[0] + parts[1], single)
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "conf.pt")), nprocs=2, join=True)
    assert torch.equal(torch.load(tmp_path / "conf.pt"), single)


def test_resolve_checkpoints(tmp_path):
    for e in (10, 15, 20, 33, 40):
        (tmp_path / f"epoch-{e}.pth").touch()
    d = str(tmp_path)
    names = lambda ps: [os.path.basename(p) for p in ps]  # noqa: E731
    assert names(resolve_checkpoints(d, "15-33")) == ["epoch-15.pth", "epoch-20.pth", "epoch-33.pth"]
    assert names(resolve_checkpoints(d, "20-")) == ["epoch-20.pth", "epoch-33.pth", "epoch-40.pth"]
    assert names(resolve_checkpoints(d, "10,33-")) == ["epoch-10.pth", "epoch-33.pth", "epoch-40.pth"]
    assert names(resolve_checkpoints(d)) == ["epoch-40.pth"]
    (tmp_path / "last.pth").touch()
    assert names(resolve_checkpoints(d)) == ["last.pth"]
    with pytest.raises(FileNotFoundError, match="epoch-16.pth"):
        resolve_checkpoints(d, "16")
    with pytest.raises(FileNotFoundError, match="41"):
        resolve_checkpoints(d, "41-")
    with pytest.raises(ValueError, match="bad epoch spec"):
        resolve_checkpoints(d, "x-3")


def test_evaluate_checkpoint_range_end_to_end(tmp_path, capsys):
    snap = tmp_path / "output" / "snapshot"
    snap.mkdir(parents=True)
    ds = ToyDataset(n=2)
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        net = build_segmentor("mobilenet_v2", 3)
        torch.save(dict(model=net.state_dict(), network="mobilenet_v2", num_classes=3, epoch=epoch),
                   snap / f"epoch-{epoch}.pth")
    from furnace.config import new_config
    C = new_config("voc", str(tmp_path / "config.py"))
    C.update(_cfg(output_dir=str(tmp_path / "output"), eval_crop_size=24))
    results = evaluate_checkpoints(C, epochs="1-", dataset=ds, save_path=str(tmp_path / "pred"))
    assert [r["epoch"] for r in results] == [1, 2]
    for r in results:
        assert 0 <= r["miou"] <= 1 and len(r["iou"]) == 3
    best = max(results, key=lambda r: r["miou"])
    log = (tmp_path / "output" / "eval.log").read_text()
    assert f"best: {best['checkpoint']}" in log and "mIoU" in log and "| a " in log
    assert (tmp_path / "pred" / "epoch-2" / "color" / "img_1.png").exists()
    assert "best:" in capsys.readouterr().out
    # main(): the CLI, whole-image mode with flip, a KEY=VALUE override applied, bad overrides refused
    out = main(C, ["-p", str(snap / "epoch-1.pth"), "--mode", "whole", "--flip", "eval_crop_size=20",
                   "--json", str(tmp_path / "r.json")], dataset=ds)
    assert json.loads((tmp_path / "r.json").read_text())[0]["miou"] == pytest.approx(out[0]["miou"])
    with pytest.raises(ValueError, match="key=value"):
        main(C, ["-p", str(snap / "epoch-1.pth"), "stray"], dataset=ds)
    with pytest.raises(KeyError, match="foo"):
        main(C, ["-p", str(snap / "epoch-1.pth"), "foo=1"], dataset=ds)
    assert len(out) == 1 and out[0]["epoch"] == 1
    C.num_classes = 4
    with pytest.raises(ValueError, match="4"):
        evaluate_checkpoints(C, epochs="1", dataset=ds, verbose=False)
