"""The timm backbone and the rotation-prediction loss head, on timm's tiny test models."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sesemi.collation import RotationTransformer
from sesemi.models.backbones import PyTorchImageModels
from sesemi.models.heads import HeadContext, HeadInputs, RotationPredictionLossHead

# Tiny timm models that run at 32x32; test_mambaout has a pre-logits MLP whose width differs
# from `num_features`, so it pins down that out_features is the width actually returned.
TINY_MODELS = ["test_resnet", "test_efficientnet", "test_vit", "test_convnext", "test_mambaout"]


def batchnorm_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{buffer}": getattr(m, buffer).clone()
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buffer in ("running_mean", "running_var")
    }


@pytest.mark.parametrize("name", TINY_MODELS)
def test_out_features_is_output_width(name: str) -> None:
    torch.manual_seed(0)
    backbone = PyTorchImageModels(name)
    features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, backbone.out_features)
    assert backbone.name == name


def test_out_features_feeds_a_linear_layer() -> None:
    backbone = PyTorchImageModels("test_mambaout")
    logits = nn.Linear(backbone.out_features, 3)(backbone(torch.randn(2, 3, 32, 32)))
    assert logits.shape == (2, 3)


@pytest.mark.parametrize(("pool", "reduce"), [("avg", torch.mean), ("max", torch.amax)])
def test_global_pool_and_kwargs_forwarded(pool, reduce) -> None:
    # The pooled features are the pooling of the last feature map, so "max" and "avg" differ.
    torch.manual_seed(0)
    backbone = PyTorchImageModels("test_resnet", global_pool=pool, in_chans=1).eval()
    images = torch.randn(2, 1, 32, 32)
    first = next(m for m in backbone.model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1  # in_chans reached timm
    feature_map = backbone.model.forward_features(images)
    torch.testing.assert_close(backbone(images), reduce(feature_map, dim=(2, 3)))


def test_spec_rebuilds_the_same_architecture() -> None:
    backbone = PyTorchImageModels("test_resnet", global_pool="max", drop_rate=0.3, in_chans=1)
    spec = backbone.spec()
    assert spec == {"name": "test_resnet", "global_pool": "max", "drop_rate": 0.3, "in_chans": 1}
    rebuilt = PyTorchImageModels(**spec)
    assert rebuilt.model.state_dict().keys() == backbone.model.state_dict().keys()
    rebuilt.load_state_dict(backbone.state_dict())


def test_frozen_backbone_keeps_weights_and_batchnorm_stats() -> None:
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)

    trainable = PyTorchImageModels("test_resnet").train()
    before = batchnorm_buffers(trainable)
    assert before  # test_resnet has BatchNorm layers, so the check below means something
    trainable(images)
    after = batchnorm_buffers(trainable)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    frozen = PyTorchImageModels("test_resnet", freeze=True)
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]
    frozen.train()
    assert frozen.training
    assert not frozen.model.training
    before = batchnorm_buffers(frozen)
    frozen(images)
    after = batchnorm_buffers(frozen)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="resnet5O") as error:
        PyTorchImageModels("resnet5O")
    assert "resnet50" in str(error.value)


def test_pretrained_offline_gives_clear_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline for certain: the hub's constants are read at import, so patch them as well as
    # the environment, use an empty cache, and refuse any socket connection outright.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    with pytest.raises(RuntimeError) as error:
        PyTorchImageModels("test_resnet", pretrained=True)
    message = str(error.value)
    assert "test_resnet" in message
    assert "pretrained_cfg_overlay" in message
    assert "network access attempted" not in message  # offline mode stopped it first
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def test_rotation_head_losses_match_cross_entropy() -> None:
    torch.manual_seed(0)
    backbone = PyTorchImageModels("test_resnet")
    head = RotationPredictionLossHead("rotation")
    head.build(HeadContext({"backbone": backbone}, {}, num_classes=3))
    assert isinstance(head.fc, nn.Linear)
    assert (head.fc.in_features, head.fc.out_features) == (backbone.out_features, 4)

    samples = [(torch.rand(3, 32, 32), 0) for _ in range(3)]
    images, labels = RotationTransformer()(samples)
    inputs = HeadInputs(
        data={"rotation": (images, labels)}, backbones={"backbone": backbone}, heads={}
    )

    backbone.eval()  # fixed BatchNorm statistics, so both forward passes agree
    losses = head(inputs)
    assert losses.shape == (12,)

    logits = head.fc(backbone(images))
    expected = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(losses, expected, atol=1e-6)
    assert "top1" in head.log_values
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    assert head.log_values["top1"].item() == pytest.approx(accuracy.item())

    backbone.zero_grad()
    losses.mean().backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0


def test_rotation_head_reads_its_named_inputs() -> None:
    torch.manual_seed(0)
    student, other = PyTorchImageModels("test_resnet"), PyTorchImageModels("test_vit")
    head = RotationPredictionLossHead("rot_data", input_backbone="other", num_rotations=2)
    head.build(HeadContext({"backbone": student, "other": other}, {}, num_classes=3))
    assert head.fc.in_features == other.out_features and head.fc.out_features == 2
    batch = RotationTransformer(num_rotations=2)([torch.rand(3, 32, 32) for _ in range(2)])
    inputs = HeadInputs(
        data={"rot_data": batch, "supervised": None},
        backbones={"backbone": student, "other": other},
        heads={},
    )
    losses = head(inputs)
    assert losses.shape == (4,)
    losses.sum().backward()
    assert all(p.grad is None for p in student.parameters())
    assert any(p.grad is not None for p in other.parameters())


def test_pretrained_weights_from_a_local_file(tmp_path: Path) -> None:
    # timm's full model (with a 5-class classifier) saved as a plain state dict, as a user who
    # downloaded weights elsewhere would have them; the classifier is dropped (num_classes=0).
    source = timm.create_model("test_resnet", num_classes=5)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = PyTorchImageModels(
        "test_resnet", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    )
    loaded, expected = backbone.model.state_dict(), source.state_dict()
    assert loaded and all(torch.equal(v, expected[k]) for k, v in loaded.items())
    fresh = PyTorchImageModels("test_resnet").model.state_dict()
    assert not all(torch.equal(v, fresh[k]) for k, v in loaded.items())  # not the init


def test_missing_local_pretrained_file_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        PyTorchImageModels("test_resnet", pretrained=True, pretrained_cfg_overlay={"file": missing})
