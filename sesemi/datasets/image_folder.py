"""The `image_folder` dataset: class-per-subfolder images, subsets of them, or unlabeled folders."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from sesemi.datasets._registry import register_dataset
from sesemi.datasets.cache import OUTPUTS, CachedImageFolder, open_cache

log = logging.getLogger(__name__)

UNLABELED = -1  # The target of images in a folder without class subfolders.


def _is_image(name: str) -> bool:
    # Hidden files (".DS_Store", macOS "._x.png" resource forks) are never images.
    return not os.path.basename(name).startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _scan(path: str) -> tuple[list[str], list[str]]:
    """Returns the sorted subfolder names and image file names directly under `path`."""
    dirs, images = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif _is_image(entry.name):
                images.append(entry.name)
    return sorted(dirs), sorted(images)


class ImageReadError(OSError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image)."""


def load_image(path: str, decode_size: int | None = None) -> Image.Image:
    """Decodes an image file as RGB; a file that fails is named in an `ImageReadError`.

    Args:
        path: The image file.
        decode_size: If set, a JPEG is decoded at a reduced size (libjpeg's DCT scaling by 1/2,
            1/4 or 1/8, via `Image.draft`): the largest reduction whose decoded short side is
            still >= `decode_size` pixels. Images whose short side is below 2 * `decode_size`
            are decoded at full size, and other formats (PNG, ...) are never affected.
            To lose no resolution under a random resized crop to `out` pixels with area
            scale >= `s_min` and aspect ratio >= `r_min` (<= 1 / `r_min`), every crop side is
            at least sqrt(s_min * r_min) times the image's short side, so use
            `decode_size >= out / sqrt(s_min * r_min)`: 438 for 224 px, scale (0.35, 1) and
            ratio (3/4, 4/3). For a resize-then-center-crop, `decode_size` is the resize size.
    """
    try:
        with Image.open(path) as image:
            if decode_size is not None:
                image.draft("RGB", (decode_size, decode_size))  # a no-op for non-JPEGs
            return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"cannot read image '{path}' ({e}); if it is a real image, raise Pillow's limit "
            "(PIL.Image.MAX_IMAGE_PIXELS) in your code, else delete it or set the dataset's "
            "skip_unreadable: true"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(
            f"cannot read image '{path}' ({e}); replace or delete it, or set the dataset's "
            "skip_unreadable: true"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts an image to 8-bit RGB by its values' real range.

    Pillow's own conversion clips 16-bit and 32-bit integer images at 255 (a 16-bit PNG turns
    almost white) and float images too (a float TIFF in [0, 1] turns black). Here 16-bit images
    are scaled by 255 / 65535, float images in [0, 1] by 255, and other integer or float images
    stretched from their minimum to their maximum.
    """
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and values.min() >= 0.0 and values.max() <= 1.0:
        low, high = 0.0, 1.0
    else:
        low, high = float(values.min()), float(values.max())
    scaled = (values - low) / max(high - low, 1e-12) * 255.0
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return gray.convert("RGB")


def _loader(decode_size: int | None) -> Callable[[str], Image.Image]:
    if decode_size is None:
        return load_image
    if isinstance(decode_size, bool) or not isinstance(decode_size, int) or decode_size < 1:
        raise ValueError(f"decode_size must be a positive integer or null, got {decode_size!r}")
    return functools.partial(load_image, decode_size=decode_size)


class SkipUnreadable(Dataset):
    """Wraps a dataset so unreadable images are skipped (the next sample is served) and counted.

    Each unreadable file is counted once, however many epochs meet it: a flag per sample is
    shared with DataLoader worker processes (fork), so the run can report the count.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.classes = getattr(dataset, "classes", [])
        self.class_to_idx = getattr(dataset, "class_to_idx", {})
        self.targets = getattr(dataset, "targets", [])
        self._unreadable = multiprocessing.Array("b", len(dataset), lock=False)

    @property
    def skipped(self) -> int:
        """How many different unreadable images were skipped so far."""
        return sum(self._unreadable)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        for offset in range(min(len(self.dataset), 100)):
            position = (index + offset) % len(self.dataset)
            try:
                return self.dataset[position]
            except ImageReadError as e:
                if not self._unreadable[position]:
                    self._unreadable[position] = 1
                    log.warning("skipping: %s", e)
        raise ImageReadError(f"100 unreadable images in a row near index {index}")


