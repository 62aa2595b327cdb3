"""A pre-resized image cache: decode each image once, keep its uint8 RGB pixels in one mapped file.

Layout, per image folder, in the cache folder (`<stem>` names the folder, its path and the size):

    <stem>.json              the manifest: file list, size and mtime of each file, and where
                             its pixels are (offset, height, width); written last, atomically
    <stem>.<token>.pixels    every image's pixels, (H, W, 3) uint8 row-major, back to back
    <stem>.lock              taken while building, so one process (of several DDP ranks) builds

The manifest is the commit point: it is written to a temporary name and `os.replace`d only after
the pixel file is complete and synced, so an interrupted build never leaves a cache that looks
valid (the next build deletes what a killed one left). A manifest that no longer matches the
folder (a file added, removed, or changed in size or mtime) triggers a rebuild that copies the
pixels of unchanged files from the old cache and decodes only the new or changed ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sesemi.devices import available_cores

log = logging.getLogger(__name__)

FORMAT = 1  # Bump when the layout or the resize changes: older caches are then rebuilt.
OUTPUTS = ("pil", "tensor")
_PROGRESS_EVERY_S = 10.0

# Decodes one image file as RGB; the second argument is the JPEG draft size (see `load_image`).
Loader = Callable[[str, int], Image.Image]


def capped_size(width: int, height: int, max_short: int) -> tuple[int, int]:
    """Returns `(width, height)` scaled so the short side is `max_short`; smaller stays as is."""
    short = min(width, height)
    if short <= max_short:
        return width, height
    if width <= height:
        return max_short, max(1, round(height * max_short / width))
    return max(1, round(width * max_short / height)), max_short


def decode_capped(path: str, max_short: int, load: Loader) -> np.ndarray:
    """Decodes an image and shrinks it (aspect kept, never enlarged) to a short side <= `max_short`.

    JPEGs are first draft-decoded (DCT scaling) to a short side >= 2 * `max_short` (as
    `Image.thumbnail` does with its reducing gap of 2), then resampled with an antialiased
    bicubic filter (Lanczos is as good here and 40 % slower with Pillow).

    Returns:
        The `(H, W, 3)` uint8 pixels.
    """
    image = load(path, 2 * max_short)
    size = capped_size(image.width, image.height, max_short)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, 3)


def cache_stem(folder: str, cache_size: int) -> str:
    """The file-name stem of a folder's cache: its name, a hash of its real path, the size."""
    real = os.path.realpath(folder)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(real)) or "root"
    return f"{name}-{hashlib.sha1(real.encode()).hexdigest()[:12]}-{cache_size}px"


