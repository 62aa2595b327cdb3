"""Collate functions: RotationTransformer (every quarter turn, image-major) and the package."""

from __future__ import annotations

import importlib

import pytest
import torch

from sesemi.collation import RotationTransformer

B, C, S = 3, 3, 5


@pytest.fixture
def images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(C, S, S, generator=generator) for _ in range(B)]


def test_rows_are_rotations_of_each_image(images: list[torch.Tensor]) -> None:
    batch = [(image, 7) for image in images]
    rotated, labels = RotationTransformer()(batch)
    assert rotated.shape == (4 * B, C, S, S)
    assert labels.shape == (4 * B,)
    assert labels.dtype == torch.long
    for i, image in enumerate(images):
        for k in range(4):
            assert torch.equal(rotated[4 * i + k], torch.rot90(image, k, dims=(1, 2)))
            assert labels[4 * i + k].item() == k
    # The four rotations of a random image are all different (the test is not vacuous).
    assert not torch.equal(rotated[0], rotated[1])
    assert not torch.equal(rotated[1], rotated[3])


def test_rotation_direction_is_counter_clockwise() -> None:
    image = torch.zeros(C, S, S)
    image[:, 0, 0] = 1.0  # mark the top-left pixel
    rotated, _ = RotationTransformer()([image])
    marked = [tuple(torch.nonzero(rotated[k, 0]).flatten().tolist()) for k in range(4)]
    # 0: top-left; 90 CCW: bottom-left; 180: bottom-right; 270 CCW: top-right.
    assert marked == [(0, 0), (S - 1, 0), (S - 1, S - 1), (0, S - 1)]
    assert torch.all(rotated[:, 1:] == rotated[:, :1])  # channels rotate together


def test_bare_images_and_indexed_samples(images: list[torch.Tensor]) -> None:
    from_pairs, pair_labels = RotationTransformer()([(image, 0) for image in images])
    bare, bare_labels = RotationTransformer()(images)
    assert torch.equal(bare, from_pairs)
    assert torch.equal(bare_labels, pair_labels)
    # (image, label, index) samples, from datasets that return indices: the index is dropped.
    indexed, indexed_labels = RotationTransformer()([(x, 0, i) for i, x in enumerate(images)])
    assert torch.equal(indexed, from_pairs)
    assert torch.equal(indexed_labels, pair_labels)


def test_one_package_holds_every_collate_function() -> None:
    import sesemi.collation as collation

    assert collation.RotationTransformer.__module__ == "sesemi.collation.rotation"
    assert collation.JigsawTransformer.__module__ == "sesemi.collation.jigsaw"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("sesemi.jigsaw")  # no second path to the same class


def test_two_rotations(images: list[torch.Tensor]) -> None:
    rotated, labels = RotationTransformer(num_rotations=2)([(image, 1) for image in images])
    assert rotated.shape == (2 * B, C, S, S)
    assert labels.tolist() == [0, 1] * B
    for i, image in enumerate(images):
        assert torch.equal(rotated[2 * i], image)
        assert torch.equal(rotated[2 * i + 1], torch.rot90(image, 1, dims=(1, 2)))


@pytest.mark.parametrize("num_rotations", [0, 5, -1])
def test_invalid_num_rotations(num_rotations: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 4"):
        RotationTransformer(num_rotations=num_rotations)


def test_with_flips_each_image_also_appears_mirrored_left_right_and_top_down(images) -> None:
    collate = RotationTransformer(flips=True)
    assert collate.num_labels == 6
    out, labels = collate([(image, 3, i) for i, image in enumerate(images)])  # indices dropped
    assert out.shape == (6 * B, C, S, S) and labels.tolist() == [0, 1, 2, 3, 4, 5] * B
    for i, image in enumerate(images):
        for k in range(4):
            assert torch.equal(out[6 * i + k], torch.rot90(image, k, dims=(1, 2)))
        assert torch.equal(out[6 * i + 4], image.flip(2))  # left-right
        assert torch.equal(out[6 * i + 5], image.flip(1))  # top-down
    # The flips are new views: a random image's mirror is none of its rotations.
    assert all(not torch.equal(out[4], out[k]) for k in range(4))
