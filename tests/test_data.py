"""The data module's training loaders: per-pass augmentation seeds and mid-pass restores."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_full_batches_fill_each_pass_from_new_permutations_with_their_own_tokens():
    # 10 images in batches of 4: a pass is 3 full batches (12 indices), the last 2 from a second
    # permutation with its own token, so an image seen twice in a pass gets two crops.
    sampler = PassSampler(list(range(10)), torch.Generator().manual_seed(0), batch_size=4)
    assert len(sampler) == 12
    keys = list(sampler)
    assert len(keys) == 12 and sorted(index for index, _ in keys[:10]) == list(range(10))
    assert keys[0][1] != keys[10][1] and len({token for _, token in keys[10:]}) == 1
    assert len(set(keys)) == 12  # no (index, token) pair twice: every sample a new crop
    # Smaller than a batch (3 images, batches of 8): 8 indices from 3 permutations; over two
    # processes each gets a whole batch of 8.
    small = PassSampler(list(range(3)), torch.Generator().manual_seed(1), batch_size=8)
    keys = list(small)
    assert len(keys) == 8 and len({token for _, token in keys}) == 3
    shares = [
        PassSampler(list(range(9)), torch.Generator().manual_seed(5), 2, rank, batch_size=4)
        for rank in (0, 1)
    ]
    assert [len(list(s)) for s in shares] == [8, 8]


def test_full_batches_give_the_labeled_loader_only_full_batches_and_resume_mid_pass(image_root):
    # 16 labeled images in batches of 6: without full_batches 6, 6, 4; with it 6, 6, 6.
    data = _data(
        image_root, "data.train.supervised.batch_size=6", "data.train.supervised.drop_last=false"
    )
    sizes = [len(b[2]) for b in data.train_dataloader()["supervised"]]
    assert sizes == [6, 6, 4]
    data = _data(
        image_root, "data.train.supervised.batch_size=6", "data.train.supervised.full_batches=true"
    )
    loader = data.train_dataloader()["supervised"]
    assert data.iterations_per_epoch() == 4  # the rotation loader's 4 batches of 4 still lead
    batches = iter(loader)
    assert len(next(batches)[2]) == 6
    state = loader.state_dict()
    rest = list(batches)
    assert [len(b[2]) for b in rest] == [6, 6]
    restored = _data(
        image_root, "data.train.supervised.batch_size=6", "data.train.supervised.full_batches=true"
    ).train_dataloader()["supervised"]
    restored.load_state_dict(state)
    for (images, _, indices), (images_2, _, indices_2) in zip(rest, restored, strict=True):
        assert torch.equal(indices, indices_2) and torch.equal(images, images_2)


def test_full_batches_on_a_loader_that_does_not_shuffle_is_refused(image_root):
    with pytest.raises(ValueError, match="data.train.supervised: full_batches needs a shuffled"):
        _data(
            image_root,
            "data.train.supervised.shuffle=false",
            "data.train.supervised.full_batches=true",
        )
    cfg = sesemi.compose("base", [f"run.data_root={image_root}", "data.val.full_batches=true"])
    with pytest.raises(ValueError, match="data.val: full_batches needs a shuffled"):
        SESEMIDataModule(cfg.data, cfg.run.data_root, 4)


def test_a_class_balanced_pass_draws_every_class_equally_often_each_repeat_a_new_crop():
    # 8 images of class 0 and 2 of class 1: a pass is 5 draws of each class, class 1's two
    # images in shuffled rounds (2 or 3 times each), no (index, token) pair twice.
    classes = [0] * 8 + [1] * 2
    sampler = PassSampler(list(range(10)), torch.Generator().manual_seed(0), classes=classes)
    assert len(sampler) == 10
    for _ in range(3):
        keys = list(sampler)
        drawn = [classes[index] for index, _ in keys]
        assert drawn.count(0) == drawn.count(1) == 5
        assert sorted([index for index, _ in keys if index >= 8].count(i) for i in (8, 9)) == [2, 3]
        assert len(set(keys)) == 10 and len({index for index, _ in keys if index < 8}) == 5
    # Three classes of 7, 1 and 1 images: 3 draws each, a pass of 9, padded to whole batches.
    full = PassSampler(list(range(9)), torch.Generator(), batch_size=4, classes=[0] * 7 + [1, 2])
    keys = list(full)
    assert len(full) == len(keys) == 12 and len(set(keys)) == 12
    assert [index for index, _ in keys[:9]].count(7) == 3


def test_a_class_balanced_labeled_loader_evens_a_long_tailed_folder_and_resumes(tmp_path):
    # 10, 2 and 2 images of three classes: plain passes draw them 10:2:2, class-balanced ones
    # 5:5:5 (15 draws, so batches of 4, 4, 4, 3).
    from conftest import make_image_folder, write_images

    root = make_image_folder(tmp_path / "data", {"train": 2, "val": 2}, classes=("a", "b", "c"))
    write_images(root / "train" / "a", 10, seed=7)
    balanced = [
        "data.train.supervised.class_balanced=true",
        "data.train.supervised.drop_last=false",
    ]
    data = _data(root, *balanced)
    assert data.train["supervised"].pass_length() == 15
    loader = data.train_dataloader()["supervised"]
    batches = iter(loader)
    first = next(batches)
    state = loader.state_dict()
    rest = list(batches)
    assert [len(b[1]) for b in (first, *rest)] == [4, 4, 4, 3]
    targets = torch.cat([first[1], *(b[1] for b in rest)]).tolist()
    assert [targets.count(c) for c in range(3)] == [5, 5, 5]
    restored = _data(root, *balanced).train_dataloader()["supervised"]
    restored.load_state_dict(state)
    for (images, _, indices), (images_2, _, indices_2) in zip(rest, restored, strict=True):
        assert torch.equal(indices, indices_2) and torch.equal(images, images_2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train.supervised.shuffle=false"], "supervised: class_balanced needs a shuffled"),
        (["data.val.class_balanced=true"], "data.val: class_balanced needs a shuffled"),
        (
            ["+data.train.supervised.sampler._target_=torch.utils.data.SequentialSampler"],
            "draws the loader's samples itself; drop class_balanced or the sampler",
        ),
    ],
)
def test_class_balanced_where_it_cannot_work_is_refused(image_root, overrides, message):
    cfg = sesemi.compose(
        "base",
        [f"run.data_root={image_root}", "data.train.supervised.class_balanced=true", *overrides],
    )
    with pytest.raises(ValueError, match=message):
        SESEMIDataModule(cfg.data, cfg.run.data_root, 4, seed=0)


def test_class_balanced_on_unlabeled_images_is_refused(image_root):
    from conftest import write_images

    write_images(image_root / "loose", 6, seed=3)
    cfg = sesemi.compose(
        "base",
        [
            f"run.data_root={image_root}",
            "data.train.supervised.dataset.subset=loose",
            "data.train.supervised.class_balanced=true",
        ],
    )
    with pytest.raises(ValueError, match="supervised: class_balanced needs a labeled dataset"):
        SESEMIDataModule(cfg.data, cfg.run.data_root, 4, stages=("train",), seed=0)


def test_class_counts_are_given_for_loaders_whose_images_all_have_a_class(image_root):
    from conftest import write_images

    write_images(image_root / "loose_unlabeled", 5, seed=4)
    cfg = sesemi.compose(
        "base",
        [
            f"run.data_root={image_root}",
            "method=[fixmatch,abc]",
            "data.unlabeled_subset=loose_unlabeled",
        ],
    )
    data = SESEMIDataModule(cfg.data, cfg.run.data_root, 4, stages=("train",), seed=0)
    classes = sorted(p.name for p in (image_root / "train").iterdir())
    expected = [len(list((image_root / "train" / c).iterdir())) for c in classes]
    assert data.class_counts() == {"supervised": expected}  # loose images: no classes


def test_a_class_balanced_pass_over_two_processes_is_split_into_disjoint_shares():
    # 6 + 2 images, 4 draws per class: both processes draw the same balanced pass and take
    # every other draw, so together they see it once, 4 of each class.
    classes = [0] * 6 + [1] * 2
    shares = [
        PassSampler(list(range(8)), torch.Generator().manual_seed(3), 2, rank, classes=classes)
        for rank in (0, 1)
    ]
    keys = [list(s) for s in shares]
    assert [len(k) for k in keys] == [4, 4] and not set(keys[0]) & set(keys[1])
    drawn = [classes[index] for k in keys for index, _ in k]
    assert drawn.count(0) == drawn.count(1) == 4
