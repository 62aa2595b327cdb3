"""plan_devices: the spec's run.gpus / run.accelerator mapped onto Lightning 2 arguments."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import torch

import sesemi.devices
from sesemi.data import LoaderSpec
from sesemi.devices import DevicePlan, choose_channels_last, plan_devices


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    saved = set(sesemi.devices._warned)
    sesemi.devices._warned.clear()
    yield
    sesemi.devices._warned.clear()
    sesemi.devices._warned.update(saved)


@pytest.fixture
def gpus_available(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    def set_count(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return set_count


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sesemi.devices" and r.levelno == logging.WARNING
    ]


# ---------------------------------------------------------------- no GPU


def test_all_gpus_without_any_falls_back_to_cpu_warning_once(
    gpus_available, caplog: pytest.LogCaptureFixture
) -> None:
    gpus_available(0)
    with caplog.at_level(logging.WARNING, logger="sesemi.devices"):
        first = plan_devices(-1)
        second = plan_devices(-1)
    for plan in (first, second):
        assert plan.accelerator == "cpu"
        assert plan.devices == 1
        assert plan.num_gpus == 0
        assert plan.strategy == "auto"
        assert plan.world_size == 1
    messages = warnings_of(caplog)
    assert len(messages) == 1
    assert "no GPU" in messages[0] and "CPU" in messages[0]


@pytest.mark.parametrize("gpus", [0, None, "0", []])
def test_cpu_requested_no_warning(gpus, gpus_available, caplog) -> None:
    gpus_available(0)
    with caplog.at_level(logging.WARNING, logger="sesemi.devices"):
        plan = plan_devices(gpus)
    assert plan.trainer_kwargs() == {
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "num_nodes": 1,
    }
    assert warnings_of(caplog) == []


def test_cpu_requested_with_gpus_present_stays_on_cpu(gpus_available, caplog) -> None:
    gpus_available(4)
    with caplog.at_level(logging.WARNING, logger="sesemi.devices"):
        plan = plan_devices(0)
    assert plan.accelerator == "cpu" and plan.num_gpus == 0
    assert warnings_of(caplog) == []


def test_dp_on_single_device_warns_once(gpus_available, caplog) -> None:
    gpus_available(0)
    with caplog.at_level(logging.WARNING, logger="sesemi.devices"):
        plans = [plan_devices(0, accelerator="dp") for _ in range(3)]
    assert all(p.strategy == "auto" for p in plans)
    messages = warnings_of(caplog)
    assert len(messages) == 1
    assert "Lightning 2" in messages[0] and "dp" in messages[0]


def test_dp_on_several_gpus_becomes_ddp_with_warning(gpus_available, caplog) -> None:
    gpus_available(4)
    with caplog.at_level(logging.WARNING, logger="sesemi.devices"):
        plan = plan_devices(2, accelerator="dp")
        plan_devices(2, accelerator="dp")
    assert plan.strategy == "ddp"
    messages = warnings_of(caplog)
    assert len(messages) == 1
    assert "ddp" in messages[0] and "Lightning 2" in messages[0]


# ---------------------------------------------------------------- four GPUs


def test_all_gpus(gpus_available, caplog) -> None:
    gpus_available(4)
    with caplog.at_level(logging.WARNING, logger="sesemi.devices"):
        plan = plan_devices(-1)
    assert plan.accelerator == "gpu"
    assert plan.devices == 4
    assert plan.num_gpus == 4
    assert plan.strategy == "ddp"
    assert plan.world_size == 4
    assert warnings_of(caplog) == []


@pytest.mark.parametrize(("gpus", "strategy"), [(2, "ddp"), ("2", "ddp"), (1, "auto")])
def test_gpu_count(gpus, strategy, gpus_available) -> None:
    gpus_available(4)
    plan = plan_devices(gpus)
    assert plan.accelerator == "gpu"
    assert plan.devices == int(gpus)
    assert plan.num_gpus == int(gpus)
    assert plan.strategy == strategy


@pytest.mark.parametrize("gpus", ["0,1", [0, 1], " 0, 1 ", (0, 1)])
def test_gpu_ids(gpus, gpus_available) -> None:
    gpus_available(4)
    plan = plan_devices(gpus)
    assert plan.devices == [0, 1]
    assert plan.num_gpus == 2
    assert plan.strategy == "ddp"
    assert plan.world_size == 2


def test_number_string_is_count_trailing_comma_is_id(gpus_available) -> None:
    gpus_available(4)
    plan = plan_devices("3")  # a bare number is a count, "3," would be the id
    assert plan.devices == 3
    plan = plan_devices("3,")
    assert plan.devices == [3]
    assert plan.strategy == "auto"


def test_ddp_on_one_gpu_is_auto(gpus_available) -> None:
    gpus_available(4)
    assert plan_devices(1, accelerator="ddp").strategy == "auto"
    assert plan_devices(2, accelerator="ddp").strategy == "ddp"


def test_too_many_gpus(gpus_available) -> None:
    gpus_available(4)
    with pytest.raises(ValueError, match="4 available"):
        plan_devices(8)


def test_unknown_gpu_id(gpus_available) -> None:
    gpus_available(4)
    with pytest.raises(ValueError, match=r"\[7\]"):
        plan_devices("0,7")
    with pytest.raises(ValueError, match=r"\[7\]"):
        plan_devices([7, 0])


@pytest.mark.parametrize("gpus", ["a,b", True])
def test_malformed_gpus(gpus, gpus_available) -> None:
    gpus_available(4)
    with pytest.raises(ValueError, match="run.gpus"):
        plan_devices(gpus)


def test_two_nodes_one_gpu_each(gpus_available) -> None:
    gpus_available(4)
    plan = plan_devices(1, num_nodes=2)
    assert plan.strategy == "ddp"
    assert plan.world_size == 2
    assert plan.trainer_kwargs() == {
        "accelerator": "gpu",
        "devices": 1,
        "strategy": "ddp",
        "num_nodes": 2,
    }


def test_two_nodes_on_cpu(gpus_available) -> None:
    gpus_available(0)
    plan = plan_devices(0, num_nodes=2)
    assert plan.accelerator == "cpu"
    assert plan.strategy == "ddp"
    assert plan.world_size == 2


def test_loader_defaults_use_workers_on_gpus_only(image_root):
    cpu = DevicePlan("cpu", 1, "auto", num_gpus=0, num_nodes=1).loader_defaults()
    assert cpu == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    gpu = DevicePlan("gpu", 2, "ddp", num_gpus=2, num_nodes=1).loader_defaults()
    assert 1 <= gpu["num_workers"] <= 8 and gpu["pin_memory"] and gpu["persistent_workers"]

    node = {"dataset": {"name": "image_folder", "subset": "train"}, "batch_size": 2}
    auto = LoaderSpec("data.train.x", node, str(image_root), None, gpu).loader()
    assert auto.num_workers == gpu["num_workers"] and auto.pin_memory and auto.persistent_workers
    explicit = {**node, "num_workers": 0, "pin_memory": False}
    chosen = LoaderSpec("data.train.x", explicit, str(image_root), None, gpu).loader()
    assert chosen.num_workers == 0 and not chosen.pin_memory and not chosen.persistent_workers


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, caplog):
    monkeypatch.setattr(sesemi.devices, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(sesemi.devices, "_warned", set())
    cpu = DevicePlan("cpu", 1, "auto", num_gpus=0, num_nodes=1)
    with caplog.at_level(logging.WARNING, logger="sesemi.devices"):
        sesemi.devices.warn_slow_cpu_precision(cpu, "32-true")
        assert not caplog.records
        sesemi.devices.warn_slow_cpu_precision(cpu, "bf16-mixed")
    assert "bf16 instructions" in caplog.text
    caplog.clear()
    monkeypatch.setattr(sesemi.devices, "_warned", set())
    monkeypatch.setattr(sesemi.devices, "cpu_has_bf16", lambda: True)
    sesemi.devices.warn_slow_cpu_precision(cpu, "bf16-mixed")
    assert not caplog.records


CPU_PLAN = DevicePlan("cpu", 1, "auto", 0, 1)
GPU_PLAN = DevicePlan("gpu", 1, "auto", 1, 1)


@pytest.mark.parametrize(
    ("plan", "precision", "expected"),
    [
        (CPU_PLAN, None, True),  # oneDNN's faster layout
        (CPU_PLAN, "bf16-mixed", True),
        (GPU_PLAN, None, False),  # 32-bit on a GPU: contiguous
        (GPU_PLAN, "32-true", False),
        (GPU_PLAN, "bf16-mixed", True),  # tensor cores: 1.66x on an H200
        (GPU_PLAN, "16-mixed", True),
        (GPU_PLAN, 16, True),
        (DevicePlan("mps", 1, "auto", 0, 1), "16-mixed", False),
    ],
)
def test_channels_last_auto_follows_the_device_and_precision(plan, precision, expected) -> None:
    assert choose_channels_last(None, plan, precision, False) is expected


@pytest.mark.parametrize("value", [True, False])
def test_channels_last_explicit_value_is_kept_without_compile(value) -> None:
    for plan in (CPU_PLAN, GPU_PLAN):
        assert choose_channels_last(value, plan, "bf16-mixed", False) is value


def test_channels_last_is_off_for_a_compiled_model_on_a_gpu(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="sesemi.devices"):
        assert choose_channels_last(None, GPU_PLAN, "bf16-mixed", True) is False
        assert warnings_of(caplog) == []  # auto: off, nothing to say
        for options in (True, {"mode": "max-autotune"}):
            assert choose_channels_last(True, GPU_PLAN, "bf16-mixed", options) is False
    messages = warnings_of(caplog)
    assert len(messages) == 1  # once
    assert "channels_last=true" in messages[0] and "turned off" in messages[0]
    # On the CPU a compiled channels-last model trains: the explicit value stands.
    assert choose_channels_last(True, CPU_PLAN, None, True) is True
