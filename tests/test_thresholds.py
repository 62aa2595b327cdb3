"""FreeMatch's, SoftMatch's, distribution alignment's and DebiasPL's policies against their
formulas on hand-made probabilities, their state in checkpoints, and the same state on every DDP
process."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from sesemi.models.heads import HeadContext
from sesemi.models.heads.thresholds import (
    DebiasedThreshold,
    DistributionAlignment,
    FixedThreshold,
    FlexMatchThreshold,
    FreeMatchThreshold,
    SoftMatchWeight,
)

PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],
        [0.10, 0.85, 0.05],
        [0.30, 0.30, 0.40],
        [0.96, 0.02, 0.02],
    ]
)

LABELS = torch.tensor([0, 2, 1, 2])  # a labeled batch: class frequencies 1/4, 1/4, 1/2


def _built(policy):
    policy.build(HeadContext({}, {}, num_classes=3, dataset_sizes={"u": 8}), "u")
    return policy


def test_freematch_moves_its_state_first_then_masks_with_the_class_thresholds():
    policy = _built(FreeMatchThreshold(momentum=0.5, fairness_weight=0.0)).train()
    _, weights = policy(PROBS)
    # tau, p, h start at 1/3 and move halfway to the batch's means.
    tau = 0.5 / 3 + 0.5 * (0.70 + 0.85 + 0.40 + 0.96) / 4
    p = [0.5 / 3 + 0.5 * PROBS[:, c].mean().item() for c in range(3)]
    h = [0.5 / 3 + 0.5 * n / 4 for n in (2, 1, 1)]  # argmax: 0, 1, 2, 0
    assert policy.global_threshold.item() == pytest.approx(tau)
    assert policy.class_prediction.tolist() == pytest.approx(p)
    assert policy.label_histogram.tolist() == pytest.approx(h)
    thresholds = [tau * pc / max(p) for pc in p]
    expected = [float(PROBS[i].max() >= thresholds[PROBS[i].argmax()]) for i in range(4)]
    assert weights.tolist() == expected
    assert policy.logged["global_threshold"].item() == pytest.approx(tau)
    # Momentum 0: the state is the batch's. Class 0 is predicted confidently on average, so its
    # threshold is the global one (0.7275) and its 0.70 image is left out, while the 0.40 image
    # of the rarely predicted class 2 (threshold 0.7275 * 0.1425 / 0.515 = 0.20) counts.
    _, weights = _built(FreeMatchThreshold(momentum=0.0)).train()(PROBS)
    assert weights.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_freematch_starts_as_the_paper_says_or_as_usb_does():
    uniform = _built(FreeMatchThreshold())
    ones = _built(FreeMatchThreshold(initial="ones"))
    assert uniform.global_threshold.item() == pytest.approx(1 / 3)
    assert ones.global_threshold.item() == 1.0 and ones.class_prediction.tolist() == [1, 1, 1]
    assert uniform.eval()(PROBS)[1].tolist() == [1.0, 1.0, 1.0, 1.0]  # all above 1/3
    assert ones.eval()(PROBS)[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # none reaches 1
    assert uniform.global_threshold.item() == pytest.approx(1 / 3)  # eval mode: no update


def test_freematch_fairness_term_matches_its_formula():
    policy = _built(FreeMatchThreshold(momentum=0.0, fairness_weight=0.1)).train()
    _, weights = policy(PROBS)
    assert weights.tolist() == [0.0, 1.0, 1.0, 1.0]
    strong = torch.tensor(
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [1.0, 1.0, 3.0], [0.5, 0.0, 0.0]], requires_grad=True
    )
    loss = policy.extra_loss(strong, weights)
    kept = strong[weights > 0].softmax(dim=1)  # images 1, 2, 3
    hist = torch.bincount(kept.argmax(dim=1), minlength=3).float() / len(kept)  # [1/3, 1/3, 1/3]
    model = policy.class_prediction / policy.label_histogram
    model = model / model.sum()
    batch = kept.mean(dim=0) * torch.where(hist > 0, 1 / hist, torch.zeros(3))
    batch = batch / batch.sum()
    expected = 0.1 * (model * torch.log(batch + 1e-12)).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert strong.grad is not None and strong.grad[0].abs().sum() == 0  # masked out
    assert strong.grad[1:].abs().sum() > 0


def test_softmatch_aligns_moves_mu_and_var_and_weighs_by_a_truncated_gaussian():
    policy = _built(SoftMatchWeight(momentum=0.5, n_sigma=2.0)).train()
    label_probs, weights = policy(PROBS)
    assert torch.equal(label_probs, PROBS)  # pseudo-labels from the unaligned predictions
    mean = PROBS.mean(dim=0)  # the first batch sets the running mean prediction
    torch.testing.assert_close(policy.class_prediction, mean)
    aligned = PROBS * (1 / 3 + 1e-6) / (mean + 1e-6)
    aligned = aligned / aligned.sum(dim=1, keepdim=True)
    confidence = aligned.max(dim=1).values
    mu = 0.5 / 3 + 0.5 * confidence.mean().item()
    var = 0.5 * 1.0 + 0.5 * confidence.var(unbiased=True).item()
    assert policy.confidence_mean.item() == pytest.approx(mu, abs=1e-6)
    assert policy.confidence_var.item() == pytest.approx(var, abs=1e-6)
    expected = [math.exp(-(min(c - mu, 0.0) ** 2) / (2 * var / 4)) for c in confidence.tolist()]
    assert weights.tolist() == pytest.approx(expected, abs=1e-6)
    assert max(weights.tolist()) == 1.0 and min(weights.tolist()) < 1.0  # truncated above mu


def test_softmatch_without_alignment_weighs_the_raw_confidence():
    policy = _built(SoftMatchWeight(momentum=0.0, uniform_alignment=False)).train()
    _, weights = policy(PROBS)
    confidence = PROBS.max(dim=1).values
    assert policy.confidence_mean.item() == pytest.approx(confidence.mean().item())
    below = (confidence - confidence.mean()).clamp(max=0)
    expected = torch.exp(-(below**2) / (2 * confidence.var() / 4))
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FreeMatchThreshold(momentum=0.5),
        lambda: SoftMatchWeight(momentum=0.5),
        lambda: FlexMatchThreshold(0.6),
        lambda: FlexMatchThreshold(0.6, learning_status="estimate"),
        lambda: DistributionAlignment(FlexMatchThreshold(0.6), window=2),
        lambda: DebiasedThreshold(0.6, momentum=0.5),
    ],
)
def test_the_state_is_in_the_state_dict_and_a_restored_policy_weighs_the_same(make):
    policy = _built(make()).train()
    policy(PROBS, torch.arange(4))
    policy(PROBS.flip(0), torch.arange(4, 8))
    restored = _built(make())
    restored.load_state_dict(policy.state_dict())
    assert policy.state_dict()  # there is state, and it moved
    policy.eval(), restored.eval()
    torch.testing.assert_close(restored(PROBS)[1], policy(PROBS)[1])


def _ddp_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        states = {}
        for name, policy in _policies().items():
            policy = _built(policy).train()
            for step in range(3):  # each process sees its half of every batch
                batch = PROBS.roll(step, dims=0)
                policy.observe_labeled(LABELS[2 * rank : 2 * rank + 2])
                policy(batch[2 * rank : 2 * rank + 2], torch.arange(2 * rank, 2 * rank + 2))
            states[name] = {k: v.clone() for k, v in policy.state_dict().items()}
        out[rank] = states
    finally:
        torch.distributed.destroy_process_group()


def _policies():
    return {
        "freematch": FreeMatchThreshold(momentum=0.5),
        "softmatch": SoftMatchWeight(momentum=0.5),
        "flexmatch_estimate": FlexMatchThreshold(0.6, learning_status="estimate"),
        "flexmatch_index": FlexMatchThreshold(0.6),
        "alignment": DistributionAlignment(FreeMatchThreshold(momentum=0.5), window=2),
        "sinkhorn": DistributionAlignment(
            FlexMatchThreshold(0.6), target="uniform", window=2, sinkhorn_iterations=3
        ),
        "debiaspl": DebiasedThreshold(0.6, momentum=0.5),
    }


def test_every_process_keeps_the_state_of_the_whole_batch():
    # Two gloo processes, each with half of every batch, end with the state one process reaches
    # on the whole batches: the statistics are reduced over processes before the update.
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(free_port(), out), nprocs=2, join=True)
    alone = {}
    for name, policy in _policies().items():
        policy = _built(policy).train()
        for step in range(3):
            policy.observe_labeled(LABELS)
            policy(PROBS.roll(step, dims=0), torch.arange(4))
        alone[name] = policy.state_dict()
    for name, state in alone.items():
        for key, value in state.items():
            torch.testing.assert_close(out[0][name][key], out[1][name][key])
            torch.testing.assert_close(out[0][name][key], value, msg=f"{name}.{key}")


def test_flexmatch_exact_status_keeps_never_confident_images_unused_and_the_estimate_does_not():
    # 1,000 images over 10 classes, 10 epochs of shuffled batches of 50; a fixed easy 46 % of
    # them is predicted confidently (its own class), the rest never. The paper's per-image status
    # keeps 54 % unused, so the warm-up holds every threshold low; the estimate's fixed point
    # q_c / q drives the unused share to 0 and the thresholds to 0.95.
    n, classes = 1000, 10
    easy = torch.arange(n) < 460
    probs = torch.full((n, classes), 0.5 / (classes - 1))
    probs[torch.arange(n), torch.arange(n) % classes] = 0.5
    probs[easy] = 0.01 / (classes - 1)
    probs[easy, torch.arange(n)[easy] % classes] = 0.99
    generator = torch.Generator().manual_seed(0)
    policies = {
        status: FlexMatchThreshold(
            0.95, learning_status=status, num_classes=classes, unlabeled_size=n
        ).train()
        for status in ("index", "estimate")
    }
    for _ in range(10):
        order = torch.randperm(n, generator=generator)
        for batch in order.split(50):
            for policy in policies.values():
                policy(probs[batch], batch)
    exact, estimate = policies["index"], policies["estimate"]
    assert exact.learning_effect()[1].item() == pytest.approx(0.54)
    assert estimate.learning_effect()[1].item() < 0.05
    assert exact.class_thresholds().max().item() < 0.1
    assert estimate.class_thresholds().max().item() > 0.9


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(dim=1, keepdim=True)


def test_distribution_alignment_scales_by_the_labeled_frequencies_over_the_mean_prediction():
    policy = _built(DistributionAlignment(FixedThreshold(0.6), window=2)).train()
    policy.observe_labeled(torch.tensor([0, 2, 1, 2, -1]))  # -1: a target it cannot count
    assert policy.target_distribution().tolist() == [0.25, 0.25, 0.5]
    label_probs, weights = policy(PROBS)
    # The batch's own mean prediction enters the window before it aligns.
    aligned = _normalized(PROBS * torch.tensor([0.25, 0.25, 0.5]) / PROBS.mean(dim=0))
    torch.testing.assert_close(label_probs, aligned)
    assert weights.tolist() == (aligned.max(dim=1).values >= 0.6).float().tolist()
    # Image 2 (0.30, 0.30, 0.40) is under the threshold alone, over it once aligned: class 2 is
    # predicted less than the labeled set holds it.
    assert PROBS[2].max() < 0.6 and weights[2] == 1.0
    assert policy.logged["alignment_max"] == pytest.approx(
        (torch.tensor([0.25, 0.25, 0.5]) / PROBS.mean(dim=0)).max().item()
    )


def test_distribution_alignment_averages_the_last_window_batches():
    policy = _built(DistributionAlignment(FixedThreshold(0.6), target="uniform", window=2))
    policy.train().observe_labeled(LABELS)  # ignored: the target is uniform
    batches = [PROBS, PROBS.flip(1), PROBS.roll(1, dims=1)]
    for batch in batches:
        label_probs, _ = policy(batch)
    p_model = (batches[1].mean(dim=0) + batches[2].mean(dim=0)) / 2  # the first one dropped out
    torch.testing.assert_close(policy.model_distribution(), p_model)
    torch.testing.assert_close(label_probs, _normalized(batches[2] / 3 / p_model))
    fresh = _built(DistributionAlignment(0.6)).eval()
    assert torch.equal(fresh(PROBS)[0], PROBS)  # nothing seen yet: unaligned


def test_sinkhorn_rounds_give_the_batch_the_target_class_balance():
    # Image 0 (0.70, 0.20, 0.10) and image 3 (0.96, ...) both go to class 0, the model's
    # favourite; with one round the columns are scaled to the batch's share B * p_target, then
    # the rows renormalized, on top of ReMixMatch's scaling.
    policy = _built(DistributionAlignment(0.6, target="uniform", window=2, sinkhorn_iterations=1))
    label_probs, _ = policy.train()(PROBS)
    aligned = _normalized(PROBS / 3 / PROBS.mean(dim=0))
    torch.testing.assert_close(label_probs, _normalized(aligned * (4 / 3) / aligned.sum(dim=0)))
    # Many rounds: every class holds a third of the batch's mass, every row is a distribution.
    many = _built(DistributionAlignment(0.6, target="uniform", window=2, sinkhorn_iterations=50))
    balanced, _ = many.train()(PROBS)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((3,), 4 / 3))
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(4))
    # Four of six images lean to class 0, the model's favourite. ReMixMatch's one scaling (its
    # window: this batch) leaves all four there; balanced, its least certain one (0.70, with
    # 0.20 on class 1) goes to class 1, which is short of its share, and its surest stays.
    skewed = torch.tensor(
        [
            [0.90, 0.05, 0.05],
            [0.85, 0.10, 0.05],
            [0.80, 0.05, 0.15],
            [0.70, 0.20, 0.10],
            [0.10, 0.85, 0.05],
            [0.10, 0.10, 0.80],
        ]
    )
    plain = _built(DistributionAlignment(0.6, target="uniform", window=1)).train()(skewed)[0]
    sinkhorn = _built(
        DistributionAlignment(0.6, target="uniform", window=1, sinkhorn_iterations=50)
    ).train()(skewed)[0]
    assert plain.argmax(dim=1).tolist() == [0, 0, 0, 0, 1, 2]
    assert sinkhorn.argmax(dim=1)[[0, 3, 4, 5]].tolist() == [0, 1, 1, 2]
    torch.testing.assert_close(sinkhorn.sum(dim=0), torch.full((3,), 2.0))
    # The labeled target: the columns follow the labeled frequencies 1/4, 1/4, 1/2.
    labeled = _built(DistributionAlignment(0.6, window=2, sinkhorn_iterations=50)).train()
    labeled.observe_labeled(LABELS)
    torch.testing.assert_close(labeled(PROBS)[0].sum(dim=0), torch.tensor([1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="sinkhorn_iterations must be at least 0"):
        DistributionAlignment(0.6, sinkhorn_iterations=-1)


def test_debiaspl_moves_the_bias_first_then_debiases_and_masks():
    policy = _built(DebiasedThreshold(0.6, strength=0.4, momentum=0.5)).train()
    label_probs, weights = policy(PROBS)
    p = 0.5 / 3 + 0.5 * PROBS.mean(dim=0)
    torch.testing.assert_close(policy.class_prediction, p)
    # For softmax probabilities, Normalize(q / p^lambda) is softmax(z - lambda log p).
    logits = PROBS.log()
    torch.testing.assert_close(label_probs, (logits - 0.4 * p.log()).softmax(dim=1))
    assert weights.tolist() == (label_probs.max(dim=1).values >= 0.6).float().tolist()
    assert policy.logged["bias_max"] == pytest.approx(p.max().item())


def test_debiaspl_margin_uses_the_bias_from_before_the_batch():
    policy = _built(DebiasedThreshold(0.6, strength=0.4, momentum=0.5)).train()
    strong = torch.tensor([[2.0, 0.0, -1.0]])
    policy(PROBS)
    before = policy.class_prediction.clone()
    policy(PROBS.flip(1))  # moves the bias again
    torch.testing.assert_close(policy.adjust_logits(strong), strong + 0.4 * before.log())
    off = _built(DebiasedThreshold(0.6, marginal_loss=False)).train()
    off(PROBS)
    assert torch.equal(off.adjust_logits(strong), strong)
    assert _built(DebiasedThreshold(0.6, strength=0.0)).train()(PROBS)[1].tolist() == [
        float(q >= 0.6) for q in PROBS.max(dim=1).values
    ]  # strength 0 is FixMatch


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DistributionAlignment(target="model"), "alignment target"),
        (lambda: DistributionAlignment(window=0), "window"),
        (lambda: DebiasedThreshold(strength=-1), "strength"),
        (lambda: DebiasedThreshold(momentum=1.0), "momentum"),
    ],
)
def test_bad_alignment_and_debiasing_arguments_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
