"""Tests for furnace.models: backbones, torchvision/timm weight layouts, loading, DeepLabv3+."""
import functools
import io

import pytest
import torch
import torch.nn.functional as F

from furnace.models import (SEGMENTOR_PRESETS, BasicBlock, Bottleneck, DeepLabV3Plus, build_segmentor,
                            convert_timm_mobilenetv2, create_backbone, load_pretrained, zero_init_residual_)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Known torchvision parameter counts (classification heads included) and their heads' sizes.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet101": 44_549_160,
                      "wide_resnet50_2": 68_883_240, "mobilenet_v2": 3_504_872}
HEAD_PARAMS = {"resnet18": 512 * 1000 + 1000, "resnet50": 2048 * 1000 + 1000, "resnet101": 2048 * 1000 + 1000,
               "wide_resnet50_2": 2048 * 1000 + 1000,
               "mobilenet_v2": (320 * 1280 + 2 * 1280) + (1280 * 1000 + 1000)}  # features.18 + classifier.1


@pytest.fixture(autouse=True, scope="module")
def flush_denormals():
    """Untrained nets in eval mode produce tiny (denormal) activations that make CPU convs ~50x slower."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@functools.lru_cache(maxsize=None)
def backbone(name, output_stride=16, deep_stem=False, stem_width=64):
    """Cached eval-mode backbone (building the big nets dominates test time)."""
    torch.manual_seed(0)
    return create_backbone(name, output_stride, deep_stem, stem_width).eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- expected torchvision key layouts (fixtures)
def torchvision_resnet_keys(layers, bottleneck):
    """Key names of torchvision's resnet state dict, written out from its layout (fc included)."""
    keys = ["conv1.weight"] + [f"bn1.{p}" for p in BN]
    n_conv = 3 if bottleneck else 2
    for stage, n_blocks in enumerate(layers, 1):
        for b in range(n_blocks):
            pre = f"layer{stage}.{b}."
            for c in range(1, n_conv + 1):
                keys += [pre + f"conv{c}.weight"] + [pre + f"bn{c}.{p}" for p in BN]
            if b == 0 and (bottleneck or stage > 1):
                keys += [pre + "downsample.0.weight"] + [pre + f"downsample.1.{p}" for p in BN]
    return set(keys + ["fc.weight", "fc.bias"])


def torchvision_mobilenet_v2_keys():
    keys = ["features.0.0.weight"] + [f"features.0.1.{p}" for p in BN]
    keys += ["features.1.conv.0.0.weight"] + [f"features.1.conv.0.1.{p}" for p in BN]
    keys += ["features.1.conv.1.weight"] + [f"features.1.conv.2.{p}" for p in BN]
    for i in range(2, 18):
        pre = f"features.{i}.conv."
        keys += [pre + "0.0.weight"] + [pre + f"0.1.{p}" for p in BN]
        keys += [pre + "1.0.weight"] + [pre + f"1.1.{p}" for p in BN]
        keys += [pre + "2.weight"] + [pre + f"3.{p}" for p in BN]
    keys += ["features.18.0.weight"] + [f"features.18.1.{p}" for p in BN]
    return set(keys + ["classifier.1.weight", "classifier.1.bias"])


def head_tensors(name):
    """Random ImageNet-head tensors as found in torchvision files (ignored on load)."""
    if name == "mobilenet_v2":
        heads = {"features.18.0.weight": torch.randn(1280, 320, 1, 1), "classifier.1.weight": torch.randn(1000, 1280),
                 "classifier.1.bias": torch.randn(1000), "features.18.1.num_batches_tracked": torch.tensor(5)}
        heads.update({f"features.18.1.{p}": torch.rand(1280) for p in BN[:4]})
        return heads
    width = backbone(name).feature_channels[-1]
    return {"fc.weight": torch.randn(1000, width), "fc.bias": torch.randn(1000)}


