"""furnace.teachers.FrozenTeacher and fold_batchnorm: a frozen teacher predicts what the network does."""
import copy

import torch

from furnace.models import build_segmentor
from furnace.teachers import FrozenTeacher, fold_batchnorm
from trainkit import random_bn


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> bool:
    return torch.allclose(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def test_fold_batchnorm_reproduces_the_teacher_in_both_memory_formats():
    torch.manual_seed(0)
    teacher = random_bn(build_segmentor("resnet18", 7)).eval().requires_grad_(False)
    x = torch.randn(3, 3, 45, 61)  # another size than fold_batchnorm's own check input
    with torch.no_grad():
        want = teacher(x, return_features=True)
    for channels_last in (False, True):
        folded = fold_batchnorm(teacher, channels_last)
        assert folded is not None
        n_bn = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) for net in (teacher, folded)]
        assert n_bn[1] <= 2 < n_bn[0]  # only ASPP's BNs after a concatenation / a sum stay
        with torch.no_grad():
            got = folded(x, True)
        for key in ("logits", "decoder"):
            assert close(got[key], want[key]), (channels_last, key)


def test_frozen_teacher_predicts_with_and_without_decoder():
    torch.manual_seed(0)
    teacher = random_bn(build_segmentor("resnet18", 7)).eval().requires_grad_(False)
    x = torch.randn(3, 3, 45, 61)
    with torch.no_grad():
        want = teacher(x, return_features=True)
    for channels_last in (False, True):
        frozen = FrozenTeacher(teacher, channels_last=channels_last)
        assert frozen.folded is not None and frozen.precision == "fp32" and frozen.evaluated is teacher
        logits, decoder = frozen.predict(x, with_decoder=True)
        assert logits.shape == (3, 7, 45, 61) and decoder.shape == want["decoder"].shape
        assert close(logits, want["logits"]) and close(decoder, want["decoder"])
        assert (logits.argmax(1) == want["logits"].argmax(1)).float().mean() > 0.999
        assert not logits.requires_grad and logits.dtype == torch.float32
        logits, nothing = frozen.predict(x)
        assert nothing is None and close(logits, want["logits"])
    # several inputs: one call per input (separate) or one on their concatenation, the same predictions
    views = {"a": x[:1], "b": x[1:]}
    sep, sep_feat = frozen.predict_views(views, separate=True, with_decoder=True)
    joint, joint_feat = frozen.predict_views(views, separate=False, with_decoder=True)
    for k in views:
        assert close(sep[k], joint[k]) and close(sep_feat[k], joint_feat[k])
    assert frozen.predict_views(views, separate=True, with_decoder=False)[1] is None


def test_frozen_train_mode_teacher_is_not_folded_and_predicts_as_the_network():
    """teacher_bn='train' (batch statistics): nothing to fold; predict is the network's own call, no autograd."""
    torch.manual_seed(0)
    teacher = random_bn(build_segmentor("mobilenet_v2", 4)).train().requires_grad_(False)
    reference = copy.deepcopy(teacher)
    frozen = FrozenTeacher(teacher)
    assert frozen.folded is None
    x = torch.randn(2, 3, 33, 33)
    logits, feature = frozen.predict(x, with_decoder=True)
    with torch.no_grad():
        want = reference(x, return_features=True)
    assert close(logits, want["logits"], 1e-5) and close(feature, want["decoder"], 1e-5)
    assert logits.grad_fn is None and feature.grad_fn is None
