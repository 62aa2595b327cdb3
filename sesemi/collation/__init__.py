"""Collate functions that turn a list of dataset samples into self-supervised batches."""

from sesemi.collation.jigsaw import (
    JigsawTransformer,
    crop_to_grid,
    inverse_permutation,
    permutation_set,
    shuffle_tiles,
    tile,
    untile,
)
from sesemi.collation.rotation import RotationTransformer

__all__ = [
    "JigsawTransformer",
    "RotationTransformer",
    "crop_to_grid",
    "inverse_permutation",
    "permutation_set",
    "shuffle_tiles",
    "tile",
    "untile",
]
