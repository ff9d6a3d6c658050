"""Confusion matrix, mIoU and multi-label F1 against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from afa.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    format_scores,
    multilabel_f1,
    segmentation_scores,
)

# Two images, 4 classes; class 3 occurs in neither prediction nor ground truth. 255 = ignore (the
# predictions under it, 2 and 0, must not count).
GT_1 = np.array([[0, 0, 1, 1], [0, 255, 1, 2]])
PRED_1 = np.array([[0, 1, 1, 1], [0, 2, 2, 2]])
GT_2 = np.array([[2, 2, 255], [0, 1, 2], [1, 1, 1]])
PRED_2 = np.array([[2, 0, 0], [0, 1, 1], [1, 1, 1]])
# Rows = ground truth, columns = prediction, counted pixel by pixel.
EXPECTED = np.array(
    [
        [3, 1, 0, 0],
        [0, 6, 1, 0],
        [1, 1, 2, 0],
        [0, 0, 0, 0],
    ]
)
# IoU = TP / (gt + pred - TP): 3/(4+4-3), 6/(7+8-6), 2/(4+3-2); class 3 has union 0 -> excluded.
EXPECTED_IOU = [3 / 5, 6 / 9, 2 / 5]
EXPECTED_MIOU = sum(EXPECTED_IOU) / 3  # 0.5556, not 0.4167 (absent class as 0) or 0.6667 (as 1)
EXPECTED_PIXEL_ACC = 11 / 15
EXPECTED_MEAN_ACC = (3 / 4 + 6 / 7 + 2 / 4) / 3
# Precision = TP / pixels predicted as the class (the columns): 3/4, 6/8, 2/3; class 3 never
# predicted -> nan.
EXPECTED_PRECISION = [3 / 4, 6 / 8, 2 / 3]


def test_confusion_matrix_by_hand():
    total = confusion_matrix(PRED_1, GT_1, 4) + confusion_matrix(torch.tensor(PRED_2), GT_2, 4)
    assert total.dtype == torch.int64
    np.testing.assert_array_equal(total.numpy(), EXPECTED)


def test_scores_by_hand_exclude_absent_class():
    scores = segmentation_scores(EXPECTED, class_names=["a", "b", "c", "d"])
    np.testing.assert_allclose(scores.iou[:3], EXPECTED_IOU)
    assert math.isnan(scores.iou[3]) and math.isnan(scores.acc[3])
    np.testing.assert_allclose(scores.precision[:3], EXPECTED_PRECISION)
    assert math.isnan(scores.precision[3])
    assert scores.miou == pytest.approx(EXPECTED_MIOU)
    assert scores.pixel_acc == pytest.approx(EXPECTED_PIXEL_ACC)
    assert scores.mean_acc == pytest.approx(EXPECTED_MEAN_ACC)
    assert scores.num_pixels == 15
    as_dict = scores.to_dict()
    assert as_dict["iou_per_class"]["d"] is None
    assert as_dict["iou_per_class"]["b"] == pytest.approx(6 / 9)
    assert as_dict["precision"][1] == pytest.approx(0.75) and as_dict["precision"][3] is None
    table = format_scores(scores)
    assert "55.56" in table and "73.33" in table
    header, row_c = table.splitlines()[0].split(), table.splitlines()[3].split()
    assert header[-3:] == ["IoU", "precision", "recall"]
    assert row_c == ["c", "40.00", "66.67", "50.00"]  # IoU 2/5, precision 2/3, recall 2/4


def test_accumulator_and_rank_reduction():
    cm = ConfusionMatrix(4)
    cm.update(PRED_1, GT_1)
    cm.update(torch.tensor(PRED_2), torch.tensor(GT_2))
    np.testing.assert_array_equal(cm.matrix.numpy(), EXPECTED)
    # Two ranks holding the same counts: an all-reduce doubles the matrix, scores stay the same.
    cm.reduce_(lambda matrix: matrix.mul_(2))
    np.testing.assert_array_equal(cm.matrix.numpy(), 2 * EXPECTED)
    assert cm.compute().miou == pytest.approx(EXPECTED_MIOU)
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_batched_input_equals_per_image():
    pred = torch.randint(0, 5, (3, 7, 9))
    gt = torch.randint(0, 5, (3, 7, 9))
    gt[:, 0] = 255
    per_image = sum(confusion_matrix(p, g, 5) for p, g in zip(pred, gt))
    assert torch.equal(confusion_matrix(pred, gt, 5), per_image)
    assert int(per_image.sum()) == 3 * 6 * 9


@pytest.mark.parametrize(
    "pred, gt, bad",
    [
        (np.array([[0, 1]]), np.array([[0, 7]]), "7"),  # ground truth out of range
        (np.array([[0, 4]]), np.array([[0, 1]]), "4"),  # prediction out of range
        (np.array([[0, 255]]), np.array([[0, 1]]), "255"),  # 255 is not a prediction
        (np.array([[-1, 0]]), np.array([[0, 1]]), "-1"),
    ],
)
def test_out_of_range_labels_are_named(pred, gt, bad):
    with pytest.raises(ValueError, match=rf"\[{bad}\]"):
        confusion_matrix(pred, gt, 4)


def test_float_labels_rejected():
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64), 4)


def test_multilabel_f1_by_hand():
    logits = torch.tensor([[1.0, -1.0, 2.0, -3.0], [-1.0, -1.0, -1.0, -1.0], [0.0, 5.0, 0.0, 0.0]])
    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    # image 0: TP 1 (class 0), FP 1 (class 2), FN 1 (class 3) -> 2/4; image 1: nothing -> 1;
    # image 2: logit 0 is negative -> TP 1, FN 1 -> 2/3.
    per_image = multilabel_f1(logits, labels, reduction="none")
    torch.testing.assert_close(per_image, torch.tensor([0.5, 1.0, 2 / 3]))
    assert float(multilabel_f1(logits, labels)) == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert float(multilabel_f1(logits, labels, reduction="sum")) == pytest.approx(0.5 + 1 + 2 / 3)
