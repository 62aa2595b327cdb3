"""`open_sesemi shards`: an image folder's subsets written as WebDataset tar shards + index.json.

`OUT/<subset>/<subset>-000000.tar, ...` hold the samples of each subset in a shuffled order (so a
shard mixes classes), each as `<id>.<ext>` (the image file's bytes as they are on disk) and
`<id>.cls` (its class index, -1 in a folder without class subfolders). The id is the image's
position in the subset's `image_folder` order (classes in order, files sorted), the index a
training run gives it. `OUT/index.json`, written last, lists the classes and, per subset, its
sample count, shards and their sample counts; `sesemi.datasets.wds_shards` reads it.

A write that stops (killed, disk full) leaves no index.json. Run again with the same options on
unchanged images, it keeps the shards it had finished (`OUT/.progress.json` records them) and
continues with the next one; otherwise it starts that output over.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sesemi.datasets import dataset
from sesemi.datasets.wds_shards import FORMAT, INDEX_NAME, import_webdataset

SUBSETS = ("train", "unlabeled", "val", "test")  # the subsets written unless told otherwise
PROGRESS_NAME = ".progress.json"

_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: (1024 if suffix == "ib" else 1000) ** power
    for power, prefix in enumerate("kmgt", start=1)
    for suffix in ("", "b", "ib")
}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as `1GB`, `500MB`, `1.5GiB`, `64kB` or `1000000` (units of 1000, or
    of 1024 with `iB`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    size = int(float(match.group(1)) * _UNITS[unit]) if unit in _UNITS else 0
    if size < 1:
        raise ValueError(f"cannot read the size '{text}'; write e.g. 1GB, 500MB or 2GiB")
    return size


@dataclass
class Subset:
    """One subset's images: `(path, target)` in `image_folder` order; `labeled` if in classes."""

    name: str
    samples: list[tuple[str, int]]
    labeled: bool


def scan(folder: str, subsets: Sequence[str] | None = None) -> tuple[list[Subset], list[str]]:
    """The subsets' images as `image_folder` reads them, and the labeled subsets' classes.

    Raises:
        FileNotFoundError: For a missing folder or subset (or none of the default ones).
        ValueError: If labeled subsets have different classes.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder '{folder}' does not exist")
    names = list(subsets or [s for s in SUBSETS if os.path.isdir(os.path.join(folder, s))])
    if not names:
        found = ", ".join(sorted(e.name for e in os.scandir(folder) if e.is_dir())) or "none"
        raise FileNotFoundError(
            f"'{folder}' has none of the subsets {', '.join(SUBSETS)} (subfolders: {found}); "
            "lay it out as <subset>/<class>/*.png or name them with --subsets"
        )
    scanned, classes, first = [], [], None
    for name in names:
        part = dataset("image_folder", folder, subset=name)  # errors name the folder
        if part.classes and first is None:
            classes, first = list(part.classes), name
        elif part.classes and list(part.classes) != classes:
            differing = sorted(set(part.classes) ^ set(classes))
            raise ValueError(
                f"subsets '{first}' and '{name}' of '{folder}' have different classes "
                f"(differing: {', '.join(differing)}); give them the same class folders"
            )
        scanned.append(Subset(name, list(part.samples), bool(part.classes)))
    return scanned, classes


def _fingerprint(
    folder: str, subsets: list[Subset], classes: list[str], options: dict[str, Any]
) -> str:
    # What the shards depend on: a rerun with another value starts over.
    digest = hashlib.sha256(json.dumps([FORMAT, classes, options]).encode())
    for subset in subsets:
        digest.update(f"\0{subset.name}\0".encode())
        for path, target in subset.samples:
            stat = os.stat(path)
            name = os.path.relpath(path, folder)
            digest.update(f"{name}\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path + ".partial", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".partial", path)


def _remove_shards(output: str, subset: str, keep: int = 0) -> None:
    """Removes `<subset>-NNNNNN.tar` files numbered `keep` and up (only files of that name)."""
    folder = os.path.join(output, subset)
    if not os.path.isdir(folder):
        return
    pattern = re.compile(re.escape(subset) + r"-(\d{6,})\.tar")
    for entry in os.scandir(folder):
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(1)) >= keep:
            os.remove(entry.path)


def _write_subset(
    subset: Subset,
    output: str,
    done: list[list],
    options: dict[str, Any],
    save: Callable[[], None],
    report: Callable[[str], None],
) -> None:
    """Writes a subset's shards after the `done` ones, appending each finished one to `done`."""
    wds = import_webdataset()
    folder = os.path.join(output, subset.name)
    os.makedirs(folder, exist_ok=True)
    order = list(range(len(subset.samples)))
    random.Random(f"{options['seed']}/{subset.name}").shuffle(order)
    start = sum(count for _, count in done)
    _remove_shards(output, subset.name, keep=len(done))
    if start >= len(order):
        return
    pattern = os.path.join(folder, subset.name.replace("%", "%%") + "-%06d.tar")

    def finished(fname: str, count: int) -> None:
        done.append([os.path.relpath(fname, output).replace(os.sep, "/"), count])
        save()
        report(f"{done[-1][0]}: {count} images")

    limits = {"maxcount": options["max_count"], "maxsize": options["max_size"]}
    # mtime=0: the same images give the same bytes, so a continued write equals a whole one.
    writer = wds.ShardWriter(pattern, **limits, start_shard=len(done), verbose=0, mtime=0)
    current, count = writer.fname, 0
    for id_ in order[start:]:
        path, target = subset.samples[id_]
        with open(path, "rb") as f:
            data = f.read()
        extension = os.path.splitext(path)[1][1:].lower()
        writer.write({"__key__": f"{id_:08d}", extension: data, "cls": target})
        if writer.fname != current:  # the previous shard is closed: record it
            finished(current, count)
            current, count = writer.fname, 0
        count += 1
    writer.close()
    finished(current, count)


