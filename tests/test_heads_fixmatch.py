"""FixMatch and FlexMatch heads and threshold policies: masks, losses, gradients, teachers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sesemi.models.heads.base import HeadContext, HeadInputs
from sesemi.models.heads.fixmatch import FixMatchLossHead, FlexMatchLossHead
from sesemi.models.heads.thresholds import (
    FixedThreshold,
    FlexMatchThreshold,
    ThresholdPolicy,
    convex_mapping,
)


class Scale(nn.Module):
    """A stub backbone or head: `x * weight`, so inputs are the logits (weight 1) or their
    negation (weight -1), with a parameter for gradients to reach."""

    def __init__(self, weight: float = 1.0, out_features: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.out_features = out_features

    def forward(self, x):
        return x * self.weight


class Roll(nn.Module):
    """A stub teacher that predicts the class after the student's: logits rolled by one."""

    def forward(self, x):
        return torch.roll(x, 1, dims=1)


def _modules(teacher: bool = False, num_classes: int = 3):
    backbones = {"backbone": Scale(1.0, num_classes)}
    heads = {"supervised_head": nn.Identity()}
    if teacher:
        backbones["teacher_backbone"] = Roll()
        heads["teacher_supervised_head"] = nn.Identity()
    return backbones, heads


def _context(teacher: bool = False, num_classes: int = 3, sizes=None) -> HeadContext:
    backbones, heads = _modules(teacher, num_classes)
    return HeadContext(backbones, heads, num_classes, {"unlabeled": 100, **(sizes or {})})


def _run(head, weak, strong, targets=None, indices=None, teacher=False):
    backbones, heads = _modules(teacher, weak.shape[1])
    head.build(HeadContext(backbones, heads, weak.shape[1], {"unlabeled": 100}))
    targets = torch.full((len(weak),), -1) if targets is None else targets
    batch = [[weak, strong], targets] + ([indices] if indices is not None else [])
    return head(HeadInputs(data={"unlabeled": batch}, backbones=backbones, heads=heads))


def _logits_with_max_prob(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_mask_keeps_exactly_the_confident_samples_at_and_above_the_threshold():
    weak = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.1, 0.0, 0.0], [1.9, 0.0, 0.0]])
    threshold = F.softmax(weak[0], dim=0).max().item()  # rows 0 and 1 sit exactly on it
    strong = torch.randn(4, 3)
    head = FixMatchLossHead("unlabeled", threshold=threshold)
    losses = _run(head, weak, strong)
    ce = F.cross_entropy(strong, torch.zeros(4, dtype=torch.long), reduction="none")
    expected_mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # equal, equal, above, below
    assert torch.equal(losses, expected_mask * ce)
    assert losses[3] == 0.0 and (losses[:3] > 0).all()
    assert head.log_values["mask_rate"].item() == pytest.approx(0.75)


def test_loss_is_the_mean_over_the_whole_unlabeled_batch():
    weak = _logits_with_max_prob([[0.98, 0.01, 0.01], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98]])
    strong = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 2.0]])
    losses = _run(FixMatchLossHead("unlabeled", threshold=0.95), weak, strong)
    ce_0 = -F.log_softmax(strong[0], 0)[0]
    ce_2 = -F.log_softmax(strong[2], 0)[2]
    reduced = losses.mean()  # the learner's default reduction
    assert reduced.item() == pytest.approx(((ce_0 + 0.0 + ce_2) / 3).item())  # not / 2