# ---------------------------------------------------------------- backbones
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "wide_resnet50_2", "mobilenet_v2"])
@pytest.mark.parametrize("os_", [8, 16])
def test_feature_shapes(name, os_):
    size = 64 if name in ("resnet18", "mobilenet_v2") else 32
    model = backbone(name, os_)
    expect_ch = {"mobilenet_v2": [24, 32, 96, 320], "resnet18": [64, 128, 256, 512]}.get(name, [256, 512, 1024, 2048])
    expect_st = [4, 8, 8, 8] if os_ == 8 else [4, 8, 16, 16]
    assert model.feature_channels == expect_ch and model.feature_strides == expect_st
    with torch.no_grad():
        feats = model(torch.randn(1, 3, size, size))
    assert [tuple(f.shape) for f in feats] == [(1, c, size // s, size // s) for c, s in zip(expect_ch, expect_st)]


def test_output_stride_32_and_bad_settings():
    model = create_backbone("resnet18", output_stride=32)
    assert model.feature_strides == [4, 8, 16, 32]
    assert model(torch.randn(1, 3, 64, 64))[-1].shape[-1] == 2
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone("resnet18", output_stride=4)
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet34")
    with pytest.raises(ValueError, match="deep_stem"):
        create_backbone("mobilenet_v2", deep_stem=True)
    with pytest.raises(ValueError, match="stem_width"):
        create_backbone("resnet18", stem_width=32)  # width only exists for the deep stem


def published_dilate(stage: torch.nn.Module, dilation: int, multi_grid: bool) -> None:
    """The published networks' dilation of a stage, written from its description: in each block, a stride-2
    conv loses its stride, and every 3x3 conv gets the block's dilation (and padding); the block's dilation
    doubles per block with multi_grid."""
    for block in stage.children():
        for m in block.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation = m.padding = (dilation, dilation)
        dilation *= 2 if multi_grid else 1


def stage_dilations(stage):
    """Per block: (stride, dilation, padding) of each conv in order of definition."""
    return [[(m.stride[0], m.dilation[0], m.padding[0]) for m in blk.modules() if isinstance(m, torch.nn.Conv2d)]
            for blk in stage]


@pytest.mark.parametrize("name", ["resnet18", "resnet101", "wide_resnet50_2"])
def test_dilation_of_every_conv(name):
    """OS16: every 3x3 conv of layer4's blocks has dilation 2, 4, 8 (the first block's conv that lost its stride
    included), padding equal to it, stride 1; 1x1 convs (downsample too) stride 1, dilation 1.
    OS8: the same in layer3 with dilation 2 throughout, and layer4 with 4, 8, 16."""
    for os_, stages in ((16, {"layer4": (2, True)}), (8, {"layer3": (2, False), "layer4": (4, True)})):
        net = create_backbone(name, os_)
        for stage_name, (first, grid) in stages.items():
            for i, convs in enumerate(stage_dilations(getattr(net, stage_name))):
                d = first * 2 ** i if grid else first
                assert convs == [(1, d, d) if k == 3 else (1, 1, 0)
                                 for k in [m.kernel_size[0] for m in getattr(net, stage_name)[i].modules()
                                           if isinstance(m, torch.nn.Conv2d)]], (name, os_, stage_name, i)
        if os_ == 16:  # layer3 stays undilated, with its stride
            assert all(c[1] == 1 for blk in stage_dilations(net.layer3) for c in blk)
            assert net.layer3[0].downsample[0].stride == (2, 2)


@pytest.mark.parametrize("name,deep_stem,stem_width", [("resnet18", True, 32), ("resnet101", True, 64),
                                                       ("wide_resnet50_2", False, 64)])
def test_dilated_network_equals_published_procedure(name, deep_stem, stem_width):
    """Same weights, same outputs: our OS16 backbone against an OS32 one dilated the published way."""
    torch.manual_seed(0)
    ours = create_backbone(name, 16, deep_stem, stem_width).eval()
    published = create_backbone(name, 32, deep_stem, stem_width)
    published.load_state_dict(ours.state_dict())
    published_dilate(published.layer4, 2, multi_grid=True)
    published.eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(ours(x), published(x)):
            assert torch.equal(a, b)


def test_dilation_scheme():
    r50 = backbone("resnet50", 16)
    assert [blk.conv2.dilation[0] for blk in r50.layer4] == [2, 4, 8]
    assert [blk.conv2.stride[0] for blk in r50.layer4] == [1, 1, 1]
    assert r50.layer4[0].downsample[0].stride == (1, 1) and r50.layer3[0].downsample[0].stride == (2, 2)
    assert [blk.conv2.dilation[0] for blk in r50.layer3] == [1] * 6
    mb = backbone("mobilenet_v2", 16)
    assert [mb.features[i].conv[1][0].dilation[0] for i in (13, 14, 15, 17)] == [1, 1, 2, 2]
    assert mb.features[14].conv[1][0].stride == (1, 1)
    mb8 = backbone("mobilenet_v2", 8)
    assert [mb8.features[i].conv[1][0].dilation[0] for i in (6, 7, 8, 14, 15)] == [1, 1, 2, 2, 4]


def test_parameter_counts_match_torchvision():
    for name, total in TORCHVISION_PARAMS.items():
        assert n_params(backbone(name)) + HEAD_PARAMS[name] == total, name
    # Deep stem w=32 on ResNet-50 = timm resnet50c/d (the avg-pool shortcut of "d" has no parameters).
    assert n_params(create_backbone("resnet50", deep_stem=True, stem_width=32)) + HEAD_PARAMS["resnet50"] == 25_576_264

    def deep_stem_delta(w, bottleneck):
        """Parameter change of replacing the 7x7 stem (64 ch) by the 3-conv stem (2w out)."""
        stem = 3 * w * 9 + 2 * w + w * w * 9 + 2 * w + w * 2 * w * 9 + 2 * 2 * w
        old = 3 * 64 * 49 + 2 * 64
        extra_in = 2 * w - 64  # layer1.0.conv1 and (bottleneck) layer1.0.downsample.0 read 2w channels
        return stem - old + extra_in * (64 + 256 if bottleneck else 0)
    r18c = backbone("resnet18", 16, True, 32)
    assert n_params(r18c) == n_params(backbone("resnet18")) + deep_stem_delta(32, False) == 11_195_744
    r101c = backbone("resnet101", 16, True, 64)
    assert n_params(r101c) == n_params(backbone("resnet101")) + deep_stem_delta(64, True)


@pytest.mark.parametrize("name,layers,bottleneck", [
    ("resnet18", [2, 2, 2, 2], False), ("resnet50", [3, 4, 6, 3], True),
    ("resnet101", [3, 4, 23, 3], True), ("wide_resnet50_2", [3, 4, 6, 3], True)])
def test_resnet_keys_match_torchvision(name, layers, bottleneck):
    sd = backbone(name).state_dict()
    assert set(sd) | set(head_tensors(name)) == torchvision_resnet_keys(layers, bottleneck)
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    if name == "wide_resnet50_2":
        assert sd["layer1.0.conv1.weight"].shape == (128, 64, 1, 1)  # bottleneck width x2
        assert sd["layer4.2.conv2.weight"].shape == (1024, 1024, 3, 3)
    if bottleneck:
        assert sd["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)


def test_mobilenet_keys_match_torchvision():
    sd = backbone("mobilenet_v2").state_dict()
    assert set(sd) | set(head_tensors("mobilenet_v2")) == torchvision_mobilenet_v2_keys()
    assert sd["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert sd["features.14.conv.1.0.weight"].shape == (576, 1, 3, 3)
    assert sd["features.17.conv.2.weight"].shape == (320, 960, 1, 1)


def test_deep_stem_keys_follow_timm():
    sd = backbone("resnet101", 16, True, 64).state_dict()
    stem = sorted(k.rsplit(".", 1)[0] for k in sd if k.startswith(("conv1.", "bn1.")))
    assert sorted(set(stem)) == ["bn1", "conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6"]
    assert sd["conv1.0.weight"].shape == (64, 3, 3, 3) and sd["conv1.6.weight"].shape == (128, 64, 3, 3)
    assert sd["bn1.weight"].shape == (128,) and sd["layer1.0.conv1.weight"].shape == (64, 128, 1, 1)
    assert backbone("resnet18", 16, True, 32).state_dict()["bn1.weight"].shape == (64,)


# ---------------------------------------------------------------- weight loading
def randomise(model):
    """Random BN statistics/affine on top of the random conv init, so equality checks mean something.

    Values stay moderate: exploding or vanishing activations (denormals) make CPU convs very slow.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.running_var):
                    t.uniform_(0.5, 1.5)
                for t in (m.bias, m.running_mean):
                    t.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module"])
def test_torchvision_file_round_trip(tmp_path, name, wrap):
    torch.manual_seed(1)
    src = randomise(create_backbone(name)).eval()
    sd = {**src.state_dict(), **head_tensors(name)}
    if name == "resnet18":  # old torchvision files carry no num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd = {"bare": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
          "module": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = tmp_path / "imagenet.pth"
    torch.save(sd, path)
    dst = create_backbone(name, pretrained=str(path)).eval()
    loaded = dst.state_dict()
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            assert torch.equal(a, b)


def to_timm_mobilenetv2(sd):
    """torchvision -> timm mobilenetv2_100 names, written independently of the library's converter."""
    stage_of = {}
    idx = 1
    for stage, n in enumerate([1, 2, 3, 4, 3, 3, 1]):
        for j in range(n):
            stage_of[idx] = (stage, j)
            idx += 1
    ds = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
    ir = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
          "conv.2": "conv_pwl", "conv.3": "bn3"}
    top = {"features.0.0": "conv_stem", "features.0.1": "bn1", "features.18.0": "conv_head",
           "features.18.1": "bn2", "classifier.1": "classifier"}
    out = {}
    for k, v in sd.items():
        mod, param = k.rsplit(".", 1)
        if mod in top:
            out[f"{top[mod]}.{param}"] = v
            continue
        _, i, rest = mod.split(".", 2)
        stage, j = stage_of[int(i)]
        out[f"blocks.{stage}.{j}.{(ds if stage == 0 else ir)[rest]}.{param}"] = v
    return out


def test_timm_mobilenet_conversion(tmp_path):
    torch.manual_seed(2)
    src = randomise(create_backbone("mobilenet_v2")).eval()
    timm_sd = to_timm_mobilenetv2({**src.state_dict(), **head_tensors("mobilenet_v2")})
    assert {"conv_stem.weight", "blocks.0.0.conv_dw.weight", "blocks.6.0.conv_pwl.weight", "conv_head.weight",
            "bn2.running_var", "classifier.weight"} <= set(timm_sd)
    conv = convert_timm_mobilenetv2(timm_sd)
    assert conv.keys() == {**src.state_dict(), **head_tensors("mobilenet_v2")}.keys()
    assert torch.equal(conv["features.16.conv.3.running_var"], src.state_dict()["features.16.conv.3.running_var"])
    torch.save({"state_dict": timm_sd}, tmp_path / "mobilenetv2_100.pth")
    dst = create_backbone("mobilenet_v2")
    result = load_pretrained(dst, tmp_path / "mobilenetv2_100.pth")
    assert result[:3] == ([], [], [])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x)[-1], dst.eval()(x)[-1])


def test_mismatched_file_raises_and_partial_load(tmp_path):
    torch.manual_seed(3)
    src = randomise(create_backbone("resnet18"))  # standard 7x7 stem
    sd = src.state_dict()
    sd["layer1.0.conv1.weight"] = torch.randn(32, 64, 3, 3)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong_stem.pth"
    torch.save(sd, path)
    target = create_backbone("resnet18", deep_stem=True, stem_width=32)
    with pytest.raises(RuntimeError) as err:
        load_pretrained(target, path)
    msg = str(err.value)
    assert "wrong_stem.pth" in msg and "conv1.0.weight" in msg and "conv1.6.weight" in msg  # missing
    assert "conv1.weight" in msg and "extra.weight" in msg  # unexpected
    assert "layer1.0.conv1.weight: (32, 64, 3, 3) -> (64, 64, 3, 3)" in msg  # shape mismatch

    before = {k: v.clone() for k, v in target.state_dict().items()}
    res = load_pretrained(target, path, strict=False)
    assert set(res.missing) == {f"conv1.{i}.{p}" for i in (1, 4) for p in BN[:4]} | {
        "conv1.0.weight", "conv1.3.weight", "conv1.6.weight"}
    assert set(res.unexpected) == {"conv1.weight", "extra.weight"}
    assert res.mismatched == ["layer1.0.conv1.weight: (32, 64, 3, 3) -> (64, 64, 3, 3)"]
    now = target.state_dict()
    assert torch.equal(now["layer2.0.conv1.weight"], src.state_dict()["layer2.0.conv1.weight"])
    assert torch.equal(now["bn1.running_var"], src.state_dict()["bn1.running_var"])
    assert torch.equal(now["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])  # not loaded
    assert torch.equal(now["conv1.0.weight"], before["conv1.0.weight"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(target, tmp_path / "nope.pth")


def test_torchvision_resnet18_into_deep_stem_student_as_published(tmp_path):
    """The published student start: torchvision's ResNet-18 file (7x7 stem, fc) into the deep-stem network.
    bn1 and layer1-4 get the file's tensors, the three stem convs and their two BNs keep their initialisation,
    and the result lists exactly those; with strict=True (the default) this load is accepted."""
    torch.manual_seed(4)
    src = randomise(create_backbone("resnet18"))
    sd = {**src.state_dict(), **head_tensors("resnet18")}
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(sd, path)
    torch.manual_seed(5)
    init = create_backbone("resnet18", deep_stem=True, stem_width=32).state_dict()
    torch.manual_seed(5)
    student = build_segmentor("resnet18", 21, pretrained=str(path))
    res = student.backbone.pretrained_load
    stem = {f"conv1.{i}.{p}" for i in (1, 4) for p in BN[:4]} | {"conv1.0.weight", "conv1.3.weight", "conv1.6.weight"}
    assert set(res.missing) == stem and res.unexpected == ["conv1.weight"] and res.mismatched == []
    now = student.backbone.state_dict()
    loaded = [k for k in src.state_dict() if k != "conv1.weight"]
    assert res.loaded == len(loaded)
    for k in loaded:
        assert torch.equal(now[k], sd[k]), k
    for k in stem:
        assert torch.equal(now[k], init[k]), k
    line = res.describe()
    assert all(k in line for k in stem) and "conv1.weight" in line and f"{len(loaded)} tensors loaded" in line
    # A wider mismatch than the stem is still refused.
    del sd["layer4.1.bn2.running_var"]
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="layer4.1.bn2.running_var"):
        build_segmentor("resnet18", 21, pretrained=str(path))


def test_full_deep_stem_file_loads_strictly(tmp_path):
    torch.manual_seed(6)
    src = randomise(create_backbone("resnet18", deep_stem=True, stem_width=32))
    path = tmp_path / "resnet18_v1c.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    student = build_segmentor("resnet18", 21, pretrained=str(path))
    res = student.backbone.pretrained_load
    assert (res.missing, res.unexpected, res.mismatched) == ([], [], []) and res.loaded == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(student.backbone.state_dict()[k], v)
    sd = src.state_dict()
    del sd["conv1.4.weight"]
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="conv1.4.weight"):
        build_segmentor("resnet18", 21, pretrained=str(path))


# ---------------------------------------------------------------- DeepLabv3+
@pytest.mark.parametrize("network,size,os_", [("resnet18", 64, 16), ("mobilenet_v2", 64, 16), ("resnet18", 64, 8)])
def test_deeplab_shapes_and_gradients(network, size, os_):
    torch.manual_seed(0)
    model = build_segmentor(network, 5, output_stride=os_).train()
    assert model.network == network and model.num_classes == 5
    x = torch.randn(2, 3, size, size)  # batch 2: the image-pooling BN needs >1 value per channel in train mode
    out = model(x, return_features=True)
    assert out["logits"].shape == (2, 5, size, size)
    assert out["decoder"].shape == (2, 256, size // 4, size // 4)
    assert [f.shape[1] for f in out["features"]] == model.backbone.feature_channels
    # align_corners=True: corner logits equal the classifier's stride-4 corner values.
    small = model.classifier(out["decoder"])
    assert torch.allclose(out["logits"][..., 0, 0], small[..., 0, 0], atol=1e-5)
    assert torch.allclose(out["logits"][..., -1, -1], small[..., -1, -1], atol=1e-5)
    F.cross_entropy(out["logits"], torch.randint(0, 5, (2, size, size))).backward()
    first = model.backbone.conv1[0] if network != "mobilenet_v2" else model.backbone.features[0][0]
    for p in (first.weight, model.aspp.pool_conv.weight, model.decoder.reduce[0].weight, model.classifier.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("network", ["resnet101", "wide_resnet50_2"])
def test_teacher_deeplab_shapes(network):
    torch.manual_seed(0)
    model = build_segmentor(network, 21).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), return_features=True)
    assert out["logits"].shape == (1, 21, 32, 32) and out["decoder"].shape == (1, 256, 8, 8)
    assert [tuple(f.shape[1:]) for f in out["features"]] == [(256, 8, 8), (512, 4, 4), (1024, 2, 2), (2048, 2, 2)]
    assert torch.isfinite(out["logits"]).all()


def test_segmentor_presets_and_head():
    r18 = build_segmentor("resnet18", 21)
    assert r18.backbone.conv1[0].out_channels == 32 and r18.backbone.bn1.num_features == 64  # deep stem w=32
    assert r18.decoder.reduce[0].in_channels == 64 and r18.decoder.reduce[0].out_channels == 48
    assert r18.aspp.map_convs[0].in_channels == 512
    assert [c.dilation[0] for c in r18.aspp.map_convs] == [1, 6, 12, 18]
    assert r18.decoder.fuse[0].in_channels == 256 + 48 and r18.classifier.out_channels == 21
    assert torch.count_nonzero(r18.classifier.bias) == 0 and torch.all(r18.aspp.red_bn.weight == 1)
    mb = build_segmentor("mobilenet_v2", 19)
    assert mb.decoder.reduce[0].in_channels == 24 and mb.decoder.reduce[0].out_channels == 24
    assert mb.aspp.map_convs[0].in_channels == 320 and mb.decoder.fuse[0].in_channels == 280
    assert SEGMENTOR_PRESETS["resnet101"] == dict(backbone="resnet101", deep_stem=True, stem_width=64)
    assert SEGMENTOR_PRESETS["wide_resnet50_2"] == dict(backbone="wide_resnet50_2")
    # kaiming_normal fan_in: std = sqrt(2 / fan_in); fan_in of the 3x3 fuse conv = 304 * 9.
    w = r18.decoder.fuse[0].weight
    assert abs(w.std().item() - (2 / (304 * 9)) ** 0.5) < 0.02 * (2 / (304 * 9)) ** 0.5 + 1e-4
    with pytest.raises(ValueError, match="unknown network"):
        build_segmentor("resnet34", 21)


@pytest.mark.parametrize("name, block, blocks", [("resnet18", BasicBlock, 8), ("resnet101", Bottleneck, 33)])
def test_zero_init_residual_makes_every_block_the_identity(name, block, blocks):
    """Only the last BatchNorm scale of each block is zeroed; a block without downsample then returns its
    (non-negative, post-ReLU) input unchanged, and one with downsample returns relu(downsample(x))."""
    torch.manual_seed(0)
    net = create_backbone(name, deep_stem=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    zero_init_residual_(net)
    last_bn = "bn3" if block is Bottleneck else "bn2"
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == blocks and all(k.endswith(f"{last_bn}.weight") for k in changed)
    found = [m for m in net.modules() if isinstance(m, block)]
    assert len(found) == blocks
    for b in (found[1], found[0]):
        x = torch.relu(torch.randn(2, b.conv1.in_channels, 9, 9))
        with torch.no_grad():
            want = x if b.downsample is None else torch.relu(b.downsample(x))
            torch.testing.assert_close(b(x), want)


def test_pretrained_backbone_through_segmentor(tmp_path):
    torch.manual_seed(4)
    src = randomise(create_backbone("mobilenet_v2"))
    torch.save(src.state_dict(), tmp_path / "mbv2.pth")
    seg = DeepLabV3Plus("mobilenet_v2", 3, pretrained=str(tmp_path / "mbv2.pth"))
    assert torch.equal(seg.backbone.features[5].conv[0][0].weight, src.features[5].conv[0][0].weight)


def test_bf16_autocast_cpu():
    torch.manual_seed(0)
    # ResNet-18: on CPUs without native bf16 the grouped (depthwise) convs of MobileNet take a very slow path.
    model = build_segmentor("resnet18", 4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == ref.shape and low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_channels_last_matches():
    torch.manual_seed(0)
    model = build_segmentor("resnet18", 3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_onnx_export_matches():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_segmentor("mobilenet_v2", 3).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(1, 3, 64, 64), buf, dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}}, opset_version=17)
    x = torch.randn(1, 3, 96, 80)  # a different size than the export: sizes come from tensor shapes
    got = ort.InferenceSession(buf.getvalue()).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (1, 3, 96, 80) and abs(got - want).max() < 1e-3
