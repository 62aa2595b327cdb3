"""Measures how long building an `image_folder` dataset takes for a large folder (names only).

Usage: python benchmarks/scan_folder.py --files 100000 --classes 100
Creates empty `.png` files in a temporary folder (building the dataset never opens images), then
times `sesemi.dataset("image_folder", ...)` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from sesemi.datasets import dataset


def make_tree(root: str, files: int, classes: int) -> None:
    """Creates `files` empty PNG names spread over `classes` class folders."""
    for c in range(classes):
        os.makedirs(os.path.join(root, "train", f"class_{c:03d}"))
    for i in range(files):
        path = os.path.join(root, "train", f"class_{i % classes:03d}", f"{i:07d}.png")
        open(path, "wb").close()


def main() -> None:
    """Builds the tree, times the dataset construction, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        make_tree(root, args.files, args.classes)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            data = dataset("image_folder", root=root, subset="train")
            times.append(time.perf_counter() - start)
        assert len(data) == args.files and len(data.classes) == args.classes
    print(f"| files | classes | build time (s), best of {args.repeats} |")
    print("|---|---|---|")
    print(f"| {args.files:,} | {args.classes} | {min(times):.2f} |")
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
