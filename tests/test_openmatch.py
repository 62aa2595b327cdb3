"""OpenMatch's one-vs-all terms against their formulas on hand-made outputs, its head's mask,
warm-up and total on a stub network, and its checkpoint's `ova` unknown score in `predict`."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, open_sesemi
from PIL import Image
from torch import nn

import sesemi
from sesemi.inference import load_trained_model, predict, unknown_score
from sesemi.models.heads.base import HeadContext, HeadInputs
from sesemi.models.heads.openmatch import (
    OpenMatchLossHead,
    inlier_score,
    ova_entropy,
    ova_loss,
    ova_probabilities,
    soft_consistency,
)

# Two images, three classes: [:, 0] outlier, [:, 1] inlier probabilities per class.
INLIER = torch.tensor([[0.9, 0.3, 0.6], [0.2, 0.1, 0.8]])
PROBS = torch.stack([1 - INLIER, INLIER], dim=1)


def test_ova_probabilities_pair_each_class_outlier_and_inlier_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 0.0]])  # outlier logits, then inlier ones
    probs = ova_probabilities(logits)
    assert probs.shape == (1, 2, 3)
    expected_inlier = torch.sigmoid(torch.tensor([0.0, -1.0, -2.0]))
    torch.testing.assert_close(probs[0, 1], expected_inlier)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 3))


def test_ova_loss_is_the_class_inlier_term_plus_the_hardest_negative():
    losses = ova_loss(PROBS, torch.tensor([0, 2]))
    # Image 0, class 0: -log 0.9, hardest negative: class 2 (inlier 0.6, outlier 0.4).
    # Image 1, class 2: -log 0.8, hardest negative: class 0 (outlier 0.8 < class 1's 0.9).
    expected = [-math.log(0.9) - math.log(0.4), -math.log(0.8) - math.log(0.8)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_ova_entropy_and_soft_consistency_match_their_formulas():
    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    expected = [sum(h(p) for p in row) / 3 for row in INLIER.tolist()]
    assert ova_entropy(PROBS).tolist() == pytest.approx(expected, abs=1e-6)
    other = torch.stack([1 - INLIER.flip(1), INLIER.flip(1)], dim=1)
    # Both outcomes move by the same amount: 2 * sum_k (inlier_k - inlier'_k)^2.
    expected = (2 * (INLIER - INLIER.flip(1)).pow(2).sum(dim=1)).tolist()
    assert soft_consistency(PROBS, other).tolist() == pytest.approx(expected, abs=1e-6)
    assert inlier_score(PROBS, torch.tensor([1, 2])).tolist() == pytest.approx([0.3, 0.8])


class Identity(nn.Identity):
    out_features = 3


def _head_and_inputs(step: int, fixmatch_start: int = 0):
    head = OpenMatchLossHead(
        "unlabeled", threshold=0.6, inlier_threshold=0.5, lambda_em=0.1, lambda_socr=0.5,
        fixmatch_start=fixmatch_start,
    )  # fmt: skip
    backbones, heads = {"backbone": Identity()}, {"supervised_head": nn.Identity()}
    head.build(HeadContext(backbones, heads, 3, {"unlabeled": 10}))
    with torch.no_grad():  # OVA: outlier logits 0, inlier logits = features * (2, -2, 2)
        head.ova.weight.zero_()
        head.ova.bias.zero_()
        head.ova.weight[3:] = torch.diag(torch.tensor([2.0, -2.0, 2.0]))
    # Features are the images: logits of three unlabeled images in each view.
    weak_1 = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.2, 0.0, 0.1]])
    weak_2 = weak_1 + 0.1
    strong = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labeled = torch.tensor([[1.0, 0.0, -1.0]])
    data = {
        "unlabeled": [[weak_1, weak_2, strong], torch.tensor([0, 2, -1])],
        "supervised": [labeled, torch.tensor([0])],
    }
    inputs = HeadInputs(data, backbones, heads, {"supervised_backbone": labeled}, step)
    return head, inputs, (weak_1, weak_2, strong, labeled)


def test_openmatch_head_sums_its_terms_and_masks_confident_inliers_only():
    head, inputs, (weak_1, weak_2, strong, labeled) = _head_and_inputs(step=5)
    loss = head(inputs)
    ova = ova_probabilities(head.ova(torch.cat([weak_1, weak_2])))
    probs = weak_1.softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    inliers = inlier_score(ova[:3], labels) >= 0.5
    mask = ((confidence >= 0.6) & inliers).float()
    # Image 0 is a confident inlier; image 1 is confident, but class 1's OVA calls it an
    # outlier; image 2 is an inlier (p_inlier 0.6) without confidence.
    assert inliers.tolist() == [True, False, True] and confidence[1] > 0.6 > confidence[2]
    assert mask.tolist() == [1.0, 0.0, 0.0]
    fixmatch = (mask * F.cross_entropy(strong, labels, reduction="none")).mean()
    expected = (
        ova_loss(ova_probabilities(head.ova(labeled)), torch.tensor([0])).mean()
        + 0.1 * ova_entropy(ova).mean()
        + 0.5 * soft_consistency(ova[:3], ova[3:]).mean()
        + fixmatch
    )
    torch.testing.assert_close(loss, expected)
    assert head.log_values["mask_rate"].item() == pytest.approx(1 / 3)
    assert head.log_values["inlier_rate"].item() == pytest.approx(2 / 3)
    assert head.log_values["pseudo_label_acc"].item() == 1.0
    loss.backward()
    assert head.ova.weight.grad is not None and head.ova.weight.grad.abs().sum() > 0


def test_openmatch_fixmatch_term_waits_for_its_start_step():
    head, inputs, _ = _head_and_inputs(step=5, fixmatch_start=10)
    head(inputs)
    assert head.log_values["mask_rate"].item() == 0.0
    assert head.log_values["inlier_rate"].item() > 0  # the OVA still scores the batch


def test_openmatch_needs_three_views_and_sane_arguments():
    head, inputs, (weak_1, weak_2, _, _) = _head_and_inputs(step=0)
    inputs.data["unlabeled"][0] = [weak_1, weak_2]
    with pytest.raises(ValueError, match="three views"):
        head(inputs)
    with pytest.raises(ValueError, match="inlier_threshold must be in"):
        OpenMatchLossHead("unlabeled", inlier_threshold=2.0)


def test_an_openmatch_checkpoint_gives_predict_the_ova_unknown_score(
    digits_root, tmp_path, one_thread
):
    overrides = ["method=openmatch", f"run.data_root={digits_root}", f"run.dir={tmp_path}/runs"]
    result = sesemi.fit(sesemi.compose("demo", [*overrides, *FAST]))
    checkpoint = result.last_checkpoint
    model = load_trained_model(checkpoint)
    assert model.ova is not None and model.ova.out_features == 20  # 10 classes x 2
    files = sorted(str(p) for p in (digits_root / "val").glob("*/*.png"))[:5]
    expected = {}
    with torch.no_grad():
        for f in files:
            image = model.transform()(Image.open(f).convert("RGB")).unsqueeze(0)
            features = model.net.backbone(image)
            predicted = model.net.supervised_head(features).argmax(dim=1)
            inliers = ova_probabilities(model.ova(features))[:, 1]
            expected[f] = 1 - inliers[0, predicted[0]].item()
    for p in predict(model, files):
        assert unknown_score(p.probabilities, "ova", p.inliers).item() == pytest.approx(
            expected[p.file], abs=1e-5
        )
    out = tmp_path / "predictions.csv"
    run = open_sesemi("predict", str(checkpoint), *files, "-o", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with open(out, newline="") as f:
        for row in csv.DictReader(f):  # the default (auto) score of an OpenMatch model is ova
            assert float(row["unknown"]) == pytest.approx(expected[row["file"]], abs=1e-5)
