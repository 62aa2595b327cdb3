"""Measures training-data throughput (images/s in one process) on a folder of full-size JPEGs.

Usage: python benchmarks/data_throughput.py [--images 200] [--repeats 3]

Makes `--images` JPEGs (quality 90) in a temporary folder from the two real photographs that ship
with scikit-learn (`load_sample_images`: china.jpg, flower.jpg, 640x427) by random crops, resizes
and flips: about 3 in 4 at ImageNet-like sizes (long side 450-520, 4:3 or 3:4), the rest with a
long side of 1,000-1,400 px. Then times, with `torch.set_num_threads(1)` and no worker processes,
a pass over the whole dataset (`dataset[i]` for every index, after a warm-up of 20 images) for:

(a) the plain torchvision pipeline: `ImageFolder`, `RandomResizedCrop(224, bicubic)`, flip,
    `ToTensor`, `Normalize`;
(b) sesemi's `base` training pipeline: `sesemi.dataset("image_folder", ...)` with
    `sesemi.transforms.train_transforms()` defaults (224 px, scale (0.35, 1), bilinear);
(c) (b) with `decode_size` (JPEG draft decoding at a reduced size that loses no resolution for
    that crop: decoded short side >= 224 / sqrt(0.35 * 3/4) = 438 px);
(d) (c) without the float conversion and normalization (uint8 output, to be normalized on the
    device);
(e) for reference only, NOT resolution-preserving: (d) with decode_size 224 (the short side is
    only kept >= the output size, so small crops of large images get upsampled);
(f) (b) reading the pre-resized image cache (`cache_dir`, `cache_size=256`: each image decoded
    once and stored as uint8 with its short side <= 256 px, ImageNet's standard resize; a crop of
    the default scale (0.35, 1) then has a short side of 155-256 px, median ~210 px, so a typical
    crop is upsampled by <= 7 % to 224 px), PIL images in, float normalized out: epochs after
    the first;
(g) (f) with `cache_output="tensor"` (the cache hands the transform a uint8 tensor) and uint8
    output (normalized on the device);
(h) (f) with `cache_output="tensor"`, float normalized out (same output as (a));
(i) (g) with `cache_size=438` (no crop of the default scale is upsampled: lossless as (c)).

The caches' one-off build (the first epoch) is timed separately, on one thread, and reported with
the table.

Passes are interleaved (a, b, ..., i, a, b, ...) so that load from other processes on the machine
spreads over all pipelines; the table gives the median and the best pass. Every pass of every
pipeline uses the same random seed. It also measures how much draft decoding changes the training
crops: the mean absolute difference (0-255 scale) between the same random crop taken from the
full decode and from the draft decode of each image that draft decoding reduces, both resized to
224 px, next to the difference between bilinear and bicubic resampling of the full-decode crop.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from sesemi.datasets import dataset
from sesemi.datasets.cache import open_cache
from sesemi.datasets.image_folder import load_image
from sesemi.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transforms

OUT = 224
SCALE_MIN, RATIO_MIN = 0.35, 3 / 4  # train_transforms' defaults
# Every crop side of RandomResizedCrop is >= sqrt(scale_min * ratio_min) * the image's short side.
DECODE_SIZE = math.ceil(OUT / math.sqrt(SCALE_MIN * RATIO_MIN))  # 438
WARMUP = 20
CACHE_SIZE = 256  # ImageNet's standard resize; 438 (= DECODE_SIZE) is lossless for every crop


def make_images(root: str, count: int, seed: int = 0) -> list[str]:
    """Writes `count` JPEGs in two class folders under `root`/train; returns their paths."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {
        os.path.splitext(os.path.basename(name))[0]: Image.fromarray(array)
        for name, array in zip(sample.filenames, sample.images, strict=True)
    }
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        name = list(photos)[i % len(photos)]
        photo = photos[name]
        big = rng.random() < 0.25
        long_side = int(rng.integers(1000, 1401) if big else rng.integers(450, 521))
        portrait = rng.random() < 0.25
        # A random crop of 60-100 % of the photo's height at 4:3 or 3:4, then a resize.
        ch = int(photo.height * rng.uniform(0.6, 1.0))
        cw = min(photo.width, round(ch * 4 / 3)) if not portrait else round(ch * 3 / 4)
        x = int(rng.integers(0, photo.width - cw + 1))
        y = int(rng.integers(0, photo.height - ch + 1))
        w, h = (
            (long_side, round(long_side * ch / cw))
            if cw >= ch
            else (
                round(long_side * cw / ch),
                long_side,
            )
        )
        image = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, "train", name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:04d}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return paths


