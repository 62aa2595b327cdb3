"""The data module's training loaders: per-pass augmentation seeds and mid-pass restores."""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning.utilities.combined_loader import CombinedLoader

import sesemi
from sesemi.data import PassSampler, SESEMIDataModule


def _data(image_root: Path, *overrides: str) -> SESEMIDataModule:
    # base: 16 labeled images (random crops and flips) beside 16 rotated ones, batches of 4.
    cfg = sesemi.compose("base", [f"run.data_root={image_root}", "data.image_size=32", *overrides])
    return SESEMIDataModule(cfg.data, cfg.run.data_root, 4, stages=("train",), seed=0)


def test_a_loader_restarted_within_an_epoch_augments_every_pass_anew(image_root):
    # The labeled loader has 2 batches of 8, the rotation loader 4 of 4: Lightning restarts the
    # labeled one within the epoch, and each image must get a new crop in the second pass.
    data = _data(image_root, "data.train.supervised.batch_size=8")
    combined = CombinedLoader(data.train_dataloader(), "max_size_cycle")
    data.set_epoch(0)
    crops: dict[int, list[torch.Tensor]] = {}
    for batch, _, _ in combined:
        images, _, indices = batch["supervised"]
        for image, index in zip(images, indices.tolist(), strict=True):
            crops.setdefault(index, []).append(image)
    assert sorted(crops) == list(range(16))
    assert all(len(seen) == 2 for seen in crops.values())  # two passes in the one epoch
    same = [index for index, (first, second) in crops.items() if torch.equal(first, second)]
    assert same == []


def test_a_loader_restored_mid_pass_gives_the_batches_it_had_left(image_root):
    loader = _data(image_root).train_dataloader()["supervised"]
    assert isinstance(loader.sampler, PassSampler)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    rest = list(batches)
    restored = _data(image_root).train_dataloader()["supervised"]
    torch.manual_seed(123)  # another global state: the restore must not depend on it
    restored.load_state_dict(state)
    again = list(restored)
    assert len(again) == len(rest) == 3
    for (images, _, indices), (images_2, _, indices_2) in zip(rest, again, strict=True):
        assert torch.equal(indices, indices_2) and torch.equal(images, images_2)
    # The next pass, in both, is a new permutation with new crops.
    follow, follow_2 = next(iter(loader)), next(iter(restored))
    assert torch.equal(follow[2], follow_2[2]) and torch.equal(follow[0], follow_2[0])


def test_each_pass_of_the_sampler_has_its_own_token_and_order():
    generator = torch.Generator().manual_seed(0)
    sampler = PassSampler(list(range(10)), generator)
    passes = [list(sampler) for _ in range(3)]
    tokens = {token for keys in passes for _, token in keys}
    assert len(tokens) == 3
    assert all(sorted(index for index, _ in keys) == list(range(10)) for keys in passes)
    assert len({tuple(index for index, _ in keys) for keys in passes}) == 3


def test_over_two_processes_each_pass_is_split_into_two_disjoint_shares():
    # 9 images: the permutation is padded to 10 by repeating its first index, as
    # DistributedSampler pads; both processes draw the same permutation and token.
    shares = [
        PassSampler(list(range(9)), torch.Generator().manual_seed(5), num_replicas=2, rank=rank)
        for rank in (0, 1)
    ]
    assert [len(s) for s in shares] == [5, 5]
    for _ in range(2):  # two passes: a new permutation each, split the same way
        keys = [list(s) for s in shares]
        assert {token for k in keys for _, token in k} == {keys[0][0][1]}
        indices = [index for k in keys for index, _ in k]
        assert sorted(set(indices)) == list(range(9)) and len(indices) == 10
