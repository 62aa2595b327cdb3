"""Jigsaw puzzles: the permutation set, tiling, the collation and its grid, the head."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from sesemi.collation import (
    JigsawTransformer,
    crop_to_grid,
    inverse_permutation,
    permutation_set,
    shuffle_tiles,
    tile,
    untile,
)
from sesemi.collation.jigsaw import AUTO_GRID_MIN_SIDE
from sesemi.models.heads.base import HeadContext, HeadInputs
from sesemi.models.heads.jigsaw import JigsawPredictionLossHead


def _hamming(perms: torch.Tensor) -> torch.Tensor:
    return (perms[:, None] != perms[None]).sum(-1)


@pytest.mark.parametrize("grid,size", [(3, 24), (2, 24), (2, 4), (3, 30)])
def test_permutation_set_is_distinct_valid_and_deterministic(grid, size):
    perms = permutation_set(grid, size, seed=0)
    tiles = grid * grid
    assert perms.shape == (size, tiles) and perms.dtype == torch.long
    assert torch.equal(perms.sort(dim=1).values, torch.arange(tiles).expand(size, tiles))
    assert len({tuple(p) for p in perms.tolist()}) == size
    assert torch.equal(perms, permutation_set(grid, size, seed=0))
    assert not torch.equal(perms, permutation_set(grid, size, seed=1))


def test_permutation_set_has_large_hamming_distances():
    perms = permutation_set(3, 24)
    distance = _hamming(perms)
    # Greedy on the summed distance: the first 9 differ from each other in every position
    # (9 permutations of 9 tiles can, like the rows of a Latin square).
    first = distance[:9, :9]
    assert (first[~torch.eye(9, dtype=torch.bool)] == 9).all()
    off_diagonal = distance[~torch.eye(24, dtype=torch.bool)].float()
    # A random set of 24 averages 9 - 1 = 8 differing positions (a permutation fixes 1 point on
    # average) with close pairs; the greedy set does better on both.
    assert off_diagonal.mean() > 8.2 and off_diagonal.min() >= 5
    assert torch.equal(
        permutation_set(2, 24).sort(dim=0).values,
        torch.tensor(list(itertools.permutations(range(4)))).sort(dim=0).values,
    )  # all 24 permutations of a 2x2 grid
    with pytest.raises(ValueError, match="24 distinct"):
        permutation_set(2, 25)


def test_tile_then_untile_is_the_identity_and_tiles_are_row_major():
    images = torch.randn(2, 3, 12, 9)
    tiles = tile(images, 3)
    assert tiles.shape == (2, 9, 3, 4, 3)
    assert torch.equal(untile(tiles, 3), images)
    for k in range(9):
        r, c = divmod(k, 3)
        assert torch.equal(tiles[:, k], images[:, :, 4 * r : 4 * r + 4, 3 * c : 3 * c + 3])
    with pytest.raises(ValueError, match="divisible"):
        tile(torch.randn(1, 3, 10, 9), 3)


def test_inverse_permutation_unshuffles_exactly():
    images = torch.randn(4, 3, 30, 30)
    perms = permutation_set(3, 24)[torch.tensor([0, 5, 11, 23])]
    shuffled = shuffle_tiles(images, perms, 3)
    assert not torch.equal(shuffled, images)
    # Position i of the shuffled image holds original tile perms[i]:
    assert torch.equal(tile(shuffled, 3)[1, 0], tile(images, 3)[1, perms[1, 0]])
    inverse = inverse_permutation(perms)
    assert torch.equal(shuffle_tiles(shuffled, inverse, 3), images)
    restored = torch.stack([tile(shuffled, 3)[b, inverse[b]] for b in range(4)])
    assert torch.equal(untile(restored, 3), images)


@pytest.mark.parametrize("size", [30, 32])
def test_collation_rows_match_their_labels(size):
    torch.manual_seed(0)
    collate = JigsawTransformer(grid=3, num_permutations=24, seed=0)
    samples = [(torch.randn(3, size, size), 7) for _ in range(16)]
    state = torch.get_rng_state()  # the permutation draws' start, replayed below
    images, labels = collate(samples)
    assert images.shape == (16, 3, 30, 30)  # 32 px is center-cropped to 30 (1 px each side)
    assert labels.shape == (16,) and labels.dtype == torch.long
    assert 0 <= labels.min() and labels.max() < 24 and len(labels.unique()) > 1
    originals = crop_to_grid(torch.stack([s[0] for s in samples]), 3)
    if size == 32:
        assert torch.equal(originals, torch.stack([s[0] for s in samples])[:, :, 1:31, 1:31])
    for b in range(16):
        perm = collate.permutations(3)[labels[b]]
        unshuffled = tile(images[b : b + 1], 3)[0, inverse_permutation(perm)]
        assert torch.equal(untile(unshuffled[None], 3)[0], originals[b])
    torch.set_rng_state(state)
    bare, bare_labels = collate([s[0] for s in samples])  # bare images (unlabeled folders)
    assert torch.equal(bare, images) and torch.equal(bare_labels, labels)
    torch.set_rng_state(state)
    indexed, _ = collate([(s[0], 7, i) for i, s in enumerate(samples)])  # (image, label, index)
    assert torch.equal(indexed, images)


@pytest.mark.parametrize("size,grid", [(32, 2), (95, 2), (96, 3), (224, 3)])
def test_automatic_grid_is_3_from_96_px_up_else_2(size, grid):
    assert AUTO_GRID_MIN_SIDE == 96
    collate = JigsawTransformer(num_permutations=24)  # grid=None: automatic
    assert collate.grid is None and collate.grid_for(size, size) == grid
    assert collate.grid_for(size, 500) == grid and collate.grid_for(500, size) == grid  # min side
    torch.manual_seed(0)
    samples = [torch.randn(3, size, size) for _ in range(4)]
    images, labels = collate(samples)
    crop = size - size % grid
    assert images.shape == (4, 3, crop, crop)
    originals = crop_to_grid(torch.stack(samples), grid)
    perms = collate.permutations(grid)
    assert perms.shape == (24, grid * grid)
    assert torch.equal(shuffle_tiles(originals, perms[labels], grid), images)
    assert collate.permutations(grid) is perms  # built once per grid
    assert JigsawTransformer(grid=2).grid_for(224, 224) == 2  # a given grid always wins


def test_automatic_grid_with_too_many_permutations_for_small_images_says_what_to_do():
    collate = JigsawTransformer(num_permutations=30)
    images, labels = collate([torch.randn(3, 96, 96)])  # 3x3: 30 of 9! permutations
    assert images.shape == (1, 3, 96, 96) and labels.item() < 30
    with pytest.raises(ValueError, match="under 96 px get a 2x2 grid.*set grid: 3"):
        collate([torch.randn(3, 32, 32)])
    with pytest.raises(ValueError, match="24 distinct"):
        JigsawTransformer(grid=2, num_permutations=30)  # a fixed grid fails at once
    with pytest.raises(ValueError, match="grid must be at least 2"):
        JigsawTransformer(grid=1)


class _Stub(nn.Module):
    out_features = 5

    def forward(self, x):
        return x.flatten(1)[:, :5]


def test_head_loss_is_the_per_puzzle_cross_entropy():
    backbones = {"backbone": _Stub()}
    head = JigsawPredictionLossHead("jigsaw", num_permutations=4)
    head.build(HeadContext(backbones, {}, num_classes=10))
    assert (head.fc.in_features, head.fc.out_features) == (5, 4)
    images = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    data = {"jigsaw": (images, labels)}
    losses = head(HeadInputs(data=data, backbones=backbones, heads={}))
    logits = images @ head.fc.weight.T + head.fc.bias
    for i in range(6):
        log_z = math.log(sum(math.exp(v) for v in logits[i].tolist()))
        expected = log_z - logits[i, labels[i]].item()
        assert losses[i].item() == pytest.approx(expected, rel=1e-5)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert head.log_values["top1"].item() == pytest.approx(accuracy)
    losses.mean().backward()
    assert head.fc.weight.grad is not None


def test_head_rejects_labels_beyond_its_permutations():
    backbones = {"backbone": _Stub()}
    head = JigsawPredictionLossHead("jigsaw", num_permutations=4)
    head.build(HeadContext(backbones, {}, num_classes=10))
    data = {"jigsaw": (torch.randn(2, 5), torch.tensor([0, 9]))}
    message = "label 9, but the head predicts 4; .* JigsawTransformer the same num_permutations"
    with pytest.raises(ValueError, match=message):
        head(HeadInputs(data=data, backbones=backbones, heads={}))
    data = {"jigsaw": (torch.randn(2, 5), torch.tensor([0, 3]))}
    assert head(HeadInputs(data=data, backbones=backbones, heads={})).shape == (2,)
    with pytest.raises(ValueError, match="num_permutations must be at least 1"):
        JigsawPredictionLossHead("jigsaw", num_permutations=0)
