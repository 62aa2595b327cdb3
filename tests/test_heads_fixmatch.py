"""FixMatch and FlexMatch heads: masks, losses, gradients, teachers, thresholds, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from test_cli import open_sesemi
from torch import nn

from sesemi.config.resolvers import SESEMIConfigAttributes, get_attributes, set_attributes
from sesemi.learners import WeightedTerm
from sesemi.models.heads.base import HeadInputs
from sesemi.models.heads.fixmatch import FixMatchLossHead, FlexMatchLossHead, convex_mapping


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
    heads["supervised_head"].out_features = num_classes
    if teacher:
        backbones["teacher_backbone"] = Roll()
        heads["teacher_supervised_head"] = nn.Identity()
    return backbones, heads


def _run(head, weak, strong, targets=None, indices=None, teacher=False):
    backbones, heads = _modules(teacher, weak.shape[1])
    head.build(backbones, heads)
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
    reduced = WeightedTerm("mean", 1.0, None).reduce(losses)  # the learner's default
    assert reduced.item() == pytest.approx(((ce_0 + 0.0 + ce_2) / 3).item())  # not / 2


@pytest.mark.parametrize("joint_forward", [False, True])
def test_no_gradient_flows_through_the_weak_view(joint_forward):
    weak = _logits_with_max_prob([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]]).requires_grad_()
    strong = torch.randn(2, 3, requires_grad=True)
    backbones, heads = _modules()
    head = FixMatchLossHead("unlabeled", joint_forward=joint_forward)
    head.build(backbones, heads)
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
    backbones, heads = _modules(teacher=False)
    with pytest.raises(ValueError, match="learner.hparams.model.ema"):
        FixMatchLossHead("unlabeled", teacher="ema").build(backbones, heads)


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


# FlexMatch


def _flex(**kwargs) -> FlexMatchLossHead:
    kwargs = {"num_classes": 3, "unlabeled_size": 100, **kwargs}
    return FlexMatchLossHead("unlabeled", threshold=0.9, **kwargs)


@pytest.mark.parametrize("learning_status", ["estimate", "index"])
@pytest.mark.parametrize("warmup", [True, False])
def test_flexmatch_thresholds_start_at_zero(learning_status, warmup):
    head = _flex(learning_status=learning_status, threshold_warmup=warmup)
    assert torch.equal(head.class_thresholds(), torch.zeros(3))
    # ... so every pseudo-label is used at first, however unconfident.
    weak = _logits_with_max_prob([[0.4, 0.3, 0.3], [0.2, 0.3, 0.5]])
    indices = torch.tensor([0, 1]) if learning_status == "index" else None
    losses = _run(head, weak, torch.randn(2, 3), indices=indices)
    assert (losses > 0).all()
    assert head.log_values["mask_rate"].item() == 1.0


def test_flexmatch_thresholds_match_the_formula():
    head = _flex()
    head.class_status.copy_(torch.tensor([0.3, 0.1, 0.0]))  # sigma / N; unused 0.6
    beta = torch.tensor([0.3, 0.1, 0.0]) / 0.6  # warm-up: max(max sigma, N - sum sigma)
    expected = beta / (2 - beta) * 0.9
    assert torch.allclose(head.class_thresholds(), expected)
    assert torch.allclose(expected, torch.tensor([1 / 3, 1 / 11, 0.0]) * 0.9)
    head.threshold_warmup = False
    beta = torch.tensor([1.0, 1 / 3, 0.0])  # sigma / max sigma
    assert torch.allclose(head.class_thresholds(), convex_mapping(beta) * 0.9)
    assert torch.allclose(head.class_thresholds(), torch.tensor([0.9, 0.18, 0.0]))

    index = _flex(learning_status="index", unlabeled_size=10)
    index.selected_label.copy_(torch.tensor([0, 0, 0, 1, -1, -1, -1, -1, -1, -1]))
    assert torch.allclose(index.class_thresholds(), torch.tensor([1 / 3, 1 / 11, 0.0]) * 0.9)


def test_flexmatch_estimate_update_is_the_expected_paper_update():
    head = _flex(unlabeled_size=40)
    head.class_status.copy_(torch.tensor([0.2, 0.1, 0.0]))
    # 10 images (r = 10 / 40): 4 confident class 0, 1 confident class 2, 5 not confident.
    probs = [[0.95, 0.03, 0.02]] * 4 + [[0.02, 0.03, 0.95]] + [[0.5, 0.3, 0.2]] * 5
    _run(head, _logits_with_max_prob(probs), torch.randn(10, 3))
    r, q_c = 0.25, torch.tensor([0.4, 0.0, 0.1])
    expected = torch.tensor([0.2, 0.1, 0.0]) * (1 - r * q_c.sum()) + r * q_c
    assert torch.allclose(head.class_status, expected)


def test_flexmatch_index_status_keeps_the_latest_confident_class():
    head = _flex(learning_status="index", unlabeled_size=6)
    head.selected_label.copy_(torch.tensor([1, 1, -1, -1, -1, -1]))
    probs = [[0.95, 0.03, 0.02], [0.4, 0.3, 0.3], [0.02, 0.03, 0.95]]
    _run(head, _logits_with_max_prob(probs), torch.randn(3, 3), indices=torch.tensor([0, 1, 5]))
    # 0: newly confident class 0; 1: not confident, keeps its old class; 5: class 2.
    assert head.selected_label.tolist() == [0, 1, -1, -1, -1, 2]
    with pytest.raises(ValueError, match="indices"):
        _run(head, _logits_with_max_prob(probs), torch.randn(3, 3))


def test_flexmatch_often_confident_class_gets_the_higher_threshold():
    head = _flex(unlabeled_size=50)
    # Each batch: class 0 confidently predicted 6 times, class 2 once, class 1 never confident.
    probs = [[0.97, 0.02, 0.01]] * 6 + [[0.01, 0.02, 0.97]] + [[0.3, 0.4, 0.3]] * 3
    for _ in range(5):
        _run(head, _logits_with_max_prob(probs), torch.randn(10, 3))
    thresholds = head.class_thresholds()
    assert thresholds[0] > thresholds[2] > thresholds[1] == 0
    assert thresholds[0] <= 0.9
    # The mask follows the class thresholds: 0.6 passes for class 2, not for class 0.
    mixed = _logits_with_max_prob([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]])
    assert thresholds[2] < 0.6 < thresholds[0]
    losses = _run(head, mixed, torch.randn(2, 3))
    assert losses[0] == 0 and losses[1] > 0
    assert head.log_values["threshold_max"].item() == pytest.approx(thresholds[0].item())


def test_flexmatch_state_is_in_the_state_dict_and_restored():
    head = _flex()
    probs = [[0.97, 0.02, 0.01]] * 3 + [[0.01, 0.02, 0.97]]
    _run(head, _logits_with_max_prob(probs), torch.randn(4, 3))
    state = head.state_dict()
    assert "class_status" in state and state["class_status"].sum() > 0
    restored = _flex()
    restored.load_state_dict(state)
    assert torch.equal(restored.class_thresholds(), head.class_thresholds())
    assert "selected_label" in _flex(learning_status="index").state_dict()


def test_flexmatch_checks_num_classes_against_the_classifier():
    backbones, heads = _modules(num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        FlexMatchLossHead("unlabeled", num_classes=5, unlabeled_size=10).build(backbones, heads)


# Configs


@pytest.mark.cli
@pytest.mark.parametrize(
    "name,head", [("demo_fixmatch", "fixmatch"), ("demo_flexmatch", "flexmatch")]
)
def test_demo_config_trains_a_few_steps(tmp_path: Path, tmp_path_factory, monkeypatch, name, head):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model: more threads only contend
    digits = tmp_path_factory.getbasetemp() / "sesemi_digits"  # prepared once per session
    out = open_sesemi(
        "-cn",
        name,
        f"run.data_root={digits}",
        "+trainer.num_sanity_val_steps=0",
        "run.num_iterations=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "+trainer.limit_val_batches=1",
        "data.train.supervised.batch_size=8",
        "data.train.unlabeled.batch_size=16",
        "learner.hparams.model.backbone.name=test_resnet",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sesemi FIT finished" in out.stdout
    assert (digits / "sesemi_digits.json").is_file()  # prepared by demo's Hydra callback
    (metrics,) = (tmp_path / "runs" / name).glob("*/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    for column in (f"train/{head}_loss", f"train/{head}/mask_rate", "val/top1"):
        assert column in header


@pytest.fixture
def attributes():
    previous = get_attributes()
    set_attributes(
        SESEMIConfigAttributes(iterations_per_epoch=10, max_iterations=100, num_gpus=0, num_nodes=1)
    )
    yield
    set_attributes(previous)


@pytest.mark.parametrize(
    "name,head_name,head_type",
    [
        ("imagewoof_fixmatch", "fixmatch", FixMatchLossHead),
        ("imagewoof_flexmatch", "flexmatch", FlexMatchLossHead),
    ],
)
def test_imagewoof_config_builds_its_learner(attributes, name, head_name, head_type):
    with initialize_config_module(config_module="sesemi.conf", version_base=None):
        cfg = compose(name, overrides=["learner.hparams.model.backbone.name=test_resnet"])
    assert cfg.data.train.rotation_prediction is None
    assert cfg.data.train.unlabeled.batch_size == 7 * cfg.run.batch_size_per_gpu
    assert cfg.data.train.unlabeled.dataset.image_transform.views[1].input_h == 224
    learner = instantiate(cfg.learner, _recursive_=False)
    assert list(learner.regularization_heads) == [head_name]
    head = learner.regularization_heads[head_name]
    assert type(head) is head_type and head.threshold == 0.95
    assert learner.ema is not None  # the EMA model the paper evaluates
    if head_type is FlexMatchLossHead:
        assert head.num_classes == 10
        assert f"regularization_heads.{head_name}.class_status" in learner.state_dict()
