"""The shared head plumbing: name checks at build, batch unpacking, student and teacher logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sesemi.models.heads import (
    EntropyMinimizationLossHead,
    FixMatchLossHead,
    FlexMatchLossHead,
    HeadContext,
    HeadInputs,
    JigsawPredictionLossHead,
    LossHead,
    MeanTeacherLossHead,
    PiModelLossHead,
    PseudoLabelLossHead,
    RotationPredictionLossHead,
    TransformationPredictionLossHead,
)

B, IN, FEATURES, CLASSES = 4, 6, 5, 3


def _modules(teacher: bool = True) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    torch.manual_seed(0)
    backbones: dict[str, nn.Module] = {"backbone": nn.Linear(IN, FEATURES)}
    heads: dict[str, nn.Module] = {"supervised_head": nn.Linear(FEATURES, CLASSES)}
    if teacher:
        backbones["teacher_backbone"] = nn.Linear(IN, FEATURES)
        heads["teacher_supervised_head"] = nn.Linear(FEATURES, CLASSES)
    return backbones, heads


def _context(teacher: bool = True) -> HeadContext:
    backbones, heads = _modules(teacher)
    return HeadContext(backbones, heads, CLASSES, {"data": 10})


def _inputs(context: HeadContext, batch) -> HeadInputs:
    return HeadInputs(data={"data": batch}, backbones=context.backbones, heads=context.heads)


# --- Names checked once, at build ------------------------------------------------------------


def test_a_head_naming_a_missing_backbone_gets_one_line_naming_it_and_the_choices():
    head = EntropyMinimizationLossHead("data", input_backbone="resnet")
    with pytest.raises(ValueError) as error:
        head.build(_context())
    assert str(error.value) == (
        "EntropyMinimizationLossHead reads the backbone 'resnet', which the learner does not "
        "offer (it has: backbone, teacher_backbone)"
    )
    with pytest.raises(ValueError, match=r"RotationPredictionLossHead reads the backbone 'x'"):
        RotationPredictionLossHead("data", input_backbone="x").build(_context())
    empty = HeadContext({}, {}, CLASSES)
    with pytest.raises(ValueError, match=r"\(it has: none\)"):
        PiModelLossHead("data").build(empty)


def test_a_head_naming_a_missing_classifier_gets_one_line():
    with pytest.raises(ValueError) as error:
        PseudoLabelLossHead("data", input_head="clf").build(_context())
    assert "\n" not in str(error.value)
    assert str(error.value) == (
        "PseudoLabelLossHead reads the head 'clf', which the learner does not offer "
        "(it has: supervised_head, teacher_supervised_head)"
    )


def test_transformation_heads_read_no_classifier():
    backbones, _ = _modules(teacher=False)
    head = RotationPredictionLossHead("data")
    head.build(HeadContext(backbones, {}, CLASSES))  # no classifier offered: fine
    assert isinstance(head, TransformationPredictionLossHead)
    assert isinstance(JigsawPredictionLossHead("data"), TransformationPredictionLossHead)
    assert (head.fc.in_features, head.fc.out_features) == (FEATURES, 4)


def test_a_missing_teacher_says_how_to_add_an_ema_teacher():
    hint = (
        "set learner.hparams.model.ema: {decay: 0.999} "
        "(on the command line: +learner.hparams.model.ema.decay=0.999)"
    )
    with pytest.raises(ValueError) as error:
        MeanTeacherLossHead("data").build(_context(teacher=False))
    assert str(error.value) == (
        "MeanTeacherLossHead reads the backbone 'teacher_backbone', which the learner does not "
        f"offer (it has: backbone); it is the EMA teacher's: {hint}"
    )
    with pytest.raises(ValueError) as error:
        FixMatchLossHead("data", teacher="ema").build(_context(teacher=False))
    assert str(error.value).endswith(f"{hint} or use teacher=student")
    assert not FixMatchLossHead("data").uses_teacher
    FixMatchLossHead("data").build(_context(teacher=False))


# --- Student and teacher logits ---------------------------------------------------------------


def test_logits_of_student_and_teacher_and_no_gradient_for_the_teacher():
    context = _context()
    head = MeanTeacherLossHead("data")
    head.build(context)
    inputs = _inputs(context, None)
    x = torch.randn(B, IN)
    student = head.logits(inputs, x)
    teacher = head.logits(inputs, x, teacher=True)
    b, h = context.backbones, context.heads
    torch.testing.assert_close(student, h["supervised_head"](b["backbone"](x)))
    expected = h["teacher_supervised_head"](b["teacher_backbone"](x))
    torch.testing.assert_close(teacher, expected)
    assert not torch.allclose(student, teacher)  # really two models
    assert student.requires_grad and not teacher.requires_grad
    features = head.features(inputs, x, teacher=True)
    torch.testing.assert_close(features, b["teacher_backbone"](x))
    assert not features.requires_grad


# --- Batches ----------------------------------------------------------------------------------


def _batch_for(head: LossHead, with_indices: bool):
    torch.manual_seed(1)
    x1, x2 = torch.randn(B, IN), torch.randn(B, IN)
    targets = torch.tensor([0, 1, 2, -1])
    if isinstance(head, TransformationPredictionLossHead):
        first, targets = x1, torch.tensor([0, 1, 2, 3])
    elif isinstance(head, PseudoLabelLossHead):
        first, targets = x1, torch.tensor([0, 1, 2, 0])
    elif isinstance(head, EntropyMinimizationLossHead):
        first = x1
    else:
        first = [x1, x2]
    indices = torch.tensor([7, 2, 9, 0])
    return (first, targets, indices) if with_indices else (first, targets)


HEADS = {
    "rotation": lambda: RotationPredictionLossHead("data"),
    "jigsaw": lambda: JigsawPredictionLossHead("data", num_permutations=4),
    "entropy": lambda: EntropyMinimizationLossHead("data"),
    "pi": lambda: PiModelLossHead("data"),
    "mean_teacher": lambda: MeanTeacherLossHead("data"),
    "fixmatch": lambda: FixMatchLossHead("data", threshold=0.0),
    "fixmatch_ema": lambda: FixMatchLossHead("data", threshold=0.0, teacher="ema"),
    "flexmatch": lambda: FlexMatchLossHead("data"),
    "flexmatch_index": lambda: FlexMatchLossHead("data", threshold=0.0, learning_status="index"),
    "pseudo_label": lambda: PseudoLabelLossHead("data"),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_accepts_a_third_batch_element_the_sample_indices(name):
    context = _context()
    head = HEADS[name]()
    head.build(context)
    head.eval()  # no state update: the two calls see the same state
    plain = head(_inputs(context, _batch_for(head, with_indices=False)))
    head.train()
    indexed = head(_inputs(context, _batch_for(head, with_indices=True)))
    assert plain.shape == (B,) and (plain > 0).any()
    torch.testing.assert_close(indexed, plain)
    if name == "flexmatch_index":  # the one head that reads the indices: each one's label
        (weak, _), _, indices = _batch_for(head, with_indices=True)
        pseudo_labels = head.logits(_inputs(context, None), weak).argmax(dim=1)
        expected = torch.full((10,), -1)
        expected[indices] = pseudo_labels
        assert torch.equal(head.policy.selected_label, expected)


def test_bad_batches_are_clear_errors():
    context = _context()
    head = EntropyMinimizationLossHead("data")
    x = torch.randn(B, IN)
    wrong = HeadInputs(data={"other": (x, None)}, backbones=context.backbones, heads=context.heads)
    with pytest.raises(ValueError, match=r"reads data.train.data, which the batch lacks \(it has"):
        head(wrong)
    with pytest.raises(ValueError, match="must be \\(images, targets\\) or"):
        head(_inputs(context, (x,)))
    with pytest.raises(ValueError, match="several views.*plain image_transform"):
        head(_inputs(context, ([x, x], None)))
    with pytest.raises(ValueError, match=r"two views.*MultiView, views: \[<weak>, <strong>\]"):
        FixMatchLossHead("data")(_inputs(context, (x, None)))


# --- Thin heads over plain losses -------------------------------------------------------------


def test_rotation_head_is_the_cross_entropy_of_its_classifier_and_checks_labels():
    context = _context()
    head = RotationPredictionLossHead("data", num_rotations=2)
    head.build(context)
    x, labels = torch.randn(B, IN), torch.tensor([0, 1, 1, 0])
    losses = head(_inputs(context, (x, labels)))
    logits = head.fc(context.backbones["backbone"](x))
    log_z = logits.exp().sum(dim=1).log()
    torch.testing.assert_close(losses, log_z - logits[torch.arange(B), labels])
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    assert head.log_values["top1"].item() == pytest.approx(accuracy.item())
    fresh = RotationPredictionLossHead("data", num_rotations=2)
    fresh.build(context)
    with pytest.raises(ValueError, match="RotationTransformer the same num_rotations"):
        fresh(_inputs(context, (x, torch.tensor([0, 1, 2, 3]))))


def test_pseudo_label_head_is_the_cross_entropy_with_hard_or_soft_labels():
    context = _context()
    head = PseudoLabelLossHead("data")
    x = torch.randn(B, IN)
    logits = head.logits(_inputs(context, None), x)
    hard = torch.tensor([0, 2, 1, 1])
    losses = head(_inputs(context, (x, hard)))
    torch.testing.assert_close(losses, -F.log_softmax(logits, 1)[torch.arange(B), hard])
    agreement = (logits.argmax(1) == hard).float().mean()
    assert head.log_values["agreement"].item() == pytest.approx(agreement.item())
    soft = torch.tensor([[0.5, 0.5, 0.0]] * B)
    losses = head(_inputs(context, (x, soft, torch.arange(B))))
    torch.testing.assert_close(losses, -(soft * F.log_softmax(logits, 1)).sum(1))