def build_cache(root: str, cache_dir: str, cache_size: int) -> tuple[float, int]:
    """Builds the image cache of `root`/train on one thread; returns (seconds, pixel bytes)."""
    folder = dataset("image_folder", root, subset="train")  # uncached: the file list only
    start = time.perf_counter()
    paths = [p for p, _ in folder.samples]
    cache = open_cache(paths, folder.root, cache_dir, cache_size, load_image, threads=1)
    return time.perf_counter() - start, os.path.getsize(cache.pixels_path)


def pipelines(root: str, cache_dir: str) -> dict[str, Callable[[], object]]:
    """The datasets to time, by table label."""
    plain = T.Compose(
        [
            T.RandomResizedCrop(OUT, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    sesemi_float = train_transforms()
    # train_transforms ends with PILToTensor, ToDtype(float32), Normalize: keep the uint8 tensor.
    assert isinstance(sesemi_float.transforms[-2], v2.ToDtype)
    sesemi_uint8 = v2.Compose(sesemi_float.transforms[:-2])
    train = os.path.join(root, "train")

    def cached(transform: Callable, cache_size: int, output: str) -> object:
        return dataset(
            "image_folder",
            root,
            subset="train",
            image_transform=transform,
            cache_dir=cache_dir,
            cache_size=cache_size,
            cache_output=output,
        )

    return {
        "(a) torchvision plain (ImageFolder, RRC 224 bicubic, ToTensor, Normalize)": (
            datasets.ImageFolder(train, transform=plain)
        ),
        "(b) sesemi train_transforms() default (bilinear, float normalized)": dataset(
            "image_folder", root, subset="train", image_transform=sesemi_float
        ),
        f"(c) (b) + decode_size={DECODE_SIZE} (JPEG draft, no resolution lost)": dataset(
            "image_folder",
            root,
            subset="train",
            image_transform=sesemi_float,
            decode_size=DECODE_SIZE,
        ),
        "(d) (c) with uint8 output (no ToDtype/Normalize on CPU)": dataset(
            "image_folder",
            root,
            subset="train",
            image_transform=sesemi_uint8,
            decode_size=DECODE_SIZE,
        ),
        f"(e) reference, lossy: (d) with decode_size={OUT}": dataset(
            "image_folder", root, subset="train", image_transform=sesemi_uint8, decode_size=OUT
        ),
        f"(f) (b) reading the cache, cache_size={CACHE_SIZE} (PIL in, float normalized)": cached(
            sesemi_float, CACHE_SIZE, "pil"
        ),
        "(g) (f) with cache_output=tensor and uint8 output": cached(
            sesemi_uint8, CACHE_SIZE, "tensor"
        ),
        "(h) (f) with cache_output=tensor (float normalized)": cached(
            sesemi_float, CACHE_SIZE, "tensor"
        ),
        f"(i) (g) with cache_size={DECODE_SIZE} (lossless, as (c))": cached(
            sesemi_uint8, DECODE_SIZE, "tensor"
        ),
    }


def one_pass(data) -> float:
    """Images per second over the whole dataset, after a warm-up."""
    torch.manual_seed(0)
    for i in range(WARMUP):
        data[i]
    start = time.perf_counter()
    for i in range(len(data)):
        image, _ = data[i]
    elapsed = time.perf_counter() - start
    assert tuple(image.shape) == (3, OUT, OUT), image.shape
    return len(data) / elapsed


def breakdown(paths: list[str], repeats: int) -> dict[str, float]:
    """Milliseconds per image (median of `repeats` passes) of decoding and of transforms alone."""
    plain = T.Compose(
        [
            T.RandomResizedCrop(OUT, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    sesemi_float = train_transforms()
    full = [load_image(p) for p in paths]
    small = [load_image(p, DECODE_SIZE) for p in paths]
    steps: dict[str, Callable[[], object]] = {
        "decode, full size (load_image)": lambda: [load_image(p) for p in paths],
        f"decode, decode_size={DECODE_SIZE}": lambda: [load_image(p, DECODE_SIZE) for p in paths],
        "plain torchvision transform, full decode": lambda: [plain(im) for im in full],
        "sesemi train_transforms, full decode": lambda: [sesemi_float(im) for im in full],
        f"sesemi train_transforms, decode_size={DECODE_SIZE}": lambda: [
            sesemi_float(im) for im in small
        ],
        f"sesemi crop+flip+PILToTensor (uint8), decode_size={DECODE_SIZE}": lambda: [
            v2.Compose(sesemi_float.transforms[:-2])(im) for im in small
        ],
    }
    return _median_ms(steps, repeats, len(paths))


def _median_ms(steps: dict[str, Callable], repeats: int, count: int) -> dict[str, float]:
    """Milliseconds per image of each step over `count` images, median of `repeats` passes."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) / count * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def cache_breakdown(root: str, cache_dir: str, repeats: int) -> dict[str, float]:
    """Milliseconds per image (median of `repeats` passes) of the steps of the cached pipelines."""
    sesemi_float = train_transforms()
    crop_flip = v2.Compose(sesemi_float.transforms[:2])
    to_tensor, to_float, normalize = sesemi_float.transforms[2:]

    def cached(output: str):
        return dataset(
            "image_folder",
            root,
            subset="train",
            cache_dir=cache_dir,
            cache_size=CACHE_SIZE,
            cache_output=output,
        )

    pil, tensor = cached("pil"), cached("tensor")
    pil_images = [pil[i][0] for i in range(len(pil))]
    tensor_images = [tensor[i][0] for i in range(len(tensor))]
    pil_224 = [crop_flip(im) for im in pil_images]
    pil_crops = [to_tensor(im) for im in pil_224]
    tensor_crops = [crop_flip(im) for im in tensor_images]
    n = CACHE_SIZE
    steps: dict[str, Callable[[], object]] = {
        f"cache {n}: read as PIL (map slice, Image.frombuffer)": lambda: [
            pil[i] for i in range(len(pil))
        ],
        f"cache {n}: read as uint8 tensor (map slice, copy)": lambda: [
            tensor[i] for i in range(len(tensor))
        ],
        f"cache {n}: RandomResizedCrop + flip on PIL": lambda: [crop_flip(im) for im in pil_images],
        f"cache {n}: PILToTensor of the 224 px crop": lambda: [to_tensor(im) for im in pil_224],
        f"cache {n}: RandomResizedCrop + flip on uint8 tensor": lambda: [
            crop_flip(im) for im in tensor_images
        ],
        "ToDtype + Normalize, PIL path (channels-last strides from PILToTensor)": lambda: [
            normalize(to_float(x)) for x in pil_crops
        ],
        "ToDtype + Normalize, tensor path (contiguous)": lambda: [
            normalize(to_float(x)) for x in tensor_crops
        ],
    }
    return _median_ms(steps, repeats, len(pil))


def draft_difference(paths: list[str]) -> tuple[int, float, float]:
    """Compares crops of full and draft decodes; returns (images reduced, MAD draft, MAD bicubic).

    MAD: mean absolute pixel difference on the 0-255 scale between 224 px bilinear crops of the
    same region from the full decode and from the draft decode (images that draft reduces only),
    and between bilinear and bicubic resampling of the full-decode crop.
    """
    torch.manual_seed(0)
    draft, interp = [], []
    for path in paths:
        with Image.open(path) as im:
            full = im.convert("RGB")
        with Image.open(path) as im:
            im.draft("RGB", (DECODE_SIZE, DECODE_SIZE))
            small = im.convert("RGB")
        if small.size == full.size:
            continue
        top, left, h, w = v2.RandomResizedCrop.get_params(
            F.pil_to_tensor(full), (SCALE_MIN, 1.0), (RATIO_MIN, 1 / RATIO_MIN)
        )
        f = full.width / small.width
        a = F.pil_to_tensor(
            full.resize((OUT, OUT), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        )
        b = F.pil_to_tensor(
            small.resize(
                (OUT, OUT),
                Image.Resampling.BILINEAR,
                box=(left / f, top / f, (left + w) / f, (top + h) / f),
            )
        )
        c = F.pil_to_tensor(
            full.resize((OUT, OUT), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        )
        draft.append((a.float() - b.float()).abs().mean().item())
        interp.append((a.float() - c.float()).abs().mean().item())
    return len(draft), statistics.mean(draft or [0.0]), statistics.mean(interp or [0.0])


def main() -> None:
    """Builds the JPEG folder, times each pipeline, prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        paths = make_images(root, args.images)
        sizes = [Image.open(p).size for p in paths]
        cache_dir = os.path.join(root, ".cache")
        builds = {size: build_cache(root, cache_dir, size) for size in (CACHE_SIZE, DECODE_SIZE)}
        built = pipelines(root, cache_dir)
        rates: dict[str, list[float]] = {label: [] for label in built}
        for _ in range(args.repeats):
            for label, data in built.items():
                rates[label].append(one_pass(data))
        reduced, mad_draft, mad_interp = draft_difference(paths)
        steps = breakdown(paths, args.repeats)
        steps.update(cache_breakdown(root, cache_dir, args.repeats))

    print(f"`python {' '.join(sys.argv)}`\n")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.platform()}); "
        f"torch {torch.__version__}, Pillow {Image.__version__}; torch threads 1, "
        f"num_workers 0\n"
    )
    big = sum(max(s) >= 1000 for s in sizes)
    print(
        f"{len(paths)} JPEGs (q 90): {len(paths) - big} with long side 450-520 px, {big} with "
        f"long side 1,000-1,400 px; mean {statistics.mean(w * h for w, h in sizes) / 1e6:.2f} MP\n"
    )
    base = statistics.median(rates[next(iter(rates))])
    print(f"| pipeline | images/s per process, median of {args.repeats} (best) | speed-up vs (a) |")
    print("|---|---|---|")
    for label, values in rates.items():
        median = statistics.median(values)
        print(f"| {label} | {median:.0f} ({max(values):.0f}) | {median / base:.2f}x |")
    for size, (seconds, nbytes) in builds.items():
        print(
            f"\nCache build, cache_size={size} (the one-off first epoch; one thread, JPEG draft "
            f"decode + bicubic resize + write): {seconds:.2f} s, {len(paths) / seconds:.0f} "
            f"images/s ({len(paths) / seconds / base:.2f}x (a)); {nbytes / len(paths) / 1e3:.0f} "
            f"kB per image on disk."
        )
    print(
        f"\nDraft decoding (decode_size={DECODE_SIZE}) reduces {reduced} of {len(paths)} images "
        f"(short side >= {2 * DECODE_SIZE} px). Same random crop (scale >= {SCALE_MIN}) at "
        f"{OUT} px, full vs draft decode: mean |difference| {mad_draft:.2f} / 255; for scale, "
        f"bilinear vs bicubic on the full decode: {mad_interp:.2f} / 255."
    )
    print(f"\n| step (same images, one process) | ms per image, median of {args.repeats} |")
    print("|---|---|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
