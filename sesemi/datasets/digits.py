"""Build a small on-disk image folder from scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

MANIFEST_NAME = "sesemi_digits.json"
SPLITS = ("train", "unlabeled", "val")
NUM_CLASSES = 10


def digit_to_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """Turn one 8x8 digit with values 0..16 into an upscaled RGB image.

    Args:
        pixels: The 8x8 array of intensities from ``load_digits().images``.
        image_size: Side length of the square output image in pixels.

    Returns:
        An RGB image whose three channels are identical.
    """
    gray = np.clip(np.rint(np.asarray(pixels, dtype=np.float64) * 255.0 / 16.0), 0, 255)
    image = Image.fromarray(gray.astype(np.uint8))  # 2-D uint8 -> mode "L"
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image.convert("RGB")


def _split_indices(
    target: np.ndarray, labels_per_class: int, val_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Draw a per-class stratified split into labeled, unlabeled and validation indices."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(target == label))
        n_val = int(round(val_fraction * len(members)))
        n_pool = len(members) - n_val
        if n_val < 1:
            raise ValueError(
                f"val_fraction={val_fraction} leaves class {label} with no validation images; "
                "use a larger value"
            )
        if labels_per_class >= n_pool:
            raise ValueError(
                f"labels_per_class={labels_per_class} is too large: class {label} has only "
                f"{n_pool} training images after the val split, so at most {n_pool - 1} "
                "can be labeled and still leave some unlabeled"
            )
        splits["val"].extend(members[:n_val].tolist())
        splits["train"].extend(members[n_val : n_val + labels_per_class].tolist())
        splits["unlabeled"].extend(members[n_val + labels_per_class :].tolist())
    return {name: sorted(indices) for name, indices in splits.items()}


def _count_pngs(root: pathlib.Path) -> dict[str, int]:
    """Count the PNG files in each split's class folders."""
    return {name: sum(1 for _ in (root / name).glob("*/*.png")) for name in SPLITS}


def _check_existing(root: pathlib.Path, params: dict) -> bool:
    """Return True if ``root`` holds this exact build, False if absent or empty, else raise."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; choose another root")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        if any(root.iterdir()):
            raise FileExistsError(
                f"{root} is not empty and has no {MANIFEST_NAME}; refusing to overwrite it, "
                "delete the folder or choose another root"
            )
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        old_params, old_counts = manifest["params"], manifest["counts"]
    except (ValueError, KeyError, TypeError):
        old_params, old_counts = "<unreadable manifest>", None
    if old_params != params:
        raise FileExistsError(
            f"{root} was built with parameters {old_params}, not {params}; "
            "delete the folder or choose another root"
        )
    found = _count_pngs(root)
    if found != old_counts:
        raise FileExistsError(
            f"{root} is incomplete: expected {old_counts} images per split but found {found}; "
            "delete the folder to rebuild it"
        )
    return True


def prepare_digits(
    root: str | os.PathLike,
    labels_per_class: int = 5,
    val_fraction: float = 0.3,
    image_size: int = 32,
    seed: int = 0,
) -> pathlib.Path:
    """Write the digits as ``root/{train,unlabeled,val}/<class>/<index>.png``.

    ``train`` holds exactly ``labels_per_class`` images per class, ``val`` a stratified
    ``val_fraction`` of each class and ``unlabeled`` the rest, still sorted into class
    folders so pseudo-label accuracy can be measured. File names are the zero-padded
    index in ``load_digits`` order. The split depends only on ``seed``,
    ``labels_per_class`` and ``val_fraction``. A finished build is recorded in
    ``root/sesemi_digits.json``; calling again with the same arguments does nothing.

    Args:
        root: Folder to create.
        labels_per_class: Number of labeled training images per class.
        val_fraction: Fraction of each class held out for validation.
        image_size: Side length of the saved square images in pixels.
        seed: Seed for the random split.

    Returns:
        The root path.

    Raises:
        ValueError: If an argument is out of range.
        FileExistsError: If ``root`` exists and holds anything but this exact build.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if labels_per_class < 1:
        raise ValueError(f"labels_per_class must be at least 1, got {labels_per_class}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")

    root = pathlib.Path(root)
    params = {  # alphabetical, like the saved manifest, so error messages line up
        "image_size": int(image_size),
        "labels_per_class": int(labels_per_class),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
    }
    if _check_existing(root, params):
        return root

    digits = load_digits()
    splits = _split_indices(digits.target, labels_per_class, val_fraction, seed)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for split, indices in splits.items():
            for label in range(NUM_CLASSES):
                (tmp / split / str(label)).mkdir(parents=True)
            for index in indices:
                path = tmp / split / str(digits.target[index]) / f"{index:04d}.png"
                digit_to_image(digits.images[index], image_size).save(path)
        manifest = {"params": params, "counts": {s: len(i) for s, i in splits.items()}}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if root.exists():
            root.rmdir()  # _check_existing allowed only an empty folder here
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build the digits folder and print a summary.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sesemi.datasets.digits",
        description="Write scikit-learn's 8x8 digits as a train/unlabeled/val image folder.",
    )
    parser.add_argument("--root", default="./data/digits", help="output folder")
    parser.add_argument("--labels-per-class", type=int, default=5)
    parser.add_argument("--val-fraction", type=float, default=0.3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = prepare_digits(
            args.root, args.labels_per_class, args.val_fraction, args.image_size, args.seed
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = json.loads((root / MANIFEST_NAME).read_text())["counts"]
    summary = ", ".join(f"{counts[split]} {split}" for split in SPLITS)
    print(f"digits: {summary} images in {root.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


class PrepareDigits:
    """A Hydra callback that prepares the digits folder before a job starts (see `demo.yaml`).

    Named under `hydra.callbacks`, it runs once per job before any data is read; it is a no-op
    when the folder is already prepared with the same parameters.
    """

    def __init__(self, root: str, **kwargs: object) -> None:
        """Initializes the callback.

        Args:
            root: The folder to prepare (relative to the launch directory).
            **kwargs: Any other `prepare_digits` argument (labels_per_class, seed, ...).
        """
        self.root = root
        self.kwargs = kwargs

    def on_job_start(self, config: object, **kwargs: object) -> None:
        """Prepares the folder; Hydra calls this before the job's function."""
        prepare_digits(self.root, **self.kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str):  # the other Hydra callback hooks do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
