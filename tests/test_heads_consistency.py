"""Entropy minimization, Pi model, Mean Teacher and outlier exposure heads: values, gradients,
teacher checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sesemi.models.heads.base import HeadContext, HeadInputs
from sesemi.models.heads.consistency import (
    EntropyMinimizationLossHead,
    MeanTeacherLossHead,
    OutlierExposureLossHead,
    PiModelLossHead,
)

NUM_CLASSES = 3
TEACHER_ERROR = r"learner.hparams.model.ema: \{decay: 0.999\}"


class TinyBackbone(nn.Module):
    """A linear "backbone" `(N, 4) -> (N, 3)` with the `out_features` heads expect."""

    def __init__(self, in_features: int = 4, out_features: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _student(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return TinyBackbone(), nn.Linear(3, NUM_CLASSES)


def _inputs(batch, backbone, head, teacher=None) -> HeadInputs:
    backbones = {"backbone": backbone}
    heads = {"supervised_head": head}
    if teacher is not None:
        backbones["teacher_backbone"], heads["teacher_supervised_head"] = teacher
    return HeadInputs(data={"unlabeled": batch}, backbones=backbones, heads=heads)


def _softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _logits_by_hand(x, backbone: TinyBackbone, head: nn.Linear) -> torch.Tensor:
    features = x @ backbone.linear.weight.T + backbone.linear.bias
    return features @ head.weight.T + head.bias


# --- Entropy minimization ---------------------------------------------------------------------


def test_entropy_of_uniform_predictions_is_log_num_classes():
    backbone, head = _student()
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)  # every logit 0: uniform
    x = torch.randn(5, 4)
    entropy = EntropyMinimizationLossHead("unlabeled")(
        _inputs((x, torch.full((5,), -1)), backbone, head)
    )
    assert entropy.shape == (5,)
    torch.testing.assert_close(entropy, torch.full((5,), math.log(NUM_CLASSES)))


def test_entropy_of_confident_predictions_is_near_zero_and_logs_pseudo_label_accuracy():
    backbone, head = _student()
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # class 1 with probability ~1
    x = torch.randn(4, 4)
    targets = torch.tensor([1, 1, 0, -1])  # -1 (unknown) is left out of the accuracy
    module = EntropyMinimizationLossHead("unlabeled")
    entropy = module(_inputs((x, targets), backbone, head))
    assert entropy.shape == (4,) and entropy.max() < 1e-12 and entropy.min() >= 0
    assert module.log_values["max_prob"] == pytest.approx(1.0)
    assert module.log_values["pseudo_label_top1"] == pytest.approx(2 / 3)


def test_entropy_gradient_reaches_the_backbone_and_lowers_the_entropy():
    backbone, head = _student()
    x = torch.randn(8, 4)
    module = EntropyMinimizationLossHead("unlabeled")
    inputs = _inputs((x, torch.zeros(8, dtype=torch.long)), backbone, head)
    before = module(inputs).mean()
    before.backward()
    assert backbone.linear.weight.grad is not None and backbone.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in [*backbone.parameters(), *head.parameters()]:
            p -= 0.1 * p.grad
    assert module(inputs).mean() < before


def test_entropy_head_refuses_a_two_view_batch():
    backbone, head = _student()
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="one view"):
        EntropyMinimizationLossHead("unlabeled")(_inputs(([x, x], torch.zeros(2)), backbone, head))


# --- Outlier exposure -------------------------------------------------------------------------


def _outlier_head(backbone, head):
    oe = OutlierExposureLossHead(input_data="unlabeled")
    oe.build(HeadContext({"backbone": backbone}, {"supervised_head": head}, NUM_CLASSES))
    return oe


def test_outlier_exposure_is_the_divergence_of_each_prediction_from_uniform():
    backbone, head = _student()
    x = torch.randn(5, 4)
    loss = _outlier_head(backbone, head)(_inputs((x, torch.full((5,), -1)), backbone, head))
    p = _softmax_by_hand(_logits_by_hand(x, backbone, head))
    # KL(u || p) = sum_c 1/K log((1/K) / p_c): the cross-entropy to uniform less log K.
    expected = (torch.log(1.0 / NUM_CLASSES / p) / NUM_CLASSES).sum(dim=1)
    torch.testing.assert_close(loss, expected)
    assert (loss > 0).all()
    # A classifier that predicts uniformly on every image (zero weights) gives exactly 0.
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    flat = _outlier_head(backbone, head)(_inputs((x, None), backbone, head))
    assert flat.abs().max().item() < 1e-6


def test_outlier_exposure_gradient_makes_the_classifier_less_sure_on_the_outliers():
    backbone, head = _student(1)
    x = torch.randn(8, 4) * 3
    oe = _outlier_head(backbone, head)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.5)
    first = oe(_inputs((x, None), backbone, head))
    before = oe.log_values["max_prob"].item()
    for _ in range(20):
        optimizer.zero_grad()
        oe(_inputs((x, None), backbone, head)).mean().backward()
        optimizer.step()
    after = oe(_inputs((x, None), backbone, head))
    assert after.mean() < first.mean() / 4
    assert oe.log_values["max_prob"].item() < before


# --- Pi model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_pi_model_identical_views_give_exactly_zero_and_different_views_more(loss):
    backbone, head = _student()
    backbone.eval(), head.eval()
    module = PiModelLossHead("unlabeled", loss=loss)
    x = torch.randn(6, 4)
    same = module(_inputs(([x, x], torch.zeros(6)), backbone, head))
    assert same.shape == (6,) and torch.equal(same, torch.zeros(6))
    different = module(_inputs(([x, x + torch.randn(6, 4)], torch.zeros(6)), backbone, head))
    assert (different > 0).all()


def test_pi_model_losses_equal_a_hand_computation():
    backbone, head = _student()
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    p1 = _softmax_by_hand(_logits_by_hand(x1, backbone, head))
    p2 = _softmax_by_hand(_logits_by_hand(x2, backbone, head))
    mse = PiModelLossHead("unlabeled", loss="mse")(_inputs(([x1, x2], None), backbone, head))
    # Summed over the classes, not divided by their number.
    torch.testing.assert_close(mse, ((p2 - p1) ** 2).sum(dim=1))
    kl = PiModelLossHead("unlabeled", loss="kl")(_inputs(([x1, x2], None), backbone, head))
    torch.testing.assert_close(kl, (p1 * (p1.log() - p2.log())).sum(dim=1))


@pytest.mark.parametrize("detach_target", [True, False])
def test_pi_model_target_view_gets_a_gradient_only_when_not_detached(detach_target):
    backbone, head = _student()
    x1 = torch.randn(4, 4, requires_grad=True)
    x2 = torch.randn(4, 4, requires_grad=True)
    module = PiModelLossHead("unlabeled", detach_target=detach_target)
    module(_inputs(([x1, x2], torch.zeros(4)), backbone, head)).sum().backward()
    assert x2.grad is not None and x2.grad.abs().sum() > 0
    assert (x1.grad is not None) == (not detach_target)


def test_pi_model_needs_two_views_and_a_known_loss():
    backbone, head = _student()
    with pytest.raises(ValueError, match="MultiView"):
        PiModelLossHead("unlabeled")(_inputs((torch.randn(2, 4), torch.zeros(2)), backbone, head))
    with pytest.raises(ValueError, match="mse, kl"):
        PiModelLossHead("unlabeled", loss="l1")


# --- Mean Teacher -----------------------------------------------------------------------------


def _teacher_of(backbone, head, perturb: bool = False):
    teacher = copy.deepcopy(backbone), copy.deepcopy(head)
    for module in teacher:
        module.requires_grad_(False)
        if perturb:
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.5 * torch.randn_like(p))
    return teacher


def test_mean_teacher_identical_views_and_weights_give_exactly_zero():
    backbone, head = _student()
    teacher = _teacher_of(backbone, head)
    for module in (backbone, head, *teacher):
        module.eval()
    module = MeanTeacherLossHead("unlabeled")
    x = torch.randn(6, 4)
    same = module(_inputs(([x, x], torch.zeros(6)), backbone, head, teacher))
    assert same.shape == (6,) and torch.equal(same, torch.zeros(6))
    different = module(_inputs(([x, x + torch.randn(6, 4)], None), backbone, head, teacher))
    assert (different > 0).all()


def test_mean_teacher_loss_is_student_on_view_2_vs_teacher_on_view_1_and_only_student_learns():
    backbone, head = _student()
    teacher = _teacher_of(backbone, head, perturb=True)
    teacher[0].requires_grad_(True), teacher[1].requires_grad_(True)  # no_grad must stop them
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    targets = torch.tensor([0, 1, 2, 0, -1])
    module = MeanTeacherLossHead("unlabeled")
    losses = module(_inputs(([x1, x2], targets), backbone, head, teacher))
    p_teacher = _softmax_by_hand(_logits_by_hand(x1, *teacher))
    p_student = _softmax_by_hand(_logits_by_hand(x2, backbone, head))
    torch.testing.assert_close(losses, ((p_student - p_teacher) ** 2).sum(dim=1))
    losses.mean().backward()
    assert all(p.grad is None for t in teacher for p in t.parameters())
    assert all(p.grad is not None for p in [*backbone.parameters(), *head.parameters()])
    expected_top1 = (p_teacher.argmax(1)[:4] == targets[:4]).float().mean()
    assert module.log_values["teacher_pseudo_label_top1"] == pytest.approx(expected_top1.item())


def test_mean_teacher_build_without_a_teacher_says_how_to_add_one():
    backbone, head = _student()
    context = HeadContext({"backbone": backbone}, {"supervised_head": head}, NUM_CLASSES)
    message = f"MeanTeacherLossHead reads the backbone 'teacher_backbone'.*{TEACHER_ERROR}"
    with pytest.raises(ValueError, match=message):
        MeanTeacherLossHead("unlabeled").build(context)
    teacher = _teacher_of(backbone, head)
    context = HeadContext(
        {"backbone": backbone, "teacher_backbone": teacher[0]},
        {"supervised_head": head, "teacher_supervised_head": teacher[1]},
        NUM_CLASSES,
    )
    MeanTeacherLossHead("unlabeled").build(context)
    with pytest.raises(ValueError, match="reads the head 'ema_head'.*learner.hparams.model.ema"):
        MeanTeacherLossHead("unlabeled", teacher_head="ema_head").build(context)


@pytest.mark.parametrize("head_type", [EntropyMinimizationLossHead, PiModelLossHead])
def test_student_only_heads_need_no_teacher(head_type):
    backbone, head = _student()
    head_type("unlabeled").build(
        HeadContext({"backbone": backbone}, {"supervised_head": head}, NUM_CLASSES)
    )
    with pytest.raises(ValueError, match="reads the head 'classifier'"):
        head_type("unlabeled", input_head="classifier").build(
            HeadContext({"backbone": backbone}, {"supervised_head": head}, NUM_CLASSES)
        )