class ImageCache:
    """The cached pixels of a list of image files, read from a memory-mapped file.

    The mapping is opened in the constructor (forked DataLoader workers inherit it) and never
    pickled: a spawned worker gets a copy without it and maps the file itself on first use.
    """

    def __init__(
        self,
        pixels_path: str,
        offsets: np.ndarray,
        shapes: np.ndarray,
        unreadable: dict[int, str],
    ) -> None:
        """Initializes the cache.

        Args:
            pixels_path: The pixel file.
            offsets: Byte offset of each image, `(N,)`.
            shapes: `(height, width)` of each image, `(N, 2)`; `(0, 0)` for unreadable files.
            unreadable: Index -> error message of each file that could not be decoded.
        """
        self.pixels_path = pixels_path
        self.offsets = offsets
        self.shapes = shapes
        self.unreadable = unreadable
        self._buffer: np.ndarray | None = None
        self._open()

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_buffer": None}

    def _open(self) -> np.ndarray:
        if self._buffer is None:
            if os.path.getsize(self.pixels_path) == 0:  # mmap refuses empty files
                self._buffer = np.zeros(0, dtype=np.uint8)
            else:
                with open(self.pixels_path, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._buffer = np.frombuffer(mapped, dtype=np.uint8)
        return self._buffer

    def pixels(self, index: int) -> np.ndarray:
        """Returns image `index` as a read-only `(H, W, 3)` uint8 view into the mapped file."""
        height, width = self.shapes[index]
        start = self.offsets[index]
        return self._open()[start : start + height * width * 3].reshape(height, width, 3)


class CachedImageFolder(Dataset):
    """A folder dataset whose images are served from an `ImageCache` instead of being decoded.

    Files that could not be decoded while building are left out; `skipped` counts them.
    """

    def __init__(self, folder: Any, cache: ImageCache, output: str = "pil") -> None:
        """Initializes the dataset.

        Args:
            folder: The uncached dataset (`samples`, `classes`, `class_to_idx`, `transform`).
            cache: The cache of `folder.samples`' files, in the same order.
            output: "pil" hands the transform a PIL image (works with every transform);
                "tensor" a `(3, H, W)` uint8 tensor (faster, for tensor-capable transforms).
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        keep = [i for i in range(len(cache)) if i not in cache.unreadable]
        self.root = getattr(folder, "root", None)
        self.transform = folder.transform
        self.classes = folder.classes
        self.class_to_idx = folder.class_to_idx
        self.samples = [folder.samples[i] for i in keep]
        self.targets = [t for _, t in self.samples]
        self.cache = cache
        self.output = output
        self.skipped = len(cache.unreadable)
        self._index = np.asarray(keep, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        pixels = self.cache.pixels(self._index[index])
        if self.output == "pil":
            image: Any = Image.frombuffer("RGB", pixels.shape[1::-1], pixels, "raw", "RGB", 0, 1)
        else:
            # A copy: a transform that writes into its input must not reach the read-only map.
            image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        return (self.transform(image) if self.transform else image), self.targets[index]


def _identity(paths: Sequence[str]) -> tuple[list[int], list[int]]:
    stats = [os.stat(p) for p in paths]
    return [s.st_size for s in stats], [s.st_mtime_ns for s in stats]


def _read_manifest(path: str, cache_dir: str, cache_size: int) -> dict[str, Any] | None:
    """The manifest at `path` if it is intact and its pixel file complete; otherwise None."""
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or manifest.get("cache_size") != cache_size:
            return None
        pixels = os.path.join(cache_dir, manifest["pixels"])
        if os.path.getsize(pixels) != manifest["nbytes"]:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as e:
        if os.path.exists(path):
            log.warning("image cache: ignoring unusable manifest '%s' (%s)", path, e)
        return None


def _matches(manifest: dict[str, Any], rel: list[str], sizes: list[int], mtimes: list[int]) -> bool:
    return manifest["files"] == rel and manifest["sizes"] == sizes and manifest["mtimes"] == mtimes


def _keys(manifest: dict[str, Any]) -> tuple[list[str], list[int], list[int]]:
    return manifest["files"], manifest["sizes"], manifest["mtimes"]


def _from_manifest(manifest: dict[str, Any], cache_dir: str) -> ImageCache:
    failed = manifest["unreadable"]  # relative path -> error message
    return ImageCache(
        os.path.join(cache_dir, manifest["pixels"]),
        np.asarray(manifest["offsets"], dtype=np.int64),
        np.stack([manifest["heights"], manifest["widths"]], axis=1).astype(np.int64),
        {i: failed[r] for i, r in enumerate(manifest["files"]) if r in failed},
    )


@contextlib.contextmanager
def _atomic_file(path: str, tmp: str, mode: str) -> Iterator[Any]:
    """Yields `tmp` open for writing; on success it is synced and renamed to `path`, on any
    failure removed, so `path` is either absent, the old file or the complete new one."""
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _write_atomic(path: str, text: str) -> None:
    with _atomic_file(path, f"{path}.{uuid.uuid4().hex[:8]}.tmp", "w") as f:
        f.write(text)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def _build_lock(path: str) -> Iterator[None]:
    """Holds an exclusive lock on `path`: one process (e.g. one DDP rank) builds, others wait."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("image cache: waiting for another process to finish building it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(cache_dir: str, stem: str, keep: str | None) -> None:
    # Pixel and temporary files of builds that were killed (SIGKILL, power loss); under the lock
    # no other build of this cache is running, so whatever the manifest does not name is garbage.
    for name in os.listdir(cache_dir):
        if name.startswith(f"{stem}.") and name.endswith((".tmp", ".pixels")) and name != keep:
            _remove(os.path.join(cache_dir, name))


def _decoded(
    paths: Sequence[str], todo: list[int], cache_size: int, load: Loader, threads: int
) -> Iterator[tuple[int, np.ndarray | str]]:
    """Yields `(index, pixels or error message)` for each index in `todo`, in order.

    Decoding runs on `threads` threads (Pillow releases the GIL while decoding and resizing),
    a bounded window at a time so memory stays flat on large folders.
    """

    def decode(i: int) -> np.ndarray | str:
        try:
            return decode_capped(paths[i], cache_size, load)
        except OSError as e:  # load_image turns every decoding failure into an OSError
            return str(e)

    window = 32 * threads
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(todo), window):
            chunk = todo[start : start + window]
            yield from zip(chunk, pool.map(decode, chunk), strict=True)


def _reusable(old: dict[str, Any] | None, rel: list[str], identity: tuple) -> dict[int, int]:
    """Maps the index of each unchanged file (same name, size and mtime) to its old index."""
    if old is None:
        return {}
    before = {key: j for j, key in enumerate(zip(*_keys(old), strict=True))}
    now = zip(rel, *identity, strict=True)
    return {i: before[key] for i, key in enumerate(now) if key in before}