@pytest.mark.parametrize("joint_forward", [False, True])
def test_no_gradient_flows_through_the_weak_view(joint_forward):
    weak = _logits_with_max_prob([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]]).requires_grad_()
    strong = torch.randn(2, 3, requires_grad=True)
    backbones, heads = _modules()
    head = FixMatchLossHead("unlabeled", joint_forward=joint_forward)
    head.build(HeadContext(backbones, heads, 3))
    data = {"unlabeled": [[weak, strong], torch.tensor([0, 1])]}
    losses = head(HeadInputs(data=data, backbones=backbones, heads=heads))
    losses.mean().backward()
    assert weak.grad is None or not weak.grad.any()
    assert strong.grad is not None and strong.grad.abs().sum() > 0
    # Pseudo-labels are fixed targets: the loss is CE(strong, argmax weak) exactly.
    expected = F.cross_entropy(strong.detach(), torch.tensor([0, 1]), reduction="none")
    assert torch.allclose(losses.detach(), expected)


def test_ema_teacher_gives_the_pseudo_labels():
    # The stub teacher predicts the class after the student's, as confidently.
    weak = _logits_with_max_prob([[0.01, 0.01, 0.98], [0.98, 0.01, 0.01], [0.5, 0.3, 0.2]])
    strong = torch.randn(3, 3)
    head = FixMatchLossHead("unlabeled", threshold=0.95, teacher="ema")
    losses = _run(head, weak, strong, targets=torch.tensor([0, 1, 2]), teacher=True)
    teacher_ce = F.cross_entropy(strong, torch.tensor([0, 1, 1]), reduction="none")
    assert torch.allclose(losses, torch.tensor([1.0, 1.0, 0.0]) * teacher_ce)
    assert head.log_values["pseudo_label_acc"].item() == 1.0  # the teacher's labels are scored
    student = FixMatchLossHead("unlabeled", threshold=0.95)
    losses = _run(student, weak, strong, targets=torch.tensor([0, 1, 2]))
    student_ce = F.cross_entropy(strong, torch.tensor([2, 0, 0]), reduction="none")
    assert torch.allclose(losses, torch.tensor([1.0, 1.0, 0.0]) * student_ce)
    assert student.log_values["pseudo_label_acc"].item() == 0.0


def test_ema_teacher_without_ema_is_a_clear_error():
    with pytest.raises(ValueError, match="learner.hparams.model.ema.*teacher=student"):
        FixMatchLossHead("unlabeled", teacher="ema").build(_context(teacher=False))
    FixMatchLossHead("unlabeled").build(_context(teacher=False))  # the student needs none


def test_mask_rate_and_pseudo_label_accuracy():
    weak = _logits_with_max_prob(
        [[0.97, 0.02, 0.01], [0.01, 0.97, 0.02], [0.02, 0.01, 0.97], [0.4, 0.3, 0.3]]
    )
    head = FixMatchLossHead("unlabeled", threshold=0.95)
    # Masked: rows 0-2; known targets among them: rows 0 (right) and 1 (wrong); row 3 is masked
    # out, so its (right) target does not count.
    _run(head, weak, torch.randn(4, 3), targets=torch.tensor([0, 2, -1, 0]))
    assert head.log_values["mask_rate"].item() == pytest.approx(0.75)
    assert head.log_values["pseudo_label_acc"].item() == pytest.approx(0.5)
    _run(head, weak, torch.randn(4, 3), targets=torch.tensor([-1, -1, -1, 0]))
    assert "pseudo_label_acc" not in head.log_values  # no masked sample has a known target


def test_temperature_changes_the_mask_not_the_pseudo_label():
    weak = _logits_with_max_prob([[0.9, 0.05, 0.05]])
    strong = torch.zeros(1, 3)
    assert _run(FixMatchLossHead("unlabeled", threshold=0.95), weak, strong).item() == 0
    sharp = FixMatchLossHead("unlabeled", threshold=0.95, temperature=0.5)
    assert _run(sharp, weak, strong).item() == pytest.approx(math.log(3))


