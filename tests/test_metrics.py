import math

import numpy as np
import pytest
import torch

from furnace.metrics import confusion_matrix, format_results, iou_per_class, mean_iou, pixel_accuracy


def _hand_example():
    # 4 classes; class 3 appears neither in the ground truth nor in the prediction -> absent (NaN).
    gt = torch.tensor([[0, 0, 1, 1, 255],
                       [0, 2, 2, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 3],     # the 3 sits on an ignored pixel: must not count
                         [2, 2, 2, 0, 0]])
    return pred, gt


def test_confusion_rows_are_ground_truth_and_ignore_is_skipped():
    pred, gt = _hand_example()
    conf = confusion_matrix(pred, gt, 4)
    expected = torch.tensor([[1, 1, 1, 0],   # gt 0: pred 0, 1, 2
                             [1, 2, 0, 0],   # gt 1: pred 1, 1, 0
                             [0, 0, 2, 0],   # gt 2: pred 2, 2
                             [0, 0, 0, 0]])
    assert conf.dtype == torch.int64
    assert torch.equal(conf, expected)
    assert int(conf.sum()) == 8  # 10 pixels, 2 ignored


def test_iou_by_hand_with_absent_class():
    pred, gt = _hand_example()
    conf = confusion_matrix(pred.numpy(), gt.numpy(), 4)  # numpy input works too
    iou = iou_per_class(conf)
    # class 0: TP 1, FP 1 (gt1->0), FN 2 -> 1/4; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: TP 2, FP 1, FN 0 -> 2/3
    np.testing.assert_allclose(iou[:3], [1 / 4, 2 / 4, 2 / 3])
    assert math.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx((1 / 4 + 1 / 2 + 2 / 3) / 3)
    assert pixel_accuracy(conf) == pytest.approx(5 / 8)
    table = format_results(conf, ["bg", "cat", "dog", "cow"])
    assert "absent" in table and "47.22" in table and "62.50" in table


def test_class_predicted_but_not_in_ground_truth_counts_as_zero():
    conf = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    np.testing.assert_allclose(iou_per_class(conf), [0.5, 0.0])


def test_confusion_accumulates_and_rejects_bad_labels():
    pred, gt = _hand_example()
    total = confusion_matrix(pred, gt, 4) + confusion_matrix(pred, gt, 4)
    assert int(total.sum()) == 16 and mean_iou(total) == pytest.approx(mean_iou(confusion_matrix(pred, gt, 4)))
    with pytest.raises(ValueError, match="label value 7"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3), 4)
