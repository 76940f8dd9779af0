"""Metric and loss values on tiny hand-computed masks."""
import math

import numpy as np
import pytest
import torch

from metrics import best_threshold_dice, per_case_scores, per_class_scores, segmentation_loss, summarize


def one(a):
    return np.array([a], dtype=np.uint8)


def test_partial_overlap_2x2():
    # pred 2 px, truth 3 px, overlap 2 px: Dice = 2*2/(2+3) = 0.8, IoU = 2/3
    s = per_case_scores(one([[1, 1], [0, 0]]), one([[1, 1], [1, 0]]))
    assert s["dice"][0] == pytest.approx(0.8)
    assert s["iou"][0] == pytest.approx(2 / 3)
    assert s["sensitivity"][0] == pytest.approx(2 / 3)
    assert s["precision"][0] == pytest.approx(1.0)


def test_perfect_and_disjoint():
    m = one([[0, 1], [1, 0]])
    s = per_case_scores(m, m)
    assert s["dice"][0] == s["iou"][0] == s["sensitivity"][0] == s["precision"][0] == 1.0
    s = per_case_scores(one([[1, 0], [0, 0]]), one([[0, 0], [0, 1]]))
    assert s["dice"][0] == s["iou"][0] == s["sensitivity"][0] == s["precision"][0] == 0.0


def test_empty_mask_rule():
    z = one([[0, 0], [0, 0]])
    s = per_case_scores(z, z)  # nothing to find, nothing claimed
    assert s["dice"][0] == 1.0 and s["iou"][0] == 1.0
    assert math.isnan(s["sensitivity"][0]) and math.isnan(s["precision"][0])
    s = per_case_scores(one([[1, 0], [0, 0]]), z)  # a false alarm on an empty image
    assert s["dice"][0] == 0.0 and s["iou"][0] == 0.0 and s["precision"][0] == 0.0
    s = per_case_scores(z, one([[1, 0], [0, 0]]))  # a missed structure scores 0, not smooth-inflated
    assert s["dice"][0] == 0.0 and s["sensitivity"][0] == 0.0 and math.isnan(s["precision"][0])


def test_scores_are_per_image_not_pooled():
    pred = np.zeros((2, 10, 10), np.uint8)
    truth = np.zeros((2, 10, 10), np.uint8)
    pred[0, :5] = truth[0, :5] = 1  # a big perfect lesion
    truth[1, 0, 0] = 1  # a 1-px lesion that is missed
    s = per_case_scores(pred, truth)
    assert s["dice"].tolist() == [1.0, 0.0]
    assert summarize(s)["dice"] == pytest.approx(0.5)  # pooled would be 100/101


def test_summarize_skips_undefined():
    s = summarize({"sensitivity": np.array([1.0, np.nan, 0.5])})
    assert s["sensitivity"] == pytest.approx(0.75) and s["sensitivity_n"] == 2


def test_torch_and_numpy_agree_and_shape_checked():
    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 2, (3, 5, 7)), rng.integers(0, 2, (3, 5, 7))
    a, b = per_case_scores(p, t), per_case_scores(torch.from_numpy(p), torch.from_numpy(t))
    assert np.allclose(a["dice"], b["dice"])
    with pytest.raises(ValueError, match="same shape"):
        per_case_scores(p, t[:, :4])


def test_per_class_scores():
    pred = np.array([[[0, 1], [2, 2]]])
    truth = np.array([[[0, 1], [2, 0]]])
    s = per_class_scores(pred, truth, [1, 2])
    assert s[1]["dice"][0] == 1.0
    assert s[2]["dice"][0] == pytest.approx(2 / 3)


def test_loss_low_for_confident_correct_logits_and_high_for_wrong():
    labels = torch.zeros(2, 8, 8, dtype=torch.uint8)
    labels[:, 2:5, 2:5] = 1
    good = (labels.float() * 2 - 1).unsqueeze(1) * 20
    assert segmentation_loss(good, labels) < 0.01
    assert segmentation_loss(-good, labels) > 1.5
    # multi-class: 3 classes
    lab3 = labels.long() + (torch.arange(8) > 5).long().view(1, 1, 8).expand(2, 8, 8) * 2
    onehot = torch.nn.functional.one_hot(lab3, 3).movedim(-1, 1).float() * 40 - 20
    assert segmentation_loss(onehot, lab3) < 0.01


def test_best_threshold_baseline():
    img = np.zeros((2, 8, 8), np.float32)
    truth = np.zeros((2, 8, 8), np.uint8)
    img[:, 2:4, 2:4] = 1.0
    truth[:, 2:4, 2:4] = 1
    dice, t, direction = best_threshold_dice(img, truth)
    assert dice == 1.0 and direction == ">" and 0 <= t < 1
    dice_inv, _, direction = best_threshold_dice(1 - img, truth)  # dark lesions: '<' wins
    assert dice_inv == 1.0 and direction == "<"