def test_bad_batches_and_arguments_are_clear_errors():
    backbones, heads = _modules()
    head = FixMatchLossHead("unlabeled")
    data = {"unlabeled": [torch.zeros(2, 3), torch.zeros(2)]}
    with pytest.raises(ValueError, match="MultiView"):
        head(HeadInputs(data=data, backbones=backbones, heads=heads))
    with pytest.raises(ValueError, match="teacher"):
        FixMatchLossHead("unlabeled", teacher="mean")
    with pytest.raises(ValueError, match="threshold"):
        FixMatchLossHead("unlabeled", threshold=1.5)
    with pytest.raises(ValueError, match="joint_forward"):
        FixMatchLossHead("unlabeled", teacher="ema", joint_forward=True)


def test_a_policy_object_sets_the_mask_and_soft_weights_scale_the_loss():
    class Half(ThresholdPolicy):  # a soft policy, as SoftMatch's would be: every weight 0.5
        def mask(self, probs):
            return torch.full(probs.shape[:1], 0.5)

    weak = _logits_with_max_prob([[0.98, 0.01, 0.01], [0.2, 0.3, 0.5]])
    strong = torch.randn(2, 3)
    head = FixMatchLossHead("unlabeled", threshold=Half())
    losses = _run(head, weak, strong, targets=torch.tensor([0, 1]))
    ce = F.cross_entropy(strong, torch.tensor([0, 2]), reduction="none")
    assert torch.allclose(losses, 0.5 * ce)
    assert head.log_values["mask_rate"].item() == 0.5
    assert head.log_values["pseudo_label_acc"].item() == 0.5
    fixed = FixedThreshold(0.9)
    assert fixed.mask(weak.exp()).tolist() == [1.0, 0.0]


# FlexMatch


def _flex(**kwargs) -> FlexMatchLossHead:
    kwargs = {"num_classes": 3, "unlabeled_size": 100, **kwargs}
    return FlexMatchLossHead("unlabeled", threshold=0.9, **kwargs)


@pytest.mark.parametrize("learning_status", ["estimate", "index"])
@pytest.mark.parametrize("warmup", [True, False])
def test_flexmatch_thresholds_start_at_zero(learning_status, warmup):
    head = _flex(learning_status=learning_status, warmup=warmup)
    assert torch.equal(head.policy.class_thresholds(), torch.zeros(3))
    # ... so every pseudo-label is used at first, however unconfident.
    weak = _logits_with_max_prob([[0.4, 0.3, 0.3], [0.2, 0.3, 0.5]])
    indices = torch.tensor([0, 1]) if learning_status == "index" else None
    losses = _run(head, weak, torch.randn(2, 3), indices=indices)
    assert (losses > 0).all()
    assert head.log_values["mask_rate"].item() == 1.0
    assert head.log_values["threshold_max"].item() == 0.0  # the thresholds the mask used


def test_flexmatch_thresholds_match_the_formula():
    policy = FlexMatchThreshold(0.9, learning_status="estimate", num_classes=3, unlabeled_size=100)
    policy.class_status.copy_(torch.tensor([0.3, 0.1, 0.0]))  # sigma / N; unused 0.6
    beta = torch.tensor([0.3, 0.1, 0.0]) / 0.6  # warm-up: max(max sigma, N - sum sigma)
    expected = beta / (2 - beta) * 0.9
    assert torch.allclose(policy.class_thresholds(), expected)
    assert torch.allclose(expected, torch.tensor([1 / 3, 1 / 11, 0.0]) * 0.9)
    policy.warmup = False
    beta = torch.tensor([1.0, 1 / 3, 0.0])  # sigma / max sigma
    assert torch.allclose(policy.class_thresholds(), convex_mapping(beta) * 0.9)
    assert torch.allclose(policy.class_thresholds(), torch.tensor([0.9, 0.18, 0.0]))
    policy.mapping = "linear"
    assert torch.allclose(policy.class_thresholds(), torch.tensor([0.9, 0.3, 0.0]))

    index = FlexMatchThreshold(0.9, learning_status="index", num_classes=3, unlabeled_size=10)
    index.selected_label.copy_(torch.tensor([0, 0, 0, 1, -1, -1, -1, -1, -1, -1]))
    assert torch.allclose(index.class_thresholds(), torch.tensor([1 / 3, 1 / 11, 0.0]) * 0.9)
    # The mask compares each image's confidence with its pseudo-label's threshold.
    index.selected_label.fill_(0)  # every image confidently class 0: T = [0.9, 0, 0]
    assert torch.allclose(index.class_thresholds(), torch.tensor([0.9, 0.0, 0.0]))
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.5, 0.2], [0.95, 0.03, 0.02], [0.9, 0.1, 0.0]])
    assert index.mask(probs).tolist() == [0.0, 1.0, 1.0, 1.0]