class UnlabeledImageFolder(Dataset):
    """Images directly inside one folder, each with target `UNLABELED` (-1)."""

    def __init__(
        self,
        root: str,
        transform: Callable | None = None,
        loader: Callable[[str], Image.Image] = load_image,
    ) -> None:
        """Initializes the dataset by scanning file names only (no image is opened).

        Args:
            root: The folder holding the images.
            transform: The image transform.
            loader: Decodes one image file (default `load_image`).
        """
        self.root = root
        self.transform = transform
        self.loader = loader
        self.samples = [(os.path.join(root, f), UNLABELED) for f in _scan(root)[1]]
        self.targets = [UNLABELED] * len(self.samples)
        self.classes: list[str] = []
        self.class_to_idx: dict[str, int] = {}
        if not self.samples:
            raise FileNotFoundError(f"no images found in '{root}'")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.loader(self.samples[index][0])
        return (self.transform(image) if self.transform else image), UNLABELED


def iter_images(folder: str) -> Iterator[str]:
    """The image files under `folder`, recursively, in sorted order.

    Hidden files and folders (".ipynb_checkpoints", ".cache") are skipped at every depth.
    Symbolic links to folders elsewhere are followed, but never one that points back to a folder
    it sits in (a loop, which would repeat the images forever), and each real folder is read once.
    """
    seen: set[str] = set()

    def unreadable(error: OSError) -> None:
        raise PermissionError(
            f"cannot read the folder '{error.filename}' ({error.strerror}); give this user read "
            "access to it or move it out of the dataset"
        )

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        kept = []
        for d in sorted(dirs):
            target = os.path.realpath(os.path.join(root, d))
            if d.startswith("."):
                continue
            if real == target or real.startswith(target + os.sep):
                log.warning("not following %s: it points back to %s", os.path.join(root, d), target)
                continue
            kept.append(d)
        dirs[:] = kept
        yield from (os.path.join(root, f) for f in sorted(files) if _is_image(f))