def _write_pixels(
    f: Any,
    rel: list[str],
    reuse: dict[int, int],
    old: dict[str, Any] | None,
    old_buffer: np.ndarray | None,
    decoded: Iterator[tuple[int, np.ndarray | str]],
) -> dict[str, Any]:
    """Writes every image's pixels to `f` in order; returns their place in the manifest's terms."""
    n = len(rel)
    offsets, heights, widths = [0] * n, [0] * n, [0] * n
    unreadable: dict[str, str] = {}
    position, last = 0, time.monotonic()
    for i in range(n):
        offsets[i] = position
        if i in reuse:
            j = reuse[i]
            heights[i], widths[i] = old["heights"][j], old["widths"][j]
            if old["files"][j] in old["unreadable"]:
                unreadable[rel[i]] = old["unreadable"][old["files"][j]]
            start = old["offsets"][j]
            f.write(old_buffer[start : start + heights[i] * widths[i] * 3])
        else:
            _, result = next(decoded)
            if isinstance(result, str):
                unreadable[rel[i]] = result
                log.warning("image cache: leaving out an unreadable image: %s", result)
            else:
                heights[i], widths[i] = result.shape[:2]
                f.write(result.tobytes())
        position += heights[i] * widths[i] * 3
        if time.monotonic() - last > _PROGRESS_EVERY_S:
            last = time.monotonic()
            log.info("image cache: %d / %d images written", i + 1, n)
    return {
        "nbytes": position,
        "offsets": offsets,
        "heights": heights,
        "widths": widths,
        "unreadable": unreadable,
    }


def _build(
    paths: Sequence[str],
    rel: list[str],
    identity: tuple[list[int], list[int]],
    cache_dir: str,
    stem: str,
    cache_size: int,
    load: Loader,
    old: dict[str, Any] | None,
    threads: int,
) -> dict[str, Any]:
    """Writes a new pixel file (atomically) and returns its manifest; reuses `old`'s pixels."""
    reuse = _reusable(old, rel, identity)
    todo = [i for i in range(len(paths)) if i not in reuse]
    old_buffer = _from_manifest(old, cache_dir)._open() if old and reuse else None
    name = f"{stem}.{uuid.uuid4().hex[:8]}.pixels"
    final = os.path.join(cache_dir, name)
    tmp = final + ".tmp"
    what = f"{len(todo)} of {len(paths)} images into '{final}'"
    log.info(
        "image cache: decoding %s (short side <= %d px, %d threads)", what, cache_size, threads
    )
    started = time.monotonic()
    decoded = _decoded(paths, todo, cache_size, load, threads)
    try:
        with _atomic_file(final, tmp, "wb") as f:
            placed = _write_pixels(f, rel, reuse, old, old_buffer, decoded)
    finally:
        decoded.close()  # stops the decoding threads
    log.info("image cache: built '%s' in %.1f s", final, time.monotonic() - started)
    sizes, mtimes = identity
    return {
        "format": FORMAT,
        "cache_size": cache_size,
        "pixels": name,
        "files": rel,
        "sizes": sizes,
        "mtimes": mtimes,
        **placed,
    }


def open_cache(
    paths: Sequence[str],
    folder: str,
    cache_dir: str,
    cache_size: int,
    load: Loader,
    threads: int | None = None,
) -> ImageCache:
    """Returns the cache of `paths`, building or updating it first if the files changed.

    Args:
        paths: The image files, in dataset order.
        folder: The folder holding them; the cache is keyed by its real path.
        cache_dir: Where caches live (created if missing).
        cache_size: The largest short side kept, in pixels.
        load: Decodes a file as RGB, `load(path, draft_size)`; raises OSError if it cannot.
        threads: Decoding threads (default: the available cores, at most 8).

    Returns:
        The cache; `unreadable` holds the files that could not be decoded.
    """
    stem = cache_stem(folder, cache_size)
    manifest_path = os.path.join(cache_dir, f"{stem}.json")
    rel = [os.path.relpath(p, folder) for p in paths]
    sizes, mtimes = _identity(paths)
    old = _read_manifest(manifest_path, cache_dir, cache_size)
    if old is not None and _matches(old, rel, sizes, mtimes):
        return _from_manifest(old, cache_dir)  # no lock needed: the manifest is replaced whole
    os.makedirs(cache_dir, exist_ok=True)
    with _build_lock(os.path.join(cache_dir, f"{stem}.lock")):
        old = _read_manifest(manifest_path, cache_dir, cache_size)  # another process's build?
        if old is not None and _matches(old, rel, sizes, mtimes):
            return _from_manifest(old, cache_dir)
        _remove_leftovers(cache_dir, stem, keep=old["pixels"] if old else None)
        threads = threads or min(8, available_cores())
        new = _build(paths, rel, (sizes, mtimes), cache_dir, stem, cache_size, load, old, threads)
        _write_atomic(manifest_path, json.dumps(new, separators=(",", ":")))
        if old is not None:
            _remove(os.path.join(cache_dir, old["pixels"]))  # open maps of it stay valid (POSIX)
    return _from_manifest(new, cache_dir)
