"""`pseudo_labeled`: images labeled by a trained model (`open_sesemi pseudo-label`), to train on.

The folder holds `pseudo_labels.csv` (file, label, confidence, then one `p:<class>` probability
column per class; files relative to the folder) and `pseudo_labels.json` (class names, the
labeling options). Noisy Student (Xie et al., arXiv:1911.04252) trains a student on them.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, IterableDataset

from sesemi.datasets._registry import register_dataset
from sesemi.datasets.image_folder import SkipUnreadable, load_image

CSV_NAME = "pseudo_labels.csv"
META_NAME = "pseudo_labels.json"


class PseudoLabeledImages(Dataset):
    """Pseudo-labeled images: `(image, class index)`, or `(image, probabilities)` when soft."""

    def __init__(
        self,
        root: str,
        transform: Callable | None = None,
        soft: bool | None = None,
        min_confidence: float = 0.0,
    ) -> None:
        """Reads the labels (no image is opened).

        Args:
            root: The folder `open_sesemi pseudo-label -o` wrote.
            transform: The image transform.
            soft: Targets are the teacher's probabilities (float `(num_classes,)`) instead of
                its top class; None follows the `--labels` option the labels were made with.
            min_confidence: Leave out images whose top probability is below this.
        """
        csv_path, meta_path = os.path.join(root, CSV_NAME), os.path.join(root, META_NAME)
        if not os.path.isfile(csv_path) or not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"no pseudo-labels in '{root}' ({CSV_NAME} and {META_NAME}); make them with "
                "open_sesemi pseudo-label <teacher checkpoint> <unlabeled folder> -o <folder> "
                "and give that folder as the dataset's root (data.train.pseudo.dataset.root="
                "<folder> for method=noisy_student)"
            )
        with open(meta_path) as f:
            meta = json.load(f)
        self.classes: list[str] = list(meta["class_names"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.soft = meta.get("labels") == "soft" if soft is None else bool(soft)
        self.transform = transform
        self.samples: list[tuple[str, int]] = []
        probabilities = []
        with open(csv_path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            expected = [f"p:{c}" for c in self.classes]
            if header[3:] != expected:
                raise ValueError(f"'{csv_path}' does not match the classes in {META_NAME}")
            for row in reader:
                if float(row[2]) < min_confidence:
                    continue
                if row[1] not in self.class_to_idx:
                    raise ValueError(f"'{csv_path}': unknown class '{row[1]}' for {row[0]}")
                path = row[0] if os.path.isabs(row[0]) else os.path.join(root, row[0])
                self.samples.append((os.path.normpath(path), self.class_to_idx[row[1]]))
                probabilities.append([float(v) for v in row[3:]])
        if not self.samples:
            raise ValueError(
                f"'{csv_path}' keeps no images at min_confidence {min_confidence}; lower it or "
                "the pseudo-label --threshold"
            )
        self.targets = [t for _, t in self.samples]
        self.probabilities = torch.tensor(probabilities, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        image = load_image(path)
        image = self.transform(image) if self.transform else image
        return image, (self.probabilities[index] if self.soft else target)


class WithPseudoLabels(ConcatDataset):
    """A labeled dataset followed by the images of a pseudo-label folder with their top class:
    the expanded labeled set of CReST (Wei et al., arXiv:2102.09559), a `DatasetConfig`'s
    `pseudo_labels`.

    Attributes:
        labeled: The dataset of hand-labeled images.
        pseudo: The pseudo-labeled images (`PseudoLabeledImages`, hard labels).
        classes: The class names, the same in both.
        targets: The class index of every image, the labeled ones first.
    """

    def __init__(
        self, labeled: Dataset, folder: str, transform: Callable | None, where: str
    ) -> None:
        """Reads the pseudo-labels (no image is opened).

        Args:
            labeled: The labeled dataset; it needs `classes` and `targets` (an image folder).
            folder: The folder `open_sesemi pseudo-label -o` wrote.
            transform: The image transform for the pseudo-labeled images (the labeled ones').
            where: The config key of `folder`, for errors.
        """
        if isinstance(labeled, IterableDataset):
            raise ValueError(
                f"{where} adds pseudo-labeled images to a stream ({type(labeled).__name__}); "
                "write the pseudo-labeled images into the shards instead (open_sesemi shards)"
            )
        classes = getattr(labeled, "classes", None)
        targets = getattr(labeled, "targets", None)
        if not classes or targets is None:
            raise ValueError(
                f"{where} adds pseudo-labeled images to a dataset without class names and "
                f"targets ({type(labeled).__name__}); use it on a labeled image folder"
            )
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{where}: '{folder}' does not exist; make it with open_sesemi pseudo-label "
                "<checkpoint> <unlabeled folder> -o <folder> --balance crest"
            )
        pseudo = PseudoLabeledImages(folder, transform, soft=False)
        if list(pseudo.classes) != list(classes):
            raise ValueError(
                f"{where}: the pseudo-labels in '{folder}' name the classes {pseudo.classes}, "
                f"the labeled images {list(classes)}; label with a model of these classes"
            )
        super().__init__([labeled, pseudo])
        self.labeled, self.pseudo = labeled, pseudo
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [int(t) for t in targets] + list(pseudo.targets)


@register_dataset
def pseudo_labeled(
    root: str,
    subset: str | None = None,
    image_transform: Callable | None = None,
    soft: bool | None = None,
    min_confidence: float = 0.0,
    skip_unreadable: bool = False,
) -> Dataset:
    """Builds a dataset from the output folder of `open_sesemi pseudo-label`.

    Args:
        root: The folder holding `pseudo_labels.csv` and `pseudo_labels.json`.
        subset: A subfolder of `root` holding them, or None for `root` itself.
        image_transform: The transform applied to each PIL image.
        soft: Soft targets (the teacher's probabilities) or hard ones (its top class); None
            follows how the labels were made (`--labels`).
        min_confidence: Leave out images whose top probability is below this.
        skip_unreadable: Skip (and count) images that cannot be decoded.

    Returns:
        The dataset, with `classes` from the teacher.
    """
    folder = root if subset is None else os.path.join(root, subset)
    built = PseudoLabeledImages(folder, image_transform, soft, min_confidence)
    return SkipUnreadable(built) if skip_unreadable else built
