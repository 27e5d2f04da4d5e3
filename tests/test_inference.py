"""furnace.inference: prediction from Python equals the evaluation's, batches equal single images, colours
follow the palette, and tools/predict.py and tools/export_onnx.py go through it."""
import numpy as np
import pytest
import torch
from PIL import Image

import export_onnx
import predict
from furnace.data import VOC_PALETTE, normalize
from furnace.evaluate import predict_probs
from furnace.inference import Segmenter, image_tensor
from furnace.models import build_segmentor
from trainkit import torch_threads

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
CONFIG = dict(dataset="voc", eval_mode="sliding", eval_crop_size=32, eval_stride_rate=0.5, eval_scales=[0.75, 1.0],
              eval_flip=True, image_mean=MEAN, image_std=STD)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 6-class MobileNet-v2 checkpoint whose config asks for sliding windows of 32, two scales and flip."""
    with torch_threads(1):
        torch.manual_seed(0)
        net = build_segmentor("mobilenet_v2", 6).eval()
        with torch.no_grad():
            net.classifier.weight.mul_(300.0)  # random init gives near-uniform probabilities; spread them
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    torch.save(dict(model=net.state_dict(), network="mobilenet_v2", num_classes=6, config=CONFIG), path)
    return path, net


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 52, 3), (40, 52, 3), (27, 35, 3))]


def reference(net, image):
    x = torch.from_numpy(normalize(image, MEAN, STD)).permute(2, 0, 1)[None]
    return predict_probs(net, x, "sliding", 32, 0.5, [0.75, 1.0], True)[0].numpy()


def test_probabilities_equal_the_evaluation(checkpoint, one_thread):
    path, net = checkpoint
    seg = Segmenter.from_checkpoint(path, device="cpu")
    assert seg.options == dict(mode="sliding", crop_size=(32, 32), stride_rate=0.5, scales=[0.75, 1.0], flip=True)
    image = images()[0]
    labels, probs = seg.predict(image, return_probs=True)
    assert labels.dtype == np.uint8 and labels.shape == (40, 52)
    assert probs.dtype == np.float32 and probs.shape == (6, 40, 52)
    expected = reference(net, image)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    assert np.array_equal(labels, probs.argmax(0)) and len(np.unique(labels)) > 1
    assert np.array_equal(seg.predict(image), labels)
    # arguments override the checkpoint's settings
    plain = Segmenter.from_checkpoint(path, device="cpu", mode="whole", scales=[1.0], flip=False)
    x = torch.from_numpy(normalize(image, MEAN, STD)).permute(2, 0, 1)[None]
    np.testing.assert_allclose(plain.predict(image, return_probs=True)[1], net(x).softmax(1)[0].detach().numpy(),
                               rtol=0, atol=1e-6)


def test_batch_equals_single_images(checkpoint, one_thread):
    seg = Segmenter.from_checkpoint(checkpoint[0], device="cpu")
    ims = images(1)
    singles = [seg.predict(im, return_probs=True) for im in ims]
    labels, probs = seg.predict(ims, return_probs=True)  # a list: the two 40x52 images go through together
    assert isinstance(labels, list) and [p.shape for p in probs] == [(6, 40, 52), (6, 40, 52), (6, 27, 35)]
    for (l1, p1), l2, p2 in zip(singles, labels, probs):
        np.testing.assert_allclose(p2, p1, rtol=0, atol=1e-5)
        sure = np.sort(p1, 0)[-1] - np.sort(p1, 0)[-2] > 1e-4  # pixels whose argmax rounding cannot flip
        assert np.array_equal(l2[sure], l1[sure])
    stacked, stacked_probs = seg.predict(np.stack(ims[:2]), return_probs=True)
    assert stacked.shape == (2, 40, 52) and stacked.dtype == np.uint8 and stacked_probs.shape == (2, 6, 40, 52)
    np.testing.assert_allclose(stacked_probs, np.stack(probs[:2]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        seg.predict(ims[0].astype(np.float32))


def test_colours_follow_the_palette(checkpoint):
    seg = Segmenter.from_checkpoint(checkpoint[0], device="cpu")
    labels = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint8)
    assert np.array_equal(seg.colorize(labels), VOC_PALETTE[labels])
    image = np.zeros((2, 3, 3), np.uint8)
    assert np.array_equal(seg.overlay(image, labels, alpha=1.0), VOC_PALETTE[labels])
    mine = [[10, 20, 30]] * 6
    assert np.array_equal(Segmenter.from_checkpoint(checkpoint[0], device="cpu", palette=mine).colorize(labels),
                          np.full((2, 3, 3), [10, 20, 30], np.uint8))


def test_predict_and_export_go_through_it(checkpoint, tmp_path, monkeypatch, one_thread):
    path, net = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    image = images(2)[2]
    Image.fromarray(image).save(folder / "a.png")
    made = []
    original = Segmenter.from_checkpoint.__func__

    def spy(cls, *args, **kwargs):
        made.append(original(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(spy))
    predict.main(["-p", str(path), "-i", str(folder), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert len(made) == 1 and made[0].options["flip"] and made[0].options["scales"] == [0.75, 1.0]
    mask = Image.open(tmp_path / "out" / "a.png")
    assert np.array_equal(np.array(mask), reference(net, image).argmax(0))  # the checkpoint's scales and flip
    (x,) = export_onnx.load_images([folder], 1, MEAN, STD)
    assert torch.equal(x, image_tensor(image, MEAN, STD)) and torch.equal(x, made[0].to_tensor(image))
