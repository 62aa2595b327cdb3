"""Entropy minimization, Pi model and Mean Teacher heads: values, gradients, EMA, configs."""

from __future__ import annotations

import copy
import glob
import math
from pathlib import Path

import pytest
import torch
from test_cli import open_sesemi
from torch import nn

import sesemi.config  # noqa: F401  (registers the schema and the ${sesemi:...} resolver)
from sesemi.config.resolvers import SESEMIConfigAttributes, get_attributes, set_attributes
from sesemi.learners import Classifier
from sesemi.models.heads.base import HeadInputs
from sesemi.models.heads.consistency import (
    EntropyMinimizationLossHead,
    MeanTeacherLossHead,
    PiModelLossHead,
)

NUM_CLASSES = 3
TEACHER_ERROR = "learner.hparams.model.ema: {decay: 0.999}"


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
    with pytest.raises(ValueError, match=f"needs an EMA teacher.*{TEACHER_ERROR}"):
        MeanTeacherLossHead("unlabeled").build({"backbone": backbone}, {"supervised_head": head})


def _classifier_hparams(ema):
    return {
        "num_classes": NUM_CLASSES,
        "model": {
            "backbone": {"_target_": "sesemi.PyTorchImageModels", "name": "test_resnet"},
            "supervised_loss": {"callable": {"_target_": "torch.nn.CrossEntropyLoss"}},
            "regularization_loss_heads": {
                "mean_teacher": {
                    "head": {
                        "_target_": "sesemi.models.heads.consistency.MeanTeacherLossHead",
                        "input_data": "unlabeled",
                    },
                    "scale_factor": 10.0,
                }
            },
            "ema": ema,
        },
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1},
    }


def test_mean_teacher_in_a_classifier_trains_the_student_and_follows_the_ema_formula():
    with pytest.raises(ValueError, match=TEACHER_ERROR):
        Classifier(_classifier_hparams(ema=None))

    torch.manual_seed(0)
    learner = Classifier(_classifier_hparams(ema={"decay": 0.5}))
    images = torch.randn(4, 3, 32, 32)
    batch = {
        "supervised": (images, torch.tensor([0, 1, 2, 0])),
        "unlabeled": ([images, images.flip(-1)], torch.full((4,), -1)),
    }
    total, logs = learner.compute_losses(batch, step=0)
    assert logs["mean_teacher_loss"] > 0 and logs["mean_teacher_weight"] == 10.0
    total.backward()
    teacher = learner.ema.average
    assert all(p.grad is None for p in teacher.parameters())
    assert learner.supervised_head.weight.grad is not None

    # AveragedModel's first update copies the student; later ones average with the decay.
    learner.ema.update(learner.backbone, learner.supervised_head)
    torch.testing.assert_close(learner.ema.supervised_head.weight, learner.supervised_head.weight)
    with torch.no_grad():
        learner.supervised_head.weight.add_(1.0)
    old_teacher = learner.ema.supervised_head.weight.detach().clone()
    learner.ema.update(learner.backbone, learner.supervised_head)
    expected = 0.5 * old_teacher + 0.5 * learner.supervised_head.weight.detach()
    torch.testing.assert_close(learner.ema.supervised_head.weight, expected)


# --- Configs ----------------------------------------------------------------------------------


def _compose(name: str, overrides=(), hydra: bool = False):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="sesemi.conf", version_base=None):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    # One launch directory for all demo runs: the digits are prepared there once.
    return tmp_path_factory.mktemp("demos")


DEMOS = {
    "demo_entropy_minimization": ["entropy_minimization"],
    "demo_pi_model": ["pi_model"],
    "demo_mean_teacher": ["mean_teacher"],
    "demo_rotation_entropy": ["rotation_prediction", "entropy_minimization"],
}


@pytest.mark.cli
@pytest.mark.parametrize("name", list(DEMOS))
def test_demo_config_composes_and_trains_a_few_steps(name, digits_dir, monkeypatch):
    cfg = _compose(name)
    heads = cfg.learner.hparams.model.regularization_loss_heads
    assert sorted(k for k, v in heads.items() if v is not None) == sorted(DEMOS[name])
    transform = cfg.data.train.unlabeled.dataset.image_transform
    for view in transform.get("views") or [transform]:  # MultiView or one transform
        assert view.p_hflip == 0.0 and view.input_h == 32  # digits are not mirror-symmetric
    # The digits are prepared by demo.yaml's Hydra callback, inherited.
    assert "prepare_digits" in _compose(name, hydra=True).hydra.callbacks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # far faster on a busy 2-core CPU
    out = open_sesemi(
        "-cn",
        name,
        "run.num_iterations=2",
        "trainer.val_check_interval=2",
        "learner.hparams.model.backbone.name=test_resnet",
        "run.batch_size_per_gpu=8",
        "data.train.unlabeled.batch_size=8",
        "data.val.batch_size=32",
        "+trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0",
        "+trainer.enable_progress_bar=false",
        cwd=digits_dir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sesemi FIT finished" in out.stdout
    if name == "demo_mean_teacher":
        (metrics,) = glob.glob(str(digits_dir / "runs" / name / "*" / "metrics.csv"))
        assert "val/ema/top1" in Path(metrics).read_text().splitlines()[0]


@pytest.mark.parametrize(
    ("name", "head", "ema"),
    [
        ("imagewoof_entropy_minimization", "entropy_minimization", None),
        ("imagewoof_pi_model", "pi_model", None),
        ("imagewoof_mean_teacher", "mean_teacher", 0.999),
    ],
)
def test_imagewoof_config_composes_and_builds_its_learner(name, head, ema):
    from hydra.utils import instantiate

    cfg = _compose(name, ["learner.hparams.model.backbone.name=test_resnet"])
    assert cfg.data.train.rotation_prediction is None
    assert cfg.learner.hparams.model.regularization_loss_heads.rotation_prediction is None
    assert cfg.data.train.unlabeled.dataset.subset == "train"
    previous = get_attributes()
    set_attributes(
        SESEMIConfigAttributes(iterations_per_epoch=10, max_iterations=100, num_gpus=0, num_nodes=1)
    )
    try:
        learner = instantiate(cfg.learner, _recursive_=False)
    finally:
        set_attributes(previous)
    assert list(learner.regularization_heads) == [head]
    assert (learner.ema is None) == (ema is None)
    if ema is not None:
        assert learner.ema.decay == ema
    term = learner.regularization_terms[head]
    assert term.weight(0) < term.weight(5000) == term.scale_factor
