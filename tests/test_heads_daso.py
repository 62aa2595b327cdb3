"""DASO (`method=daso`): its blend weights, semantic pseudo-labels, blending and alignment loss
against their formulas on hand-made tensors, its queues and counts, its state in checkpoints and
on every DDP process, and its link to the FixMatch-family head it blends for."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import IdentityFeatures as Features
from conftest import free_port
from torch import nn

from sesemi.models.heads.base import HeadContext, HeadInputs, link_blenders, views_key
from sesemi.models.heads.daso import DASOLossHead, blend_weights, similarity_logits
from sesemi.models.heads.fixmatch import FixMatchLossHead


def _context(**kwargs) -> HeadContext:
    return HeadContext({"backbone": Features()}, {"supervised_head": nn.Identity()}, 3, **kwargs)


def _daso(pretrain_steps=0, dist_period=100, queue_size=4, **kwargs) -> DASOLossHead:
    head = DASOLossHead(
        "unlabeled",
        queue_size=queue_size,
        pretrain_steps=pretrain_steps,
        dist_period=dist_period,
        **kwargs,
    )
    head.build(_context())
    return head.train()


def _inputs(weak, strong, labeled=None, labels=None, step=0, targets=None):
    backbone = Features()
    data = {
        "unlabeled": [[weak, strong], targets if targets is not None else -torch.ones(len(weak))]
    }
    features = {views_key("unlabeled"): (weak, backbone(strong))}
    if labeled is not None:
        data["supervised"] = [labeled, labels]
        features["supervised_backbone"] = backbone(labeled)
    heads = {"supervised_head": nn.Identity()}
    return HeadInputs(data, {"backbone": backbone}, heads, features, step)


EYE = torch.eye(3)


def test_blend_weights_are_the_counts_over_the_largest_to_one_over_the_temperature():
    counts = torch.tensor([10.0, 5.0, 0.0])
    expected = [1.0, 0.5 ** (1 / 1.5), 0.0]
    assert blend_weights(counts, 1.5).tolist() == pytest.approx(expected)
    # The reference code's form: normalize, power, normalize, divide by the largest.
    powered = (counts / counts.sum()) ** (1 / 1.5)
    assert blend_weights(counts, 1.5).tolist() == pytest.approx(
        ((powered / powered.sum()) / (powered / powered.sum()).max()).tolist()
    )
    assert blend_weights(torch.zeros(3), 1.5).tolist() == [0.0, 0.0, 0.0]  # nothing counted yet


def test_similarity_logits_are_cosines_over_the_temperature_and_empty_classes_sink():
    features = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    prototypes = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    filled = torch.tensor([True, True, False])
    logits = similarity_logits(features, prototypes, filled, 0.05)
    root = 2**-0.5
    torch.testing.assert_close(logits[:, :2], torch.tensor([[root, root], [0.0, 1.0]]) / 0.05)
    assert (logits[:, 2] < -1e3).all()
    assert logits.softmax(dim=1)[:, 2].max() < 1e-6  # a class with no features never wins


def test_queues_keep_the_last_features_of_each_class_and_prototypes_are_their_mean():
    head = _daso(queue_size=2)
    head.enqueue(torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 5.0, 0]]), torch.tensor([0, 0, 1]))
    head.enqueue(torch.tensor([[5.0, 0, 0], [0, 0, 9.0]]), torch.tensor([0, -1]))  # -1: skipped
    prototypes, filled = head.prototypes()
    # Class 0 saw 1, 3, 5 and keeps the last two; class 1 one feature; class 2 none.
    torch.testing.assert_close(prototypes, torch.tensor([[4.0, 0, 0], [0, 5.0, 0], [0, 0, 0]]))
    assert filled.tolist() == [True, True, False]
    assert head.queue_filled.tolist() == [2, 1, 0]


def test_blend_mixes_each_prediction_with_its_semantic_label_by_its_class_weight():
    head = _daso()
    head.enqueue(EYE, torch.arange(3))  # prototypes: the unit vectors
    head.label_counts.copy_(torch.tensor([8.0, 2.0, 0.0]))  # class 0 predicted most
    probs = torch.tensor([[0.90, 0.05, 0.05], [0.10, 0.80, 0.10]])
    weak_features = torch.tensor([[0.0, 1.0, 0.2], [1.0, 0.0, 0.0]])
    blended = head.blend(probs, weak_features, step=0)
    semantic = similarity_logits(weak_features, EYE, torch.ones(3, dtype=torch.bool), 0.05)
    semantic = semantic.softmax(dim=1)
    v = torch.tensor([[1.0], [0.25 ** (1 / 1.5)]])  # the linear pseudo-labels: 0 and 1
    torch.testing.assert_close(blended, (1 - v) * probs + v * semantic)
    # The image the linear classifier gave to the frequent class 0 takes the prototypes' class.
    assert blended.argmax(dim=1).tolist() == [1, 1]
    # In training, the final pseudo-labels' classes are counted.
    assert head.label_counts.tolist() == [8.0, 4.0, 0.0]
    assert head.blend_values["blend_mean"].item() == pytest.approx(v.mean().item())


def test_before_pretrain_steps_the_pseudo_labels_are_the_base_heads_and_are_counted():
    head = _daso(pretrain_steps=5)
    head.enqueue(EYE, torch.arange(3))
    probs = torch.tensor([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    assert torch.equal(head.blend(probs, torch.flip(EYE[:2], [1]), step=4), probs)
    assert head.label_counts.tolist() == [1.0, 1.0, 0.0]
    losses = head(_inputs(EYE[:2], EYE[:2], step=4))
    assert losses.tolist() == [0.0, 0.0]
    assert not torch.equal(head.blend(probs, torch.flip(EYE[:2], [1]), step=5), probs)


def test_alignment_loss_is_the_cross_entropy_of_the_strong_similarities_to_the_weak_ones():
    head = _daso()
    head.enqueue(EYE, torch.arange(3))
    weak = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.4, 0.6]])
    strong = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    losses = head(_inputs(weak, strong, targets=torch.tensor([0, 2])))
    filled = torch.ones(3, dtype=torch.bool)
    q = similarity_logits(weak, EYE, filled, 0.05).softmax(dim=1)
    log_s = F.log_softmax(similarity_logits(strong, EYE, filled, 0.05), dim=1)
    torch.testing.assert_close(losses, -(q * log_s).sum(dim=1))
    assert losses.requires_grad  # it trains the backbone through the strong view
    # The weak views' semantic pseudo-labels (their nearest prototypes, 0 and 2) are right.
    assert head.log_values["semantic_acc"].item() == 1.0


def test_the_labeled_batch_is_queued_and_the_counts_close_every_period():
    head = _daso(dist_period=2)
    labeled = torch.tensor([[2.0, 0, 0], [0, 0, 4.0]])
    head(_inputs(EYE[:1], EYE[:1], labeled, torch.tensor([0, 2]), step=0))
    torch.testing.assert_close(head.prototypes()[0][[0, 2]], labeled)
    head.label_counts.copy_(torch.tensor([3.0, 1.0, 0.0]))
    assert head.counts().tolist() == [3.0, 1.0, 0.0]  # no period closed: the counts so far
    head(_inputs(EYE[:1], EYE[:1], step=1))  # step 1 closes the first period of two steps
    assert head.label_distribution.tolist() == [3.0, 1.0, 0.0]
    assert head.label_counts.tolist() == [0.0, 0.0, 0.0] and head.periods.item() == 1
    head.label_counts.copy_(torch.tensor([0.0, 0.0, 5.0]))
    assert head.counts().tolist() == [3.0, 1.0, 0.0]  # the last closed period's


def test_the_state_is_in_the_state_dict_and_a_restored_head_blends_the_same():
    head = _daso(dist_period=1)
    head(_inputs(EYE[:2], EYE[:2], EYE, torch.arange(3), step=0))
    head.blend(torch.tensor([[0.5, 0.3, 0.2]]), EYE[:1], step=1)
    head(_inputs(EYE[:2], EYE[:2], EYE * 2, torch.arange(3), step=1))
    restored = _daso(dist_period=1)
    restored.load_state_dict(head.state_dict())
    assert {"queue", "queue_filled", "label_distribution", "periods"} <= set(head.state_dict())
    probs, features = torch.tensor([[0.1, 0.6, 0.3]]), torch.tensor([[0.3, 0.2, 1.0]])
    head.eval(), restored.eval()
    torch.testing.assert_close(restored.blend(probs, features, 5), head.blend(probs, features, 5))


def _ddp_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out[rank] = _run_steps(rank, parts=2)
    finally:
        torch.distributed.destroy_process_group()


LABELED = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [3.0, 0, 0], [0, 0, 1.0]])
LABELS = torch.tensor([0, 1, 0, 2])
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])


def _run_steps(rank: int, parts: int) -> dict:
    head = _daso(dist_period=2, queue_size=3)
    share = len(LABELS) // parts
    mine = slice(rank * share, (rank + 1) * share)
    for step in range(3):  # each process sees its share of every batch
        labeled, probs = LABELED.roll(step, 0) * (step + 1), PROBS.roll(step, 0)
        head.blend(probs[mine], labeled[mine], step)
        head(_inputs(labeled[mine], labeled[mine], labeled[mine], LABELS.roll(step)[mine], step))
    return {k: v.clone() for k, v in head.state_dict().items()}


def test_every_process_keeps_the_state_of_the_whole_batch():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(free_port(), out), nprocs=2, join=True)
    alone = _run_steps(0, parts=1)
    for key, value in alone.items():
        torch.testing.assert_close(out[0][key], out[1][key])
        torch.testing.assert_close(out[0][key], value, msg=key)


def test_the_fixmatch_head_thresholds_the_blended_pseudo_labels():
    # The weak view's features are class 1's prototype, but the linear classifier gives it 0.6 on
    # class 0, the class predicted most (v = 1), which is below 0.95: blended, the pseudo-label
    # is class 1 and confident, so FixMatch uses the image; without DASO it is left out.
    linear = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:, 1] = torch.tensor([0.6, 0.3, 0.1]).log()
    backbones, classifier = {"backbone": Features()}, {"supervised_head": linear}
    fixmatch = FixMatchLossHead("unlabeled", threshold=0.95)
    daso = DASOLossHead("unlabeled", queue_size=4)
    for name, head in (("fixmatch", fixmatch), ("daso", daso)):
        head.build(HeadContext(backbones, classifier, 3, name=name))
    link_blenders({"fixmatch": fixmatch, "daso": daso})
    assert fixmatch.blenders == [daso]
    daso.train().enqueue(EYE, torch.arange(3))  # prototypes: the unit vectors
    daso.label_counts.copy_(torch.tensor([10.0, 1.0, 1.0]))
    view = EYE[1:2]
    batch = {"unlabeled": [[view, view], torch.tensor([1])]}
    fixmatch.train()(HeadInputs(batch, backbones, classifier, {}, 0))
    assert fixmatch.log_values["mask_rate"].item() == 1.0
    assert fixmatch.log_values["pseudo_label_acc"].item() == 1.0  # class 1, the target
    fixmatch.blenders.clear()
    fixmatch(HeadInputs(batch, backbones, classifier, {}, 0))
    assert fixmatch.log_values["mask_rate"].item() == 0.0
    assert fixmatch.log_values["confidence"].item() == pytest.approx(0.6)


def test_daso_without_a_fixmatch_family_head_or_with_a_teacher_is_a_clear_error():
    backbones = {"backbone": Features(), "teacher_backbone": Features()}
    classifier = {"supervised_head": nn.Identity(), "teacher_supervised_head": nn.Identity()}
    daso = DASOLossHead("unlabeled")
    daso.build(HeadContext(backbones, classifier, 3, name="daso"))
    with pytest.raises(
        ValueError, match=r"there is none; add one, e\.g\. 'method=\[fixmatch,daso\]'"
    ):
        link_blenders({"daso": daso})
    other = FixMatchLossHead("other_loader")
    with pytest.raises(ValueError, match="there is none"):
        link_blenders({"fixmatch": other, "daso": daso})
    teacher = FixMatchLossHead("unlabeled", teacher="ema")
    teacher.build(HeadContext(backbones, classifier, 3, name="fixmatch"))
    with pytest.raises(ValueError, match=r"fixmatch\.head\.teacher=student"):
        link_blenders({"fixmatch": teacher, "daso": daso})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"queue_size": 0}, "queue_size"),
        ({"proto_temperature": 0.0}, "must be positive"),
        ({"dist_temperature": -1.0}, "must be positive"),
        ({"dist_period": 0}, "dist_period"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DASOLossHead("unlabeled", **kwargs)


def test_large_queues_warn_with_their_size_and_the_setting_to_lower(caplog, monkeypatch):
    # ImageNet-sized queues (1,000 classes x 256 x 2,048 floats) would take 2 GiB; here the
    # threshold is lowered instead of allocating that much.
    import sesemi.models.heads.daso as daso_module

    monkeypatch.setattr(daso_module, "LARGE_QUEUES", 3 * 4 * 3 * 4 - 1)  # _daso's, minus 1
    with caplog.at_level("WARNING", logger="sesemi.models.heads.daso"):
        _daso()
    assert "3 classes x queue_size 4 x 3 features" in caplog.text
    assert "daso.head.queue_size" in caplog.text
    monkeypatch.setattr(daso_module, "LARGE_QUEUES", 3 * 4 * 3 * 4)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sesemi.models.heads.daso"):
        _daso()
    assert not caplog.text
