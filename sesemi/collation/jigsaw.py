"""Jigsaw puzzles: a fixed set of tile permutations, tiling helpers and the collate function.

An image is cut into `grid x grid` tiles, numbered row-major (tile `r * grid + c` is at row `r`,
column `c`). A permutation `p` of the tile numbers shuffles the tiles: position `i` of the
shuffled image holds original tile `p[i]`, i.e. `shuffled_tiles = tiles[:, p]`. The inverse
permutation `q` (`q[p[i]] = i`, see `inverse_permutation`) undoes it:
`tiles = shuffled_tiles[:, q]`.

References:
    * Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
      Puzzles", arXiv:1603.09246 (the puzzle task and the greedy maximal-Hamming-distance
      permutation set).
    * Carlucci et al., "Domain Generalization by Solving Jigsaw Puzzles" (JiGen),
      arXiv:1903.06864 (the shuffled tiles reassembled into one image that the ordinary
      backbone classifies, an auxiliary loss next to the supervised one).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sesemi.collation._samples import stack_images

# Enumerate every permutation up to this many (9! = 362,880, a 3x3 grid); above it the greedy
# search runs over a seeded random pool of candidates.
_MAX_ENUMERATED = math.factorial(9)
_POOL_SIZE = 100_000
# With grid=None, images whose smaller side has at least this many pixels get a 3x3 grid, else 2x2.
AUTO_GRID_MIN_SIDE = 96


@functools.lru_cache(maxsize=4)
def _all_permutations(num_tiles: int) -> np.ndarray:
    # Permutations of k + 1 items: those of k items with item k inserted at each position.
    perms = np.zeros((1, 0), dtype=np.int8)
    for k in range(num_tiles):
        perms = np.concatenate([np.insert(perms, pos, k, axis=1) for pos in range(k + 1)])
    perms.setflags(write=False)
    return perms


def _candidates(num_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """Every permutation of `num_tiles` tiles `(num_tiles!, num_tiles)`, or a random pool."""
    if math.factorial(num_tiles) <= _MAX_ENUMERATED:
        return _all_permutations(num_tiles)
    pool = np.argsort(rng.random((_POOL_SIZE, num_tiles)), axis=1).astype(np.int16)
    return np.unique(pool, axis=0)


@functools.lru_cache(maxsize=16)
def _permutation_set(num_tiles: int, num_permutations: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    candidates = _candidates(num_tiles, rng)
    n = len(candidates)
    if num_permutations > n:
        raise ValueError(
            f"num_permutations={num_permutations} exceeds the {n} distinct permutations of "
            f"{num_tiles} tiles"
        )
    # Greedy choice (Noroozi & Favaro, Algorithm 1): start from a random permutation, then
    # repeatedly add the candidate with the largest total Hamming distance to those chosen.
    # Ties go to the larger minimum distance, then to a seeded random order.
    total = np.zeros(n, dtype=np.int64)
    nearest = np.full(n, num_tiles, dtype=np.int64)
    tie_break = rng.permutation(n).astype(np.int64)
    taken = np.zeros(n, dtype=bool)
    chosen = [int(rng.integers(n))]
    for _ in range(num_permutations - 1):
        last = chosen[-1]
        taken[last] = True
        distance = (candidates != candidates[last]).sum(axis=1)
        total += distance
        np.minimum(nearest, distance, out=nearest)
        key = (total * (num_tiles + 1) + nearest) * n + tie_break
        key[taken] = -1
        chosen.append(int(key.argmax()))
    result = candidates[chosen].astype(np.int64)
    result.setflags(write=False)
    return result


def permutation_set(grid: int = 3, num_permutations: int = 24, seed: int = 0) -> Tensor:
    """A fixed set of distinct tile permutations with large Hamming distances between them.

    Chosen greedily as in Noroozi & Favaro (arXiv:1603.09246, Algorithm 1): a seeded random
    first permutation, then each next one maximizes the summed Hamming distance (the number of
    positions holding a different tile) to those already chosen; ties go to the larger minimum
    distance, then to a seeded random order. Up to 9 tiles (grids 2 and 3) every permutation is
    a candidate; larger grids search a seeded pool of 100,000 random permutations. The set
    depends only on the arguments (it is cached), so every process and run builds the same one.

    Args:
        grid: Tiles per side (the puzzle has `grid * grid` tiles), at least 2.
        num_permutations: The set's size (at most `(grid * grid)!`).
        seed: The seed of the random first pick and tie-breaking.

    Returns:
        An int64 tensor `(num_permutations, grid * grid)`; row `k` is permutation `k`.
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be at least 1, got {num_permutations}")
    return torch.from_numpy(_permutation_set(grid * grid, num_permutations, seed).copy())


def inverse_permutation(permutation: Tensor) -> Tensor:
    """The inverse `q` of permutation(s) `p` (`q[p[i]] = i`), along the last dimension."""
    return torch.argsort(permutation, dim=-1)


def crop_to_grid(images: Tensor, grid: int) -> Tensor:
    """Center-crops `(..., H, W)` images to the largest size divisible by `grid`."""
    h, w = images.shape[-2:]
    new_h, new_w = h - h % grid, w - w % grid
    if new_h == 0 or new_w == 0:
        raise ValueError(f"images of size {h}x{w} are too small for a {grid}x{grid} grid")
    top, left = (h - new_h) // 2, (w - new_w) // 2
    return images[..., top : top + new_h, left : left + new_w]


