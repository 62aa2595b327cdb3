"""The Classifier: built from objects or from a config, loss weighting, EMA, metadata, wiring."""

from __future__ import annotations

import functools
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sesemi import PyTorchImageModels
from sesemi.build import build_classifier, build_loss, knn_options
from sesemi.callbacks import (
    CheckpointMetadata,
    KNNEvaluation,
    StepsRichProgressBar,
    StepsTQDMProgressBar,
    run_description,
)
from sesemi.checkpoints import load_pretrained_weights
from sesemi.collation import RotationTransformer
from sesemi.learners import Classifier, LRSchedulerSpec
from sesemi.models.heads import LossHead, RotationPredictionLossHead
from sesemi.models.heads.base import HeadInputs
from sesemi.schedulers.lr import PolynomialLR
from sesemi.schedulers.weight import LinearRampupScheduler, WeightedTerm


class ConstantHead(LossHead):
    """A head whose per-sample losses are fixed numbers, to check weighting and reduction."""

    reads_classifier = False

    def __init__(self, input_data: str, values: list[float]) -> None:
        super().__init__(input_data)
        self.values = torch.tensor(values)

    def forward(self, inputs: HeadInputs) -> Tensor:
        return self.values


class NoReductionLoss(nn.Module):
    """A user's loss without a `reduction` argument: it returns per-sample losses itself."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return 2.0 * F.cross_entropy(logits, targets, reduction="none")


def _hparams(heads=None, num_classes=3):
    return {
        "num_classes": num_classes,
        "model": {
            "backbone": {"_target_": "sesemi.PyTorchImageModels", "name": "test_resnet"},
            "supervised_loss": {"callable": {"_target_": "torch.nn.CrossEntropyLoss"}},
            "regularization_loss_heads": heads,
        },
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
        "lr_scheduler": {
            "scheduler": {"_target_": "sesemi.PolynomialLR", "warmup_iters": 2, "max_iters": 10}
        },
    }


def _batch(n=4, num_classes=3):
    torch.manual_seed(0)
    images = torch.randn(n, 3, 32, 32)
    return {"supervised": (images, torch.arange(n) % num_classes)}


def test_a_classifier_is_built_from_plain_objects_without_hydra():
    torch.manual_seed(0)
    learner = Classifier(
        backbone=PyTorchImageModels("test_resnet"),
        num_classes=3,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        heads={"rotation": RotationPredictionLossHead("rotation")},
        weights={"rotation": WeightedTerm(scale_factor=0.5)},
    )
    batch = _batch()
    batch["rotation"] = RotationTransformer()([(img, 0) for img in batch["supervised"][0]])
    learner.eval()
    total, logs = learner.compute_losses(batch, step=0)
    images, targets = batch["supervised"]
    supervised = F.cross_entropy(learner.net(images), targets)
    rotated, labels = batch["rotation"]
    head = learner.heads["rotation"]
    rotation = F.cross_entropy(head.fc(learner.backbone(rotated)), labels)
    torch.testing.assert_close(total, supervised + 0.5 * rotation)
    assert logs["rotation_weight"] == 0.5
    assert isinstance(learner.configure_optimizers(), torch.optim.SGD)


def test_total_is_weighted_sum_of_reduced_terms():
    heads = {
        "const": {
            "head": {
                "_target_": "test_learner.ConstantHead",
                "input_data": "x",
                "values": [1.0, 3.0],
            },
            "scale_factor": 0.5,
            "reduction": "mean",
            "scheduler": {
                "_target_": "sesemi.schedulers.weight.LinearRampupScheduler",
                "stop_rampup": 10,
            },
        },
        "summed": {
            "head": {
                "_target_": "test_learner.ConstantHead",
                "input_data": "x",
                "values": [1.0, 3.0],
            },
            "reduction": "sum",
        },
    }
    learner = build_classifier(_hparams(heads)).eval()
    batch = _batch()
    total, logs = learner.compute_losses(batch, step=4)
    images, targets = batch["supervised"]
    supervised = F.cross_entropy(learner.net(images), targets)
    # const: mean 2.0 weighted 0.5 * 4/10; summed: 4.0 weighted 1.
    expected = supervised + 0.5 * 0.4 * 2.0 + 1.0 * 4.0
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["const_weight"] == pytest.approx(0.2)
    assert logs["summed_loss"].item() == pytest.approx(4.0)
    assert isinstance(learner.weights["const"].scheduler, LinearRampupScheduler)


def test_a_loss_without_a_reduction_argument_is_used_as_it_is():
    # Decided by the callable's signature: Hydra wraps a TypeError, so trying and catching
    # cannot tell "no such argument" from an error inside the loss.
    own = build_loss({"_target_": "test_learner.NoReductionLoss"})
    torch_loss = build_loss({"_target_": "torch.nn.CrossEntropyLoss"})
    assert isinstance(own, NoReductionLoss) and torch_loss.reduction == "none"
    hp = _hparams()
    hp["model"]["supervised_loss"]["callable"] = {"_target_": "test_learner.NoReductionLoss"}
    learner = build_classifier(hp).eval()
    batch = _batch()
    total, _ = learner.compute_losses(batch, step=0)
    images, targets = batch["supervised"]
    torch.testing.assert_close(total, 2.0 * F.cross_entropy(learner.net(images), targets))


def test_rotation_head_is_built_on_backbone_width():
    heads = {
        "rotation_prediction": {
            "head": {
                "_target_": "sesemi.models.heads.loss.RotationPredictionLossHead",
                "input_data": "rotation_prediction",
            }
        }
    }
    learner = build_classifier(_hparams(heads))
    head = learner.heads["rotation_prediction"]
    assert head.fc.in_features == learner.backbone.out_features and head.fc.out_features == 4
    batch = _batch()
    batch["rotation_prediction"] = RotationTransformer()(
        [(img, 0) for img in batch["supervised"][0]]
    )
    total, logs = learner.compute_losses(batch, step=0)
    total.backward()
    assert head.fc.weight.grad is not None and logs["rotation_prediction_loss"] > 0


def test_forward_returns_probabilities():
    learner = build_classifier(_hparams()).eval()
    images = torch.randn(5, 3, 32, 32)
    probs = learner(images)
    torch.testing.assert_close(probs, torch.softmax(learner.net(images), dim=1))
    assert torch.allclose(probs.sum(dim=1), torch.ones(5), atol=1e-6)


def test_non_finite_loss_names_term_and_step():
    heads = {
        "bad": {
            "head": {
                "_target_": "test_learner.ConstantHead",
                "input_data": "x",
                "values": [math.nan],
            }
        }
    }
    learner = build_classifier(_hparams(heads))
    with pytest.raises(FloatingPointError, match=r"'bad'.*step 7"):
        learner.compute_losses(_batch(), step=7)


def test_head_must_be_a_loss_head():
    heads = {"oops": {"head": {"_target_": "torch.nn.Identity"}}}
    with pytest.raises(TypeError, match="regularization_loss_heads.oops.head"):
        build_classifier(_hparams(heads))


def test_optimizer_and_scheduler_are_wired():
    learner = build_classifier(_hparams())
    config = learner.configure_optimizers()
    optimizer, sched = config["optimizer"], config["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and isinstance(sched["scheduler"], PolynomialLR)
    assert sched["interval"] == "step" and optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # warm-up starts at warmup_lr
    assert sched["scheduler"].max_iters == 10


def test_checkpoints_carry_a_plain_description_and_reload_into_a_rebuilt_learner(tmp_path):
    learner = build_classifier(_hparams())
    metadata = CheckpointMetadata(["a", "b", "c"], {"input_h": 32})
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[metadata]
    )
    trainer.strategy.connect(learner)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # data only
    assert checkpoint["hyper_parameters"]["hparams"]["num_classes"] == 3
    model = checkpoint["sesemi"]["model"]
    assert model["num_classes"] == 3 and model["backbone"]["name"] == "test_resnet"
    assert checkpoint["sesemi"]["class_names"] == ["a", "b", "c"]
    rebuilt = build_classifier(checkpoint["hyper_parameters"]["hparams"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), learner.eval()(x))


def test_null_head_entry_is_switched_off():
    learner = build_classifier(_hparams({"rotation": None}))
    assert len(learner.heads) == 0


def test_ema_teacher_is_offered_to_heads_and_not_optimized():
    hp = _hparams()
    hp["model"]["ema"] = {"decay": 0.9}
    learner = build_classifier(hp)
    assert learner.backbones["teacher_backbone"] is learner.ema.net.backbone
    assert learner.classifiers["teacher_supervised_head"] is learner.ema.net.supervised_head
    assert not any(p.requires_grad for p in learner.ema.parameters())
    optimized = {
        id(p) for p in learner.configure_optimizers()["optimizer"].param_groups[0]["params"]
    }
    assert not optimized & {id(p) for p in learner.ema.parameters()}
    # One EMA step after the student moved: teacher = 0.9 * teacher + 0.1 * student.
    learner.ema.update(learner.net)  # the first call copies the student
    before = learner.ema.net.supervised_head.weight.clone()
    with torch.no_grad():
        learner.supervised_head.weight.add_(1.0)
    learner.ema.update(learner.net)
    expected = 0.9 * before + 0.1 * learner.supervised_head.weight
    assert torch.allclose(learner.ema.net.supervised_head.weight, expected, atol=1e-6)


class _Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int):
        torch.manual_seed(index)
        return torch.randn(3, 32, 32), index % 3


def test_the_ema_teacher_moves_once_per_optimizer_step_under_gradient_accumulation():
    hp = _hparams()
    hp["model"]["ema"] = {"decay": 0.5}
    hp["lr_scheduler"] = None
    learner = build_classifier(hp)
    updates = []
    original = learner.ema.update
    learner.ema.update = lambda net: (updates.append(learner.global_step), original(net))
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(learner, train_dataloaders={"supervised": loader})
    assert trainer.global_step == 3  # 6 batches, 3 optimizer steps
    assert updates == [1, 2, 3]  # one EMA update after each optimizer step


def test_pretrained_weights_skip_a_classifier_of_another_size(tmp_path, caplog):
    source = build_classifier(_hparams(num_classes=3))
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = build_classifier(_hparams(num_classes=5))
    before = target.supervised_head.weight.clone()
    with caplog.at_level("WARNING"):
        load_pretrained_weights(target, str(path))
    assert "supervised_head.weight" in caplog.text  # named in the warning
    assert torch.equal(target.supervised_head.weight, before)  # kept its own 5-class layer
    for (name, p), q in zip(
        target.backbone.named_parameters(), source.backbone.parameters(), strict=True
    ):
        assert torch.equal(p, q), name  # the backbone came from the checkpoint


def test_pretrained_weights_of_the_older_key_layout_still_load(tmp_path):
    source = build_classifier(_hparams())
    old = {k.removeprefix("net."): v for k, v in source.state_dict().items()}
    assert "backbone.model.conv1.weight" in old or any(k.startswith("backbone.") for k in old)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old}, path)
    target = build_classifier(_hparams())
    load_pretrained_weights(target, str(path))
    torch.testing.assert_close(target.supervised_head.weight, source.supervised_head.weight)


def test_pretrained_weights_reject_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as error:
        load_pretrained_weights(build_classifier(_hparams()), str(path))
    # A text file is named as what it is, not as a checkpoint that holds code.
    assert "not a file torch.save writes" in str(error.value)
    assert "never code" not in str(error.value)


def test_knn_votes_weight_the_k_nearest_labeled_features():
    knn = KNNEvaluation(bank_loader=[], k=2, temperature=0.5)
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    knn._bank = (bank, torch.tensor([0, 1, 2, 2]))
    query = F.normalize(torch.tensor([[1.0, 0.1]]), dim=1)
    votes = knn.scores(query, num_classes=3)
    similarity = query @ bank.T  # the two nearest are bank rows 0 (class 0) and 1 (class 1)
    expected = torch.zeros(1, 3)
    expected[0, 0] = math.exp(similarity[0, 0] / 0.5)
    expected[0, 1] = math.exp(similarity[0, 1] / 0.5)
    torch.testing.assert_close(votes, expected)
    assert votes.argmax().item() == 0


@pytest.mark.parametrize("knn", [{"k": 0}, {"temperature": 0.0}, {"neighbours": 5}])
def test_bad_knn_settings_are_refused(knn):
    with pytest.raises(ValueError, match="learner.hparams.knn"):
        KNNEvaluation([], **knn_options({"knn": knn}))


def test_soft_targets_train_and_count_as_their_argmax():
    learner = build_classifier(_hparams(num_classes=3))
    images = torch.randn(4, 3, 32, 32)
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    total, logs = learner.compute_losses({"supervised": (images, soft)}, step=0)
    expected = F.cross_entropy(logs["logits"], soft)
    torch.testing.assert_close(total, expected)


def test_uint8_batches_are_normalized_on_the_device_and_made_channels_last():
    normalization = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    learner = build_classifier(
        {**_hparams(), "input_normalization": normalization, "channels_last": True}
    )
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    targets = torch.tensor([0, 1])
    batch = learner.on_after_batch_transfer({"supervised": (pixels, targets), "x": [pixels]}, 0)
    images, kept = batch["supervised"]
    mean = torch.tensor(normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(images, (pixels.float() / 255 - mean) / std)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(kept, targets)  # labels are not images
    assert batch["x"][0].dtype == torch.float32


def test_uint8_batches_without_normalization_are_an_error():
    learner = build_classifier(_hparams())
    with pytest.raises(ValueError, match="input_normalization"):
        learner.prepare_batch(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_compile_keeps_checkpoint_keys():
    learner = build_classifier({**_hparams(), "compile": {"dynamic": False}})
    keys = set(learner.state_dict())
    learner.configure_model()
    assert learner.backbone._compiled_call_impl is not None
    assert set(learner.state_dict()) == keys


def test_an_lr_scheduler_spec_is_stepped_as_configured():
    learner = Classifier(
        PyTorchImageModels("test_resnet"),
        3,
        functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=LRSchedulerSpec(
            lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5), interval="epoch", frequency=2
        ),
    )
    config = learner.configure_optimizers()["lr_scheduler"]
    assert (config["interval"], config["frequency"]) == ("epoch", 2)
    assert isinstance(config["scheduler"], torch.optim.lr_scheduler.StepLR)


def _fixmatch_learner(joint_forward):
    from sesemi.models.heads import FixMatchLossHead

    torch.manual_seed(0)
    return Classifier(
        PyTorchImageModels("test_resnet"),
        3,
        functools.partial(torch.optim.SGD, lr=0.1),
        heads={
            "fixmatch": FixMatchLossHead("unlabeled", threshold=0.0, joint_forward=joint_forward)
        },
    )


def _fixmatch_batch():
    torch.manual_seed(1)
    labeled = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    weak, strong = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    return {"supervised": labeled, "unlabeled": ([weak, strong], torch.full((6,), -1))}


@pytest.mark.parametrize(("joint_forward", "passes"), [(False, 3), ("unlabeled", 2), ("all", 1)])
def test_a_joint_forward_puts_labeled_weak_and_strong_images_through_one_pass(
    joint_forward, passes
):
    learner = _fixmatch_learner(joint_forward).train()
    sizes = []
    learner.backbone.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    total, _ = learner.compute_losses(_fixmatch_batch(), step=0)
    assert len(sizes) == passes and sum(sizes) == 16  # 4 labeled + 6 weak + 6 strong images
    total.backward()  # gradients flow (the weak view's are cut by its detach)


def test_the_joint_forward_changes_only_the_batchnorm_statistics():
    # In eval mode (running statistics) every way gives the same losses; in training the joint
    # pass normalizes all 16 images together, so the running mean moves by their mean.
    batch = _fixmatch_batch()
    results = {}
    for mode in (False, "all"):
        learner = _fixmatch_learner(mode).eval()
        total, logs = learner.compute_losses(batch, step=0)
        results[mode] = (total, logs["fixmatch_loss"])
    torch.testing.assert_close(results[False][0], results["all"][0])
    torch.testing.assert_close(results[False][1], results["all"][1])
    joint = _fixmatch_learner("all").train()
    bn = next(m for m in joint.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv_input = []
    bn.register_forward_pre_hook(lambda module, args: conv_input.append(args[0].detach()))
    before = bn.running_mean.clone()
    joint.compute_losses(batch, step=0)
    (seen,) = conv_input
    assert len(seen) == 16
    expected = (1 - bn.momentum) * before + bn.momentum * seen.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected)


def _rotation_learner(joint_forward):
    torch.manual_seed(0)
    head = RotationPredictionLossHead("rotation", joint_forward=joint_forward)
    return Classifier(
        PyTorchImageModels("test_resnet"),
        3,
        functools.partial(torch.optim.SGD, lr=0.1),
        heads={"rotation": head},
    )


def _rotation_batch():
    torch.manual_seed(1)
    labeled = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    unlabeled = [(torch.randn(3, 32, 32), -1) for _ in range(3)]
    return {"supervised": labeled, "rotation": RotationTransformer()(unlabeled)}


@pytest.mark.parametrize(("joint_forward", "passes"), [(False, 2), (True, 1)])
def test_a_joint_forward_puts_labeled_and_rotated_images_through_one_pass(joint_forward, passes):
    learner = _rotation_learner(joint_forward).train()
    sizes = []
    learner.backbone.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    total, logs = learner.compute_losses(_rotation_batch(), step=0)
    assert len(sizes) == passes and sum(sizes) == 16  # 4 labeled + 3 images x 4 rotations
    total.backward()
    assert learner.heads["rotation"].fc.weight.grad.abs().sum() > 0  # the head learns from it


def test_a_joint_rotation_pass_gives_the_same_losses_in_eval_mode():
    # Running statistics: the joint pass changes nothing but which batch BatchNorm normalizes by.
    batch = _rotation_batch()
    losses = [
        _rotation_learner(mode).eval().compute_losses(batch, step=0)[1]["rotation_loss"]
        for mode in (False, True)
    ]
    torch.testing.assert_close(losses[0], losses[1])
    train = [
        _rotation_learner(mode).train().compute_losses(batch, step=0) for mode in (False, True)
    ]
    assert not torch.allclose(train[0][1]["rotation_loss"], train[1][1]["rotation_loss"])


def test_a_rotation_pass_without_update_bn_stats_leaves_the_running_statistics_to_the_labeled():
    batch = _rotation_batch()
    moved = {}
    for update in (True, False):
        torch.manual_seed(0)
        head = RotationPredictionLossHead("rotation", update_bn_stats=update)
        learner = Classifier(
            PyTorchImageModels("test_resnet"),
            3,
            functools.partial(torch.optim.SGD, lr=0.1),
            heads={"rotation": head},
        ).train()
        bns = [m for m in learner.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        seen = []  # each pass's input to the first BatchNorm layer
        bns[0].register_forward_pre_hook(
            lambda module, args, seen=seen: seen.append(args[0].detach())
        )
        before = bns[0].running_mean.clone()
        _, logs = learner.compute_losses(batch, step=0)
        labeled, rotated = seen
        momentum = bns[0].momentum
        after_labeled = (1 - momentum) * before + momentum * labeled.mean(dim=(0, 2, 3))
        if update:  # the rotated pass moved the statistics on from there
            expected = (1 - momentum) * after_labeled + momentum * rotated.mean(dim=(0, 2, 3))
        else:
            expected = after_labeled
        torch.testing.assert_close(bns[0].running_mean, expected)
        assert all(bn.momentum == 0.1 for bn in bns)  # restored
        assert all(int(bn.num_batches_tracked) == (2 if update else 1) for bn in bns)
        moved[update] = logs["rotation_loss"]
    # The rotated batch is still normalized by its own statistics: the loss is the same.
    torch.testing.assert_close(moved[True], moved[False])


def test_a_joint_rotation_pass_needs_the_trained_backbone():
    with pytest.raises(ValueError, match="joint_forward runs the trained backbone"):
        RotationPredictionLossHead(
            "rotation", input_backbone="teacher_backbone", joint_forward=True
        )
    with pytest.raises(ValueError, match="joint_forward must be true or false"):
        RotationPredictionLossHead("rotation", joint_forward="all")
    assert RotationPredictionLossHead("rotation").update_bn_stats is False  # the default
    assert RotationPredictionLossHead("rotation", joint_forward=True).update_bn_stats is True
    with pytest.raises(ValueError, match="use update_bn_stats: true with it"):
        RotationPredictionLossHead("rotation", joint_forward=True, update_bn_stats=False)


def test_one_step_epochs_do_not_write_the_model_every_step(tmp_path):
    from sesemi.callbacks import LastCheckpoint

    class Counting(LastCheckpoint):
        saves: list[int] = []

        def save(self, trainer, mid_epoch=False):
            before = self._saved_step
            super().save(trainer, mid_epoch)
            if self._saved_step != before:
                self.saves.append(trainer.global_step)

    hp = _hparams()
    hp["lr_scheduler"] = None
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=12)  # one step per epoch
    last = Counting(str(tmp_path), min_seconds=3600)
    trainer = pl.Trainer(
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[last],
    )
    trainer.fit(build_classifier(hp), train_dataloaders={"supervised": loader})
    assert last.saves == [6]  # not after each of the 6 epochs: once, at the end
    assert torch.load(last.path, map_location="cpu", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("bar_class", [StepsRichProgressBar, StepsTQDMProgressBar])
def test_the_progress_bar_of_a_run_in_steps_counts_the_runs_steps(tmp_path, bar_class):
    # Lightning's own label of an endless-epoch run reads "Epoch 1/-2"; ours names the step.
    from pytorch_lightning.demos.boring_classes import BoringModel, RandomDataset

    class TwoBatchEpochs(BoringModel):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(RandomDataset(32, 4), batch_size=2)

    bar = bar_class()
    trainer = pl.Trainer(
        max_epochs=-1,
        max_steps=3,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(TwoBatchEpochs())
    if bar_class is StepsTQDMProgressBar:
        label = bar.train_progress_bar.desc
    else:
        label = bar.progress.tasks[bar.train_progress_bar_id].description
    assert label.strip().rstrip(":") == "Epoch 1 · step 3/3"  # the last step, 2nd epoch
    epochs = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False)
    assert run_description(epochs) is None  # a run in epochs keeps Lightning's "Epoch 0/1"


def test_cdmad_evaluation_subtracts_the_reference_images_logits_and_training_does_not():
    from sesemi.models.net import ClassifierNet

    torch.manual_seed(0)
    black = [-1.0, -1.0, -1.0]  # pixel 0 under mean 0.5, std 0.5
    net = ClassifierNet(PyTorchImageModels("test_resnet"), 4, reference_image=black)
    raw = ClassifierNet(net.backbone, 4)
    raw.supervised_head = net.supervised_head
    images = torch.randn(3, 3, 32, 32)
    net.eval(), raw.eval()
    with torch.no_grad():
        expected = raw(images) - raw(torch.full((1, 3, 32, 32), -1.0))
        features, logits = net.features_and_logits(images)
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(net(images), expected)
        torch.testing.assert_close(features, raw.backbone(images))  # the reference's left out
        assert not torch.allclose(expected, raw(images))
        with pytest.raises(ValueError, match="1 channel value"):
            ClassifierNet(net.backbone, 4, reference_image=[0.0]).eval()(images)
    net.train(), raw.train()
    with torch.no_grad():  # training: the logits the losses read, unchanged
        torch.testing.assert_close(net(images), raw(images))


@pytest.mark.parametrize(
    "node, message",
    [
        (True, "must be null or"),
        ({"pixel": 0.0, "mean": [0.5], "std": [0.5, 0.5]}, "one positive std per channel"),
        ({"pixel": 0.0, "mean": None, "std": None}, "needs the input normalization"),
        ({"pixel": 2.0, "mean": [0.5], "std": [0.5]}, r"pixel must be in \[0, 1\]"),
        ({"pixel": 0.0, "mean": [0.5], "std": [0.5], "colour": 1}, "unknown key"),
    ],
)
def test_cdmad_reference_image_is_normalized_and_bad_nodes_are_clear_errors(node, message):
    from sesemi.build import reference_image

    node_ok = {"pixel": 0.25, "mean": [0.5, 0.25], "std": [0.5, 0.25]}
    assert reference_image({"debias_logits": node_ok}) == [-0.5, 0.0]
    assert reference_image({"debias_logits": None}) is None
    with pytest.raises(ValueError, match=message):
        reference_image({"debias_logits": node})


def test_cdmad_without_a_pseudo_labelling_head_warns_that_only_evaluation_is_debiased(caplog):
    from sesemi.models.heads.fixmatch import FixMatchLossHead

    def build(heads):
        return Classifier(
            PyTorchImageModels("test_resnet"),
            3,
            functools.partial(torch.optim.SGD, lr=0.1),
            heads=heads,
            reference_image=[-1.0, -1.0, -1.0],
        )

    with caplog.at_level("WARNING", logger="sesemi.learners"):
        build({})
    assert "debiases evaluation only" in caplog.text and "method=[fixmatch,cdmad]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sesemi.learners"):
        build({"fixmatch": FixMatchLossHead("unlabeled")})
    assert "debiases evaluation only" not in caplog.text


def test_abc_evaluation_predicts_with_the_balanced_head_and_training_with_the_base_one():
    from sesemi.models.net import ClassifierNet

    torch.manual_seed(0)
    net = ClassifierNet(PyTorchImageModels("test_resnet"), 4, balanced_head=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        net.eval()
        features, logits = net.features_and_logits(images)
        torch.testing.assert_close(logits, net.balanced_head(net.backbone(images)))
        assert not torch.allclose(logits, net.supervised_head(features))
        net.train()
        torch.testing.assert_close(net(images), net.supervised_head(net.backbone(images)))
    # With CDMAD's reference image too, evaluation debiases the balanced head's logits.
    debiased = ClassifierNet(net.backbone, 4, reference_image=[-1.0] * 3, balanced_head=True)
    debiased.balanced_head = net.balanced_head
    debiased.eval(), net.eval()
    with torch.no_grad():
        expected = net(images) - net(torch.full((1, 3, 32, 32), -1.0))
        torch.testing.assert_close(debiased(images), expected)


def test_a_balanced_head_that_no_loss_head_trains_is_a_clear_error():
    from sesemi.models.heads.abc import ABCLossHead
    from sesemi.models.heads.fixmatch import FixMatchLossHead

    def build(heads):
        return Classifier(
            PyTorchImageModels("test_resnet"),
            3,
            functools.partial(torch.optim.SGD, lr=0.1),
            heads=heads,
            balanced_head=True,
            class_counts={"supervised": [3, 2, 1]},
        )

    with pytest.raises(ValueError, match="no loss head trains it"):
        build({"fixmatch": FixMatchLossHead("unlabeled")})
    learner = build({"fixmatch": FixMatchLossHead("unlabeled"), "abc": ABCLossHead("unlabeled", 9)})
    assert learner.classifiers["balanced_head"] is learner.net.balanced_head
    torch.testing.assert_close(learner.heads["abc"].keep, torch.tensor([1 / 3, 0.5, 1.0]))
    assert build({}).net.balanced_head is not None  # evaluation runs build no heads
