"""ABC (`method=abc`): the class-balanced classifier's masks and loss against their formulas, the
features it shares with the FixMatch head, and the learner predicting with it in evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import IdentityFeatures as Features
from torch import nn

from sesemi.models.heads.abc import (
    ABCLossHead,
    keep_probabilities,
    unlabeled_keep_probabilities,
)
from sesemi.models.heads.base import HeadContext, HeadInputs, views_key
from sesemi.models.heads.fixmatch import FixMatchLossHead


def _modules():
    balanced = nn.Linear(3, 3)
    with torch.no_grad():  # logits = 2 * features, rolled by one class: distinct from the base's
        balanced.weight.copy_(2 * torch.roll(torch.eye(3), 1, dims=0))
        balanced.bias.zero_()
    return {"backbone": Features()}, {"supervised_head": nn.Identity(), "balanced_head": balanced}


def _head(counts=(4, 4, 4), total_steps=100, threshold=0.95) -> tuple[ABCLossHead, dict, dict]:
    backbones, heads = _modules()
    head = ABCLossHead("unlabeled", total_steps=total_steps, threshold=threshold)
    head.build(HeadContext(backbones, heads, 3, class_counts={"supervised": counts}))
    return head, backbones, heads


def _inputs(backbones, heads, weak, strong, labeled=None, labels=None, step=0, cache=True):
    data = {"unlabeled": [[weak, strong], torch.full((len(weak),), -1)]}
    features = {}
    if labeled is not None:
        data["supervised"] = [labeled, labels]
        features["supervised_backbone"] = backbones["backbone"](labeled)
    if cache:
        features[views_key("unlabeled")] = (weak, backbones["backbone"](strong))
    return HeadInputs(data, backbones, heads, features, step)


def test_keep_probabilities_are_the_fewest_labeled_images_over_each_class():
    keep = keep_probabilities(torch.tensor([10, 5, 2, 0]))
    torch.testing.assert_close(keep, torch.tensor([0.2, 0.4, 1.0, 1.0]))  # no images: kept
    with pytest.raises(ValueError, match="needs labeled images"):
        keep_probabilities(torch.zeros(3))


@pytest.mark.parametrize("progress, expected", [(0.0, 1.0), (0.25, 0.8), (1.0, 0.2), (2.0, 0.2)])
def test_unlabeled_keep_probability_falls_from_one_to_the_labeled_one(progress, expected):
    found = unlabeled_keep_probabilities(torch.tensor([0.2, 1.0]), progress)
    torch.testing.assert_close(found, torch.tensor([expected, 1.0]))


def test_loss_is_the_balanced_classifiers_masked_pseudo_label_and_labeled_cross_entropy():
    # Balanced counts: every Bernoulli draw keeps (p = 1), so the loss is exact.
    head, backbones, heads = _head()
    weak = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 4.0]])
    strong = torch.randn(3, 3)
    labeled, labels = torch.randn(2, 3), torch.tensor([0, 2])
    inputs = _inputs(backbones, heads, weak, strong, labeled, labels)
    losses = head(inputs)
    balanced = heads["balanced_head"]
    with torch.no_grad():
        probs = balanced(weak).softmax(dim=1)  # the balanced head's, not supervised_head's
    confident = (probs.max(dim=1).values >= 0.95).float()
    assert confident.tolist() == [1.0, 0.0, 1.0]
    pseudo = probs.argmax(dim=1)
    assert pseudo.tolist() == [1, 2, 0]  # the rolled head: class 0 -> 1, 2 -> 0
    expected = confident * F.cross_entropy(balanced(strong), pseudo, reduction="none")
    expected = expected + F.cross_entropy(balanced(labeled), labels)
    torch.testing.assert_close(losses, expected)
    assert head.log_values["labeled_kept"] == 1.0
    assert head.log_values["mask_rate"].item() == pytest.approx(2 / 3)
    # Gradients reach the balanced head and the shared backbone.
    losses.mean().backward()
    assert balanced.weight.grad is not None and backbones["backbone"].weight.grad is not None


def test_without_the_fixmatch_heads_features_it_runs_both_views_itself():
    head, backbones, heads = _head()
    weak, strong = torch.randn(4, 3) * 3, torch.randn(4, 3)
    shared = head(_inputs(backbones, heads, weak, strong))
    own = head(_inputs(backbones, heads, weak, strong, cache=False))
    torch.testing.assert_close(own, shared)


def test_labeled_images_count_with_probability_fewest_over_their_class():
    torch.manual_seed(0)
    head, backbones, heads = _head(counts=(8, 2, 4))
    labels = torch.tensor([0, 1, 2]).repeat(4000)
    labeled = torch.randn(len(labels), 3)
    unlabeled = torch.zeros(2, 3)
    kept = []
    for cls in range(3):
        mask = labels == cls
        head(_inputs(backbones, heads, unlabeled, unlabeled, labeled[mask], labels[mask]))
        kept.append(head.log_values["labeled_kept"].item())
    assert kept == pytest.approx([0.25, 1.0, 0.5], abs=0.03)


@pytest.mark.parametrize("step, expected", [(0, 1.0), (50, 0.625), (100, 0.25)])
def test_unlabeled_mask_keeps_a_pseudo_class_with_the_decaying_probability(step, expected):
    torch.manual_seed(0)
    head, backbones, heads = _head(counts=(8, 2, 4), total_steps=100)
    # Confident weak views whose balanced pseudo-label is class 0 (rolled: features of class 2).
    weak = torch.tensor([[0.0, 0.0, 9.0]]).repeat(4000, 1)
    head(_inputs(backbones, heads, weak, torch.randn(4000, 3), step=step))
    assert head.log_values["confidence"].item() > 0.95
    assert head.log_values["mask_rate"].item() == pytest.approx(expected, abs=0.03)


def test_fixmatch_leaves_the_students_features_of_both_views_for_abc():
    backbones, heads = _modules()
    fixmatch = FixMatchLossHead("unlabeled")
    fixmatch.build(HeadContext(backbones, {"supervised_head": heads["supervised_head"]}, 3))
    weak, strong = torch.randn(4, 3), torch.randn(4, 3)
    inputs = HeadInputs({"unlabeled": [[weak, strong], torch.full((4,), -1)]}, backbones, heads)
    fixmatch(inputs)
    cached_weak, cached_strong = inputs.features[views_key("unlabeled")]
    torch.testing.assert_close(cached_weak, weak)
    torch.testing.assert_close(cached_strong, strong)
    assert cached_strong.requires_grad and not cached_weak.requires_grad


def test_a_missing_balanced_head_or_class_counts_are_clear_errors():
    backbones, heads = _modules()
    head = ABCLossHead("unlabeled", total_steps=10)
    with pytest.raises(ValueError, match="balanced_head: true"):
        head.build(HeadContext(backbones, {"supervised_head": nn.Identity()}, 3))
    head.build(HeadContext(backbones, heads, 3))  # evaluation: no counts needed
    with pytest.raises(ValueError, match="labeled image folder"):
        head(_inputs(backbones, heads, torch.zeros(2, 3), torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="has 4 classes"):
        head.build(HeadContext(backbones, heads, 3, class_counts={"supervised": (1, 1, 1, 1)}))
    for bad in ({"threshold": 1.5}, {"total_steps": 0}):
        with pytest.raises(ValueError):
            ABCLossHead("unlabeled", **{"total_steps": 10, **bad})