def _progress(
    path: str, fingerprint: str, overwrite: bool, report: Callable[[str], None]
) -> dict[str, Any]:
    """The finished shards of an interrupted write of the same images and options, if any."""
    progress: dict[str, Any] = {}
    if os.path.isfile(path) and not overwrite:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            progress = json.load(f)
    if progress.get("fingerprint") == fingerprint:
        if progress["shards"]:
            report("continuing an interrupted write")
        return progress
    if progress:
        report("the images or options changed since the interrupted write: starting over")
    return {"fingerprint": fingerprint, "shards": {}}


def _remove_finished(output: str, index_path: str) -> None:
    """Removes a finished output's shards, then its index."""
    with contextlib.suppress(OSError, ValueError, KeyError), open(index_path) as f:
        for name in json.load(f)["subsets"]:
            if re.fullmatch(r"\w[\w.-]*", name):  # a folder inside output, nothing else
                _remove_shards(output, name)
    os.remove(index_path)


def write_shards(
    folder: str,
    output: str,
    max_size: int = 10**9,
    max_count: int = 100_000,
    subsets: Sequence[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    report: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Writes the subsets of an image folder as WebDataset shards plus index.json.

    Args:
        folder: The image folder: `<subset>/<class>/*` (a subset may hold loose images: they are
            unlabeled, class -1).
        output: The folder to write `<subset>/<subset>-NNNNNN.tar` and index.json into.
        max_size: A shard ends once it holds this many bytes (it may exceed it by one image).
        max_count: A shard ends once it holds this many images.
        subsets: The subsets to write; None: those of train, unlabeled, val, test that exist.
        seed: Seeds the order in which each subset's images are written.
        overwrite: Replace a finished output (one with index.json).
        report: Called with a line for each finished shard.

    Returns:
        The index (what index.json holds).

    Raises:
        FileExistsError: If `output` holds finished shards and `overwrite` is false.
    """
    if max_count < 1 or max_size < 1:
        raise ValueError(f"max_size and max_count must be positive, got {max_size}, {max_count}")
    index_path = os.path.join(output, INDEX_NAME)
    if os.path.exists(index_path) and not overwrite:
        raise FileExistsError(
            f"'{index_path}' already exists: '{output}' holds finished shards; choose another "
            "output or add --overwrite"
        )
    scanned, classes = scan(folder, subsets)
    inside = os.path.relpath(os.path.realpath(output), os.path.realpath(folder)).split(os.sep)
    if inside[0] != ".." and not any(part.startswith(".") and part != "." for part in inside):
        # Its folders would be read as subsets or classes of the image folder.
        raise ValueError(
            f"output '{output}' is inside the image folder '{folder}'; put it outside (e.g. "
            "next to it) or give it a hidden name such as .shards"
        )
    options = {"max_size": max_size, "max_count": max_count, "seed": seed}
    fingerprint = _fingerprint(folder, scanned, classes, options)
    progress_path = os.path.join(output, PROGRESS_NAME)
    progress = _progress(progress_path, fingerprint, overwrite, report)
    os.makedirs(output, exist_ok=True)
    if os.path.exists(index_path):  # overwrite: the old shards go first, then their index
        _remove_finished(output, index_path)
    save = functools.partial(_write_json, progress_path, progress)
    for subset in scanned:
        done = progress["shards"].setdefault(subset.name, [])
        _write_subset(subset, output, done, options, save, report)
    index = {
        "format": FORMAT,
        "classes": classes,
        "subsets": {
            s.name: {
                "count": len(s.samples),
                "labeled": s.labeled,
                "shards": [name for name, _ in progress["shards"][s.name]],
                "shard_counts": [count for _, count in progress["shards"][s.name]],
            }
            for s in scanned
        },
        "source": os.path.abspath(folder),
        "options": options,
        "sample": {
            "__key__": "the id: the image's position in the subset's image_folder order",
            "<ext>": "the image file's bytes (png, jpg, ...)",
            "cls": "the class index in classes; -1 in a folder without class subfolders",
        },
    }
    _write_json(index_path, index)
    os.remove(progress_path)
    return index