class _ClassFolder(ImageFolder):
    """An ImageFolder that, like `_scan`, skips hidden folders: as classes and, inside a class
    folder, as places to look for images; and reads each real directory once (`iter_images`)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _scan(directory)[0]
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(
        directory: str, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        return [
            (path, index)
            for name, index in sorted(class_to_idx.items(), key=lambda item: item[1])
            for path in iter_images(os.path.join(directory, name))
        ]


class ImageFolderSubsets(ConcatDataset):
    """Several image folders concatenated under one class index."""

    def __init__(self, datasets: Sequence[Dataset], classes: list[str]) -> None:
        super().__init__(datasets)
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.targets = [t for d in datasets for t in d.targets]

    @property
    def skipped(self) -> int:
        """Unreadable images left out of (cached) parts."""
        return sum(getattr(d, "skipped", 0) for d in self.datasets)


def _folder(
    path: str, transform: Callable | None, loader: Callable[[str], Image.Image] = load_image
) -> Dataset:
    """One folder: class subfolders make an ImageFolder, loose images an unlabeled set."""
    dirs, images = _scan(path)
    if not dirs:
        return UnlabeledImageFolder(path, transform, loader)
    empty = [d for d in dirs if next(iter_images(os.path.join(path, d)), None) is None]
    if empty:
        raise FileNotFoundError(
            f"class folder(s) {', '.join(empty)} in '{path}' hold no images "
            f"(extensions {', '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)"
        )
    return _ClassFolder(path, transform=transform, loader=loader, is_valid_file=_is_image)


def _is_class_folder_root(root: str, dirs: list[str]) -> bool:
    # A root whose subfolders hold images directly is itself one labeled folder (classes);
    # otherwise its subfolders are subsets (train, val, ...).
    return any(_scan(os.path.join(root, d))[1] for d in dirs)


@register_dataset
def image_folder(
    root: str,
    subset: str | Sequence[str] | None = None,
    image_transform: Callable | None = None,
    skip_unreadable: bool = False,
    decode_size: int | None = None,
    cache_dir: str | None = None,
    cache_size: int | None = None,
    cache_output: str | None = None,
    **kwargs: Any,
) -> Dataset:
    """Builds a dataset from folders of images, one subfolder per class.

    Args:
        root: The dataset folder.
        subset: One subfolder of `root` (e.g. "train"), a list of them (concatenated with one
            shared class index; their class lists must agree), or None for all of them. With
            None, a root whose subfolders hold images directly is used as one class folder. A
            name ending in `?` ("unlabeled?") is optional: read where it exists, else skipped.
        image_transform: The transform applied to each PIL image (or uint8 tensor, see
            `cache_output`).
        skip_unreadable: Skip (and count) corrupt or truncated images instead of stopping
            with an error that names the file. With `cache_dir`, such files are found while
            building the cache, left out of the dataset and counted in its `skipped`.
        decode_size: Decode JPEGs at a reduced size whose short side stays >= this many pixels
            (see `load_image`); None (the default) decodes every image at full size. For the
            default `train_transforms` (224 px, scale >= 0.35, ratio >= 3/4) use 438.
        cache_dir: If set, every image is decoded once, shrunk to a short side <= `cache_size`
            and kept as uint8 pixels in a memory-mapped file in this folder (see
            `sesemi.datasets.cache`); later epochs and runs read the pixels instead of decoding.
            A relative path is taken relative to the parent of `root`; a folder inside `root`
            needs a hidden name (".cache"), so no run mistakes it for a subset. It is built when
            the dataset is built and rebuilt (unchanged files are copied, not decoded) when a
            file is added, removed or modified. None (the default): no cache.
        cache_size: The cached images' largest short side in pixels (never enlarged); default
            256. 438 loses no resolution under the default `train_transforms`.
        cache_output: What the cache hands `image_transform`: "pil" (the default; works with
            every transform) or "tensor", a `(3, H, W)` uint8 tensor (faster, for torchvision
            v2 transforms such as `train_transforms` and `center_crop_transforms`).
        **kwargs: Not used; an error if given.

    Returns:
        The dataset; its samples are `(image, target)` with target -1 for unlabeled folders.
    """
    if kwargs:
        raise TypeError(f"image_folder got unexpected argument(s): {', '.join(kwargs)}")
    loader = _loader(decode_size)
    if cache_dir is None:
        for key, value in (("cache_size", cache_size), ("cache_output", cache_output)):
            if value is not None:
                raise ValueError(
                    f"{key} is set but cache_dir is not; set the dataset's cache_dir to use "
                    f"the image cache, or remove {key}"
                )
        built = _image_folder(root, subset, image_transform, loader)
        return SkipUnreadable(built) if skip_unreadable else built
    cache = functools.partial(
        _cached,
        cache_dir=_cache_dir(cache_dir, root, decode_size),
        cache_size=_cache_size(cache_size),
        output=_cache_output(cache_output),
        skip_unreadable=skip_unreadable,
    )
    return _image_folder(root, subset, image_transform, loader, cache)


def _cache_dir(cache_dir: Any, root: str, decode_size: int | None) -> str:
    if isinstance(cache_dir, bool) or not isinstance(cache_dir, str | os.PathLike) or not cache_dir:
        raise ValueError(
            f"cache_dir must be a folder path or null, got {cache_dir!r}; "
            "e.g. cache_dir: /scratch/sesemi_cache"
        )
    if decode_size is not None:
        raise ValueError(
            "decode_size has no effect with cache_dir (the cache decodes each image once, "
            "at cache_size); remove decode_size"
        )
    path = os.path.join(os.path.dirname(os.path.abspath(root)), os.path.expanduser(cache_dir))
    inside = os.path.relpath(path, root).split(os.sep)
    if inside[0] not in (".", "..") and not any(p.startswith(".") for p in inside):
        # It would be scanned as a subset or class folder of the next run.
        raise ValueError(
            f"cache_dir '{path}' is inside the dataset folder '{root}'; put it outside "
            "(e.g. next to it) or give it a hidden name such as .cache"
        )
    return path


def _cache_size(cache_size: Any) -> int:
    if cache_size is None:
        return 256
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
        raise ValueError(
            f"cache_size must be a positive integer (the cached short side in pixels, "
            f"e.g. 256), got {cache_size!r}"
        )
    return cache_size


def _cache_output(output: Any) -> str:
    if output is None:
        return "pil"
    if output not in OUTPUTS:
        raise ValueError(f"cache_output must be 'pil' or 'tensor', got {output!r}")
    return output


def _load_for_cache(path: str, draft_size: int) -> Image.Image:
    return load_image(path, draft_size)  # looked up at call time, so tests can count calls


def _cached(
    folder: Dataset, cache_dir: str, cache_size: int, output: str, skip_unreadable: bool
) -> Dataset:
    """Serves one folder dataset from its image cache, building the cache first if needed."""
    paths = [p for p, _ in folder.samples]
    try:
        cache = open_cache(paths, folder.root, cache_dir, cache_size, _load_for_cache)
    except PermissionError as e:
        raise PermissionError(
            f"cannot write the image cache in '{cache_dir}' ({e.strerror}); set the dataset's "
            "cache_dir to a writable folder"
        ) from None
    if cache.unreadable and not skip_unreadable:
        first = next(iter(cache.unreadable.values()))
        more = len(cache.unreadable) - 1
        raise ImageReadError(
            first + (f"; {more} more unreadable image(s) are in the log" * bool(more))
        )
    return CachedImageFolder(folder, cache, output)


def _existing_subsets(root: str, subsets: list[str]) -> list[str]:
    """Drops optional subsets (a name ending in `?`, e.g. "unlabeled?") that `root` lacks."""
    kept = [
        name.rstrip("?")
        for name in subsets
        if not name.endswith("?") or os.path.isdir(os.path.join(root, name.rstrip("?")))
    ]
    if not kept:
        found = ", ".join(_scan(root)[0]) or "none"
        raise FileNotFoundError(
            f"none of the optional subsets {', '.join(subsets)} exists in '{root}' "
            f"(subfolders: {found}); fix the dataset's subset or root"
        )
    return kept


def require_folder(path: str, how: str) -> None:
    """A `data.prepare` for data users fetch themselves: refuses, before anything is built, a
    `path` that is not a folder, saying `how` to get it (e.g. the download command)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset folder '{os.path.abspath(path)}' does not exist; {how}")


