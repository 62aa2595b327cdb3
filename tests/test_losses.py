"""The logit-adjusted supervised loss (`supervised_loss=logit_adjusted`): its formula, its
class prior, what it does on a long-tailed problem, its state across processes and in runs."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import FAST, free_port

import sesemi
from sesemi.models.losses import LogitAdjustedCrossEntropy

LOGITS = torch.tensor([[2.0, 0.5], [0.1, 0.3], [-1.0, 1.0], [0.0, 0.0]])
TARGETS = torch.tensor([0, 0, 0, 1])


def test_the_loss_is_cross_entropy_on_the_logits_plus_tau_log_prior():
    loss = LogitAdjustedCrossEntropy(2, tau=0.5, reduction="none").train()
    got = loss(LOGITS, TARGETS)
    # The batch is counted first: prior (3/4, 1/4).
    shift = 0.5 * torch.tensor([math.log(0.75), math.log(0.25)])
    torch.testing.assert_close(got, F.cross_entropy(LOGITS + shift, TARGETS, reduction="none"))
    # The rare class's own loss is larger than plain cross-entropy's, the common class's smaller.
    plain = F.cross_entropy(LOGITS, TARGETS, reduction="none")
    assert got[3] > plain[3] and (got[:3] < plain[:3]).all()


def test_the_prior_counts_every_training_batch_and_eval_is_plain_cross_entropy():
    loss = LogitAdjustedCrossEntropy(3).train()
    assert loss.prior().tolist() == pytest.approx([1 / 3] * 3)  # uniform before any batch
    loss(torch.zeros(2, 3), torch.tensor([0, 1]))
    loss(torch.zeros(2, 3), torch.tensor([0, 0]))
    assert loss.labeled_counts.tolist() == [3.0, 1.0, 0.0]
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    loss.eval()
    torch.testing.assert_close(
        loss(logits, torch.tensor([0, 1, 2, 1])),
        F.cross_entropy(logits, torch.tensor([0, 1, 2, 1])),
    )
    assert loss.labeled_counts.tolist() == [3.0, 1.0, 0.0]  # eval does not count
    loss.train()
    targets = torch.tensor([0, 1, 0, 1])  # counted first: (5, 3, 0)
    # Class 2, never seen, is shifted as the rarest class seen (3 / 8), not by log 0.
    expected = F.cross_entropy(logits + torch.tensor([5 / 8, 3 / 8, 3 / 8]).log(), targets)
    torch.testing.assert_close(loss(logits, targets), expected)
    assert loss.labeled_counts.tolist() == [5.0, 3.0, 0.0]


def test_soft_targets_count_their_probabilities_and_tau_0_is_cross_entropy():
    loss = LogitAdjustedCrossEntropy(2, tau=0.0).train()
    soft = torch.tensor([[0.75, 0.25], [1.0, 0.0], [0.0, 1.0], [0.25, 0.75]])
    torch.testing.assert_close(loss(LOGITS, soft), F.cross_entropy(LOGITS, soft))
    assert loss.labeled_counts.tolist() == [2.0, 2.0]


def _fit_line(tau: float, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 2)
    loss = LogitAdjustedCrossEntropy(2, tau=tau).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        optimizer.zero_grad()
        loss(model(x), y).backward()
        optimizer.step()
    return model


def test_on_a_long_tailed_problem_the_rare_class_is_recalled_and_the_balance_rises():
    # Two overlapping Gaussians, N(-1, 1) and N(+1, 1), 9 : 1 in training, balanced in test.
    # Plain cross-entropy moves the boundary towards the rare class (Bayes: x = ln(9) / 2 =
    # 1.1; rare recall ~46 %); the adjusted loss keeps it at the balanced boundary x = 0 (~84 %).
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(900, 1, generator=generator) - 1, torch.randn(100, 1) + 1])
    y = torch.cat([torch.zeros(900), torch.ones(100)]).long()
    test_x = torch.cat([torch.randn(2000, 1, generator=generator) - 1, torch.randn(2000, 1) + 1])
    test_y = torch.cat([torch.zeros(2000), torch.ones(2000)]).long()
    recalls = {}
    for tau in (0.0, 1.0):
        predicted = _fit_line(tau, x, y)(test_x).argmax(dim=1)
        recalls[tau] = [(predicted[test_y == c] == c).float().mean().item() for c in (0, 1)]
    assert recalls[0.0][1] < 0.6 and recalls[1.0][1] > 0.75
    assert sum(recalls[1.0]) / 2 > sum(recalls[0.0]) / 2 + 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 2, "tau": -1.0}, "tau must be at least 0"),
        ({"num_classes": 0}, "num_classes must be at least 1"),
        ({"num_classes": 2, "reduction": "max"}, "unknown reduction 'max'"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LogitAdjustedCrossEntropy(**kwargs)


def test_logits_of_another_class_count_are_a_clear_error():
    with pytest.raises(ValueError, match="set its num_classes to the classifier's"):
        LogitAdjustedCrossEntropy(3)(LOGITS, TARGETS)


def _ddp_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loss = LogitAdjustedCrossEntropy(2, reduction="none").train()
        half = slice(2 * rank, 2 * rank + 2)  # each process has half of the batch
        out[rank] = (loss(LOGITS[half], TARGETS[half]), loss.labeled_counts.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_every_process_adjusts_by_the_prior_of_the_whole_batch():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(free_port(), out), nprocs=2, join=True)
    alone = LogitAdjustedCrossEntropy(2, reduction="none").train()
    whole = alone(LOGITS, TARGETS)
    for rank in (0, 1):
        torch.testing.assert_close(out[rank][1], alone.labeled_counts)
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), whole)


def test_a_run_with_the_logit_adjusted_loss_saves_its_prior_and_predicts(
    digits_root, tmp_path, one_thread
):
    overrides = [
        "method=supervised",
        "supervised_loss=logit_adjusted",
        f"run.data_root={digits_root}",
        f"run.dir={tmp_path / 'runs'}",
        *FAST,
    ]
    result = sesemi.fit(sesemi.compose("demo", overrides))
    state = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    counts = state["state_dict"]["supervised_loss.labeled_counts"]
    assert counts.shape == (10,) and counts.sum().item() == 2 * 4  # 2 steps of 4 labeled images
    model = sesemi.load_classifier(result.last_checkpoint)
    images = sorted((digits_root / "val").glob("*/*.png"))[:3]
    assert len(model.predict(images)) == 3