def test_flexmatch_estimate_update_is_the_expected_paper_update():
    head = _flex(unlabeled_size=40, learning_status="estimate")
    head.policy.class_status.copy_(torch.tensor([0.2, 0.1, 0.0]))
    # 10 images (r = 10 / 40): 4 confident class 0, 1 confident class 2, 5 not confident.
    probs = [[0.95, 0.03, 0.02]] * 4 + [[0.02, 0.03, 0.95]] + [[0.5, 0.3, 0.2]] * 5
    _run(head, _logits_with_max_prob(probs), torch.randn(10, 3))
    r, q_c = 0.25, torch.tensor([0.4, 0.0, 0.1])
    expected = torch.tensor([0.2, 0.1, 0.0]) * (1 - r * q_c.sum()) + r * q_c
    assert torch.allclose(head.policy.class_status, expected)
    head.eval()  # evaluation batches leave the state alone
    _run(head, _logits_with_max_prob(probs), torch.randn(10, 3))
    assert torch.allclose(head.policy.class_status, expected)


def test_flexmatch_index_status_keeps_the_latest_confident_class():
    head = _flex(learning_status="index", unlabeled_size=6)
    head.policy.selected_label.copy_(torch.tensor([1, 1, -1, -1, -1, -1]))
    probs = [[0.95, 0.03, 0.02], [0.4, 0.3, 0.3], [0.02, 0.03, 0.95]]
    _run(head, _logits_with_max_prob(probs), torch.randn(3, 3), indices=torch.tensor([0, 1, 5]))
    # 0: newly confident class 0; 1: not confident, keeps its old class; 5: class 2.
    assert head.policy.selected_label.tolist() == [0, 1, -1, -1, -1, 2]
    with pytest.raises(ValueError, match="data.train.unlabeled batches must be .*indices"):
        _run(head, _logits_with_max_prob(probs), torch.randn(3, 3))
    with pytest.raises(ValueError, match="out of range"):
        _run(head, _logits_with_max_prob(probs), torch.randn(3, 3), indices=torch.tensor([0, 1, 6]))


def test_flexmatch_often_confident_class_gets_the_higher_threshold():
    head = _flex(unlabeled_size=50, learning_status="estimate")
    # Each batch: class 0 confidently predicted 6 times, class 2 once, class 1 never confident.
    probs = [[0.97, 0.02, 0.01]] * 6 + [[0.01, 0.02, 0.97]] + [[0.3, 0.4, 0.3]] * 3
    for _ in range(5):
        _run(head, _logits_with_max_prob(probs), torch.randn(10, 3))
    thresholds = head.policy.class_thresholds()
    assert thresholds[0] > thresholds[2] > thresholds[1] == 0
    assert thresholds[0] <= 0.9
    # The mask follows the class thresholds: 0.6 passes for class 2, not for class 0.
    mixed = _logits_with_max_prob([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]])
    assert thresholds[2] < 0.6 < thresholds[0]
    losses = _run(head, mixed, torch.randn(2, 3))
    assert losses[0] == 0 and losses[1] > 0
    assert head.log_values["threshold_max"].item() == pytest.approx(thresholds[0].item())