def _image_folder(
    root: str,
    subset: str | Sequence[str] | None,
    image_transform: Callable | None,
    loader: Callable[[str], Image.Image] = load_image,
    cache: Callable[[Dataset], Dataset] | None = None,
) -> Dataset:
    """Builds the dataset; `cache`, if given, wraps each folder's dataset once all are checked."""
    wrap = cache or (lambda part: part)
    require_folder(root, "check run.data_root")
    if subset is None:
        dirs, _ = _scan(root)
        if not dirs or _is_class_folder_root(root, dirs):
            return wrap(_folder(root, image_transform, loader))
        subsets: list[str] = dirs
    else:
        subsets = _existing_subsets(root, [subset] if isinstance(subset, str) else list(subset))
    parts = []
    for name in subsets:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            found = ", ".join(_scan(root)[0]) or "none"
            raise FileNotFoundError(
                f"subset folder '{path}' does not exist (subfolders of {root}: {found}); "
                "fix the dataset's subset or root"
            )
        parts.append(_folder(path, image_transform, loader))
    if len(parts) == 1:
        return wrap(parts[0])
    labeled = [(n, p) for n, p in zip(subsets, parts, strict=True) if p.classes]
    classes = labeled[0][1].classes if labeled else []
    for n, p in labeled[1:]:
        if p.classes != classes:
            diff = sorted(set(p.classes) ^ set(classes))
            raise ValueError(
                f"subsets '{labeled[0][0]}' and '{n}' of '{root}' have different classes "
                f"(differing: {', '.join(diff)}); give them the same class folders"
            )
    return ImageFolderSubsets([wrap(p) for p in parts], classes)
