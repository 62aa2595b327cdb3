"""Learning-rate and loss-weight schedules: closed forms, stepping a real optimizer, resuming."""

from __future__ import annotations

import math

import pytest
import torch

from sesemi.schedulers.lr import PolynomialLR, polynomial_lr
from sesemi.schedulers.weight import LinearRampupScheduler, SigmoidRampupScheduler

BASE, WARM_LR, WARM, MAX, POW = 0.4, 0.01, 10, 50, 0.5


def closed_form(step: int, base: float = BASE) -> float:
    """The schedule written out independently of the module under test."""
    if step < WARM:
        return WARM_LR + (base - WARM_LR) * step / WARM
    if step >= MAX:
        return 0.0
    return base * (1 - (step - WARM) / (MAX - WARM)) ** POW


def make_optimizer(*lrs: float) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def make_scheduler(optimizer: torch.optim.Optimizer, **kwargs) -> PolynomialLR:
    args = {"max_iters": MAX, "warmup_iters": WARM, "warmup_lr": WARM_LR, "lr_pow": POW}
    args.update(kwargs)
    return PolynomialLR(optimizer, **args)


def lr_after(steps: int, *lrs: float, **kwargs) -> list[float]:
    optimizer = make_optimizer(*lrs)
    scheduler = make_scheduler(optimizer, **kwargs)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, WARM_LR),
        (5, WARM_LR + (BASE - WARM_LR) * 0.5),  # halfway through warm-up
        (WARM, BASE),
        (20, BASE * 0.75**0.5),  # progress 10/40
        (40, BASE * 0.25**0.5),  # progress 30/40
        (MAX, 0.0),
        (MAX + 7, 0.0),
    ],
)
def test_polynomial_lr_closed_form(step: int, expected: float) -> None:
    assert polynomial_lr(step, BASE, WARM, WARM_LR, POW, MAX) == pytest.approx(expected)


def test_polynomial_lr_linear_decay_power_one() -> None:
    assert polynomial_lr(30, 1.0, 10, 0.0, 1.0, 50) == pytest.approx(0.5)
    assert polynomial_lr(0, 1.0, 0, 0.0, 1.0, 50) == pytest.approx(1.0)  # no warm-up


@pytest.mark.parametrize("steps", [0, 1, 5, WARM, 11, 20, 40, MAX - 1, MAX, MAX + 5])
def test_scheduler_drives_sgd_along_closed_form(steps: int) -> None:
    assert lr_after(steps, BASE) == [pytest.approx(closed_form(steps))]


def test_scheduler_sequence_matches_closed_form() -> None:
    optimizer = make_optimizer(BASE)
    scheduler = make_scheduler(optimizer)
    seen = []
    for _ in range(MAX + 3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == [pytest.approx(closed_form(s)) for s in range(MAX + 3)]
    assert seen[0] == pytest.approx(WARM_LR)
    assert max(seen) == pytest.approx(BASE)
    assert seen[WARM:MAX] == sorted(seen[WARM:MAX], reverse=True)


def test_param_groups_follow_their_own_base() -> None:
    for steps in (0, 5, WARM, 30, MAX):
        low, high = lr_after(steps, 0.1, 1.0)
        assert low == pytest.approx(closed_form(steps, base=0.1))
        assert high == pytest.approx(closed_form(steps, base=1.0))


def test_warmup_epochs_times_iters_per_epoch() -> None:
    scheduler = make_scheduler(
        make_optimizer(BASE), warmup_iters=None, warmup_epochs=2, iters_per_epoch=7
    )
    assert scheduler.warmup_iters == 14
    assert lr_after(7, BASE, warmup_iters=None, warmup_epochs=2, iters_per_epoch=7) == [
        pytest.approx(WARM_LR + (BASE - WARM_LR) * 7 / 14)
    ]
    assert lr_after(14, BASE, warmup_iters=None, warmup_epochs=2, iters_per_epoch=7) == [
        pytest.approx(BASE)
    ]


def test_no_warmup_starts_at_base() -> None:
    assert lr_after(0, BASE, warmup_iters=None) == [pytest.approx(BASE)]


def test_both_warmup_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="not both"):
        make_scheduler(make_optimizer(BASE), warmup_epochs=1, iters_per_epoch=5)


def test_warmup_epochs_needs_iters_per_epoch() -> None:
    with pytest.raises(ValueError, match="iters_per_epoch"):
        make_scheduler(make_optimizer(BASE), warmup_iters=None, warmup_epochs=1)


def test_warmup_longer_than_run_is_shortened_with_warning() -> None:
    with pytest.warns(UserWarning, match=r"warm-up \(60 iterations\).*\(50\)"):
        scheduler = make_scheduler(make_optimizer(BASE), warmup_iters=60)
    assert scheduler.warmup_iters == MAX
    # The warm-up now spans the whole run: halfway through it is halfway to the base rate.
    with pytest.warns(UserWarning, match="warm-up"):
        lrs = lr_after(25, BASE, warmup_iters=60)
    assert lrs == [pytest.approx(WARM_LR + (BASE - WARM_LR) / 2)]


def test_warmup_as_long_as_run_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    make_scheduler(make_optimizer(BASE), warmup_iters=MAX)
    assert not [w for w in recwarn if "warm-up" in str(w.message)]


@pytest.mark.parametrize("stop", [3, WARM + 5])
def test_resume_from_state_dict_continues_sequence(stop: int) -> None:
    reference_opt = make_optimizer(BASE)
    reference = make_scheduler(reference_opt)
    reference_lrs = []
    for _ in range(30):
        reference_opt.step()
        reference.step()
        reference_lrs.append(reference_opt.param_groups[0]["lr"])

    first_opt = make_optimizer(BASE)
    first = make_scheduler(first_opt)
    for _ in range(stop):
        first_opt.step()
        first.step()
    state = first.state_dict()

    resumed_opt = make_optimizer(BASE)
    resumed = make_scheduler(resumed_opt)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == stop
    resumed_lrs = []
    for _ in range(30 - stop):
        resumed_opt.step()
        resumed.step()
        resumed_lrs.append(resumed_opt.param_groups[0]["lr"])
    assert resumed_lrs == [pytest.approx(lr) for lr in reference_lrs[stop:]]


def test_sigmoid_rampup() -> None:
    ramp = SigmoidRampupScheduler(weight=2.0, stop_rampup=20)
    assert ramp(0) == pytest.approx(2.0 * math.exp(-5.0))
    assert ramp(10) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert ramp(20) == pytest.approx(2.0)
    assert ramp(100) == pytest.approx(2.0)
    values = [ramp(s) for s in range(30)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] < values[19] < values[20]


def test_sigmoid_rampup_disabled() -> None:
    assert SigmoidRampupScheduler(weight=3.0, stop_rampup=0)(0) == 3.0


def test_linear_rampup() -> None:
    ramp = LinearRampupScheduler(weight=2.0, stop_rampup=10)
    assert ramp(0) == 0.0
    assert ramp(5) == pytest.approx(1.0)
    assert ramp(10) == pytest.approx(2.0)
    assert ramp(50) == pytest.approx(2.0)
    assert LinearRampupScheduler(weight=0.7, stop_rampup=0)(0) == pytest.approx(0.7)