def test_flexmatch_state_is_in_the_state_dict_and_restored():
    head = _flex(learning_status="estimate")
    probs = [[0.97, 0.02, 0.01]] * 3 + [[0.01, 0.02, 0.97]]
    _run(head, _logits_with_max_prob(probs), torch.randn(4, 3))
    state = head.state_dict()
    assert list(state) == ["policy.class_status"] and state["policy.class_status"].sum() > 0
    # Sizes from the context.
    restored = FlexMatchLossHead("unlabeled", threshold=0.9, learning_status="estimate")
    restored.build(_context())
    restored.load_state_dict(state)
    assert torch.equal(restored.policy.class_thresholds(), head.policy.class_thresholds())
    index = FlexMatchLossHead("unlabeled")  # the paper's per-image status is the default
    index.build(_context(sizes={"unlabeled": 7}))
    assert index.state_dict()["policy.selected_label"].tolist() == [-1] * 7


def test_flexmatch_takes_num_classes_and_unlabeled_size_from_the_context():
    head = FlexMatchLossHead("unlabeled", threshold=0.9, learning_status="estimate")
    assert "policy.class_status" not in head.state_dict()  # sizes unknown before build
    head.build(_context(num_classes=4, sizes={"unlabeled": 40, "other": 7}))
    assert (head.policy.num_classes, head.policy.unlabeled_size) == (4, 40)
    assert head.policy.class_status.tolist() == [0.0] * 4
    # N = 40 sets the update rate: 10 images, all confident class 1, move f_1 by 10 / 40.
    probs = [[0.01, 0.97, 0.01, 0.01]] * 10
    _run(head, _logits_with_max_prob(probs), torch.randn(10, 4))
    assert torch.allclose(head.policy.class_status, torch.tensor([0.0, 0.25, 0.0, 0.0]))
    explicit = FlexMatchLossHead("unlabeled", unlabeled_size=10)
    explicit.build(_context(sizes={"unlabeled": 40}))
    assert explicit.policy.unlabeled_size == 10  # a given size wins


def test_flexmatch_sizes_it_cannot_know_or_that_disagree_are_clear_errors():
    with pytest.raises(ValueError, match="num_classes=5 but the classifier predicts 3"):
        FlexMatchLossHead("unlabeled", num_classes=5, unlabeled_size=10).build(_context())
    backbones, heads = _modules()
    unsized = HeadContext(backbones, heads, 3, {"other": 10})
    with pytest.raises(ValueError, match="data.train.unlabeled.*unlabeled_size"):
        FlexMatchLossHead("unlabeled").build(unsized)
    FlexMatchLossHead("unlabeled", unlabeled_size=10).build(unsized)
    with pytest.raises(ValueError, match="mapping"):
        FlexMatchLossHead("unlabeled", mapping="cubic")
    with pytest.raises(ValueError, match="learning_status"):
        FlexMatchLossHead("unlabeled", learning_status="guess")


def test_flexmatch_passes_fixmatch_arguments_through():
    head = FlexMatchLossHead("unlabeled", teacher="ema", temperature=0.5, input_backbone="other")
    assert (head.teacher, head.temperature, head.input_backbone) == ("ema", 0.5, "other")
    assert isinstance(head.policy, FlexMatchThreshold)
    with pytest.raises(TypeError):
        FlexMatchLossHead("unlabeled", "backbone")  # FixMatch's arguments by name only