def tile(images: Tensor, grid: int) -> Tensor:
    """Cuts images `(B, C, H, W)` into tiles `(B, grid * grid, C, H / grid, W / grid)`.

    Tiles are numbered row-major. H and W must be divisible by `grid` (see `crop_to_grid`).
    """
    b, c, h, w = images.shape
    if h % grid or w % grid:
        raise ValueError(f"image size {h}x{w} is not divisible by grid={grid}; crop it first")
    tiles = images.reshape(b, c, grid, h // grid, grid, w // grid)
    # (B, C, row, y, col, x) -> (B, row, col, C, y, x)
    return tiles.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, h // grid, w // grid)


def untile(tiles: Tensor, grid: int) -> Tensor:
    """Reassembles tiles `(B, grid * grid, C, h, w)` into images `(B, C, grid * h, grid * w)`;
    the inverse of `tile`."""
    b, n, c, h, w = tiles.shape
    if n != grid * grid:
        raise ValueError(f"expected {grid * grid} tiles for grid={grid}, got {n}")
    images = tiles.reshape(b, grid, grid, c, h, w)
    # (B, row, col, C, y, x) -> (B, C, row, y, col, x)
    return images.permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * h, grid * w)


def shuffle_tiles(images: Tensor, permutations: Tensor, grid: int) -> Tensor:
    """Shuffles each image's tiles by its own permutation and reassembles it.

    Args:
        images: `(B, C, H, W)`, H and W divisible by `grid`.
        permutations: `(B, grid * grid)`; position `i` of image `b`'s output holds its original
            tile `permutations[b, i]`.
        grid: Tiles per side.

    Returns:
        The shuffled images `(B, C, H, W)`.
    """
    tiles = tile(images, grid)
    index = permutations.to(tiles.device)[:, :, None, None, None].expand_as(tiles)
    return untile(torch.gather(tiles, 1, index), grid)


class JigsawTransformer:
    """Collates images into jigsaw puzzles labeled by the index of their tile permutation.

    Each image is cut into `grid x grid` tiles, the tiles are shuffled by a permutation drawn
    uniformly (with torch's global generator, seeded per DataLoader worker) from the fixed set
    `permutation_set(grid, num_permutations, seed)`, and reassembled into one image. The label is
    that permutation's index in the set. Images whose height or width is not divisible by `grid`
    are first center-cropped to the largest size that is (e.g. 32 px with grid 3 gives 30 px);
    set the loader's image size to a multiple of `grid` to keep every pixel.

    `grid=None` (the default) picks the grid per batch from the images' smaller side: 3 from
    `AUTO_GRID_MIN_SIDE` = 96 px up (tiles of at least 32 px), 2 below (a 3x3 grid would cut a
    32 px digit into 10 px tiles with too little content each). The permutation set of each grid
    is built once and kept; both have `num_permutations` entries, so the head's classes stay the
    same, but a 2x2 grid has only 4! = 24 permutations.

    References: Noroozi & Favaro, arXiv:1603.09246 (puzzles and the permutation set); JiGen,
    Carlucci et al., arXiv:1903.06864 (reassembled whole-image puzzles). Deviations from
    Noroozi & Favaro: the reassembled image goes through the ordinary backbone instead of their
    per-tile siamese network, and there is no gap, jitter or per-tile normalization between
    tiles, so low-level cues at tile borders can help solve the puzzle; the default set has 24
    permutations (they use 100 to 1,000).
    """

    def __init__(self, grid: int | None = None, num_permutations: int = 24, seed: int = 0) -> None:
        """Initializes the collation.

        Args:
            grid: Tiles per side; None: 3 for images of at least 96 px (smaller side), else 2.
            num_permutations: The size of the permutation set (the puzzle's classes).
            seed: The seed that fixes the permutation set (not the per-image draws).
        """
        if grid is not None and grid < 2:
            raise ValueError(f"grid must be at least 2 (or None: automatic), got {grid}")
        if num_permutations < 1:
            raise ValueError(f"num_permutations must be at least 1, got {num_permutations}")
        self.grid = grid
        self.num_permutations = num_permutations
        self.seed = seed
        self._permutations: dict[int, Tensor] = {}
        if grid is not None:
            self.permutations(grid)  # a bad num_permutations fails now, not in a worker

    def grid_for(self, height: int, width: int) -> int:
        """The grid used for images of this size: `grid`, or the automatic choice."""
        if self.grid is not None:
            return self.grid
        return 3 if min(height, width) >= AUTO_GRID_MIN_SIDE else 2

    def permutations(self, grid: int) -> Tensor:
        """The permutation set `(num_permutations, grid * grid)` of a grid (built once)."""
        if grid not in self._permutations:
            try:
                self._permutations[grid] = permutation_set(grid, self.num_permutations, self.seed)
            except ValueError as error:
                if self.grid is not None:
                    raise
                raise ValueError(
                    f"{error}: images under {AUTO_GRID_MIN_SIDE} px get a {grid}x{grid} grid; "
                    "lower num_permutations or set grid: 3"
                ) from None
        return self._permutations[grid]

    def __call__(self, batch: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Makes a batch of puzzles.

        Args:
            batch: A list of `(image, label[, index])` samples or bare images `(C, H, W)`.

        Returns:
            Shuffled images `(B, C, H', W')` (H', W' the sizes cropped to multiples of the grid)
            and permutation indices `(B,)`: row `b` is image `b` shuffled by
            `self.permutations(grid)[labels[b]]`, grid = `self.grid_for(H, W)`.
        """
        images = stack_images(batch)  # (B, C, H, W)
        grid = self.grid_for(*images.shape[-2:])
        images = crop_to_grid(images, grid)
        labels = torch.randint(self.num_permutations, (images.shape[0],))
        return shuffle_tiles(images, self.permutations(grid)[labels], grid), labels
