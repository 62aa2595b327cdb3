"""Evaluation reports: per-class accuracy and the confusion matrix, as CSV files and a plot."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from torch import Tensor


def per_class_accuracy(matrix: Tensor) -> list[tuple[int, int, float]]:
    """Each class's `(images, correct, accuracy)` from a confusion matrix (rows: true class).

    A class without images has accuracy NaN.
    """
    rows = []
    for c in range(matrix.shape[0]):
        images, correct = int(matrix[c].sum()), int(matrix[c, c])
        rows.append((images, correct, correct / images if images else float("nan")))
    return rows


def write_confusion_report(
    matrix: Tensor, class_names: Sequence[str], out_dir: str, stage: str, plot: bool = True
) -> list[str]:
    """Writes `<stage>_confusion_matrix.csv`, `<stage>_per_class_accuracy.csv` and a PNG plot.

    Args:
        matrix: Counts `(C, C)`, rows the true class and columns the predicted one.
        class_names: The names of the C classes.
        out_dir: The folder to write to (the run directory).
        stage: "val" or "test", the files' prefix.
        plot: Also draw `<stage>_confusion_matrix.png` (needs matplotlib).

    Returns:
        The paths written.
    """
    names = list(class_names)
    counts = matrix.long().tolist()
    os.makedirs(out_dir, exist_ok=True)
    matrix_path = os.path.join(out_dir, f"{stage}_confusion_matrix.csv")
    with open(matrix_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *names])
        writer.writerows([name, *row] for name, row in zip(names, counts, strict=True))
    accuracy_path = os.path.join(out_dir, f"{stage}_per_class_accuracy.csv")
    with open(accuracy_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "images", "correct", "accuracy"])
        for name, (images, correct, accuracy) in zip(
            names, per_class_accuracy(matrix), strict=True
        ):
            writer.writerow([name, images, correct, f"{accuracy:.4f}"])
    written = [matrix_path, accuracy_path]
    if plot:
        path = os.path.join(out_dir, f"{stage}_confusion_matrix.png")
        written.append(_plot(counts, names, path, stage))
    return written


def _plot(counts: list[list[int]], names: list[str], path: str, stage: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    n = len(names)
    size = min(4 + 0.4 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    # Row-normalized colors (recall per true class), raw counts as text.
    totals = [max(sum(row), 1) for row in counts]
    shares = [[v / t for v in row] for row, t in zip(counts, totals, strict=True)]
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), names, rotation=90 if n > 10 else 45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = sum(map(sum, counts))
    correct = sum(counts[i][i] for i in range(n))
    ax.set_title(f"{stage}: {total} images, top-1 {correct / max(total, 1):.1%}")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i][j]:
                    color = "white" if shares[i][j] > 0.5 else "black"
                    ax.text(j, i, counts[i][j], ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