def test_the_head_shows_the_policy_labeled_targets_and_takes_its_adjusted_logits():
    from sesemi.models.heads.thresholds import DebiasedThreshold, DistributionAlignment

    policy = DistributionAlignment(DebiasedThreshold(0.5, strength=1.0, momentum=0.0))
    head = FixMatchLossHead("unlabeled", threshold=policy).train()
    backbones, heads = _modules()
    head.build(HeadContext(backbones, heads, 3, {"unlabeled": 100}))
    weak = _logits_with_max_prob([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    strong = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    data = {
        "unlabeled": [[weak, strong], torch.full((3,), -1)],
        "supervised": [torch.zeros(4, 3), torch.tensor([0, 0, 1, 2])],
    }
    losses = head(HeadInputs(data=data, backbones=backbones, heads=heads))
    assert policy.labeled_counts.tolist() == [2.0, 1.0, 1.0]
    # Aligned to the labeled frequencies, then debiased by the (momentum 0) batch mean of the
    # aligned predictions; the loss reads the strong logits plus log of the bias before the batch
    # (uniform: a constant shift, no change) -- recompute it all by hand.
    probs = weak.softmax(dim=1)
    aligned = probs * torch.tensor([0.5, 0.25, 0.25]) / probs.mean(dim=0)
    aligned = aligned / aligned.sum(dim=1, keepdim=True)
    debiased = aligned / aligned.mean(dim=0)
    debiased = debiased / debiased.sum(dim=1, keepdim=True)
    confidence, labels = debiased.max(dim=1)
    mask = (confidence >= 0.5).float()
    expected = mask * F.cross_entropy(strong + math.log(1 / 3), labels, reduction="none")
    torch.testing.assert_close(losses, expected)
    assert mask.sum() >= 1
    # A second step: the margin is now log of the first batch's mean, not a constant.
    head(HeadInputs(data=data, backbones=backbones, heads=heads))
    inner = policy.policy
    assert inner.adjust_logits(strong)[0].tolist() != (strong[0] + math.log(1 / 3)).tolist()


class Shift(nn.Module):
    """A stub backbone: `x + bias`, so the reference image (all zeros) has the logits `bias`."""

    def __init__(self, bias: list[float]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(bias))
        self.out_features = len(bias)

    def forward(self, x):
        return x + self.bias


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("joint_forward, teacher", [(False, False), (True, False), (False, True)])
def test_cdmad_pseudo_labels_come_from_logits_minus_the_reference_images(
    debias, joint_forward, teacher
):
    # Content says class 1 (0.98); the network's bias says class 0 so strongly that the raw
    # logits confidently pick class 0 for both rows. The reference image (value 1 in "channel"
    # 0) has the logits bias + [1, 0, 0].
    bias = [10.0, 0.0, 0.0]
    backbones = {"backbone": Shift(bias), "teacher_backbone": Shift(bias)}
    heads = {"supervised_head": nn.Identity(), "teacher_supervised_head": nn.Identity()}
    head = FixMatchLossHead(
        "unlabeled",
        threshold=0.95,
        joint_forward=joint_forward,
        teacher="ema" if teacher else "student",
    )
    reference = (1.0, 0.0, 0.0) if debias else None
    head.build(HeadContext(backbones, heads, 3, {"unlabeled": 100}, "fixmatch", reference))
    weak = _logits_with_max_prob([[0.01, 0.98, 0.01], [0.4, 0.3, 0.3]])
    strong = torch.randn(2, 3)
    data = {"unlabeled": [[weak, strong], torch.tensor([1, 0])]}
    losses = head(HeadInputs(data=data, backbones=backbones, heads=heads))
    # Debiased: softmax(weak + bias - (bias + [1, 0, 0])), row 0 class 1 above 0.95, row 1
    # unsure; raw: softmax(weak + bias), both rows class 0 above 0.95.
    z = weak - torch.tensor([1.0, 0.0, 0.0]) if debias else weak + torch.tensor(bias)
    confidence, labels = F.softmax(z, dim=1).max(dim=1)
    assert labels.tolist()[0] == (1 if debias else 0)
    mask = (confidence >= 0.95).float()
    assert mask.tolist() == ([1.0, 0.0] if debias else [1.0, 1.0])
    expected = mask * F.cross_entropy(strong + torch.tensor(bias), labels, reduction="none")
    assert torch.allclose(losses.detach(), expected)
    assert head.log_values["pseudo_label_acc"].item() == (1.0 if debias else 0.5)
