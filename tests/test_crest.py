"""CReST (Wei et al., arXiv:2102.09559): `pseudo-label --balance crest` keeps a per-class share of
the pseudo-labels, rarer classes more, and `DatasetConfig.pseudo_labels` adds them to the
labeled set of the next run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder, open_sesemi, train_tiny_run

from sesemi.commands import balance_rows, crest_rates
from sesemi.data import build_dataset
from sesemi.inference import list_images, load_trained_model, predict


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_crest_rates_follow_the_formula():
    # Ranked by labeled images N_1 >= N_2 >= N_3 = 4, 2, 1: rank l keeps (N_{4-l} / N_1)^alpha.
    assert crest_rates([4, 1, 2], alpha=1.0) == [1 / 4, 1.0, 2 / 4]
    assert crest_rates([4, 1, 2], alpha=0.5) == pytest.approx([0.5, 1.0, 0.5**0.5])
    # Ties rank in class order: the second of two classes of 2 reads N_1 / N_1.
    assert crest_rates([2, 2, 1], alpha=1.0) == [0.5, 1.0, 1.0]
    assert crest_rates([5, 3], alpha=0.0) == [1.0, 1.0]  # alpha 0 keeps everything
    assert crest_rates([3, 0], alpha=1.0) == [0.0, 1.0]  # an unlabeled class keeps all
    with pytest.raises(ValueError, match="--crest-alpha"):
        crest_rates([4, 1], alpha=-1.0)
    with pytest.raises(ValueError, match="count per class"):
        crest_rates([0, 0], alpha=1.0)


def test_crest_balance_keeps_each_class_s_most_confident_share():
    rows = [[f"a{i}", "a", str(0.5 + i / 100)] for i in range(8)]  # a7 most confident
    rows += [["b1", "b", "0.6"], ["b2", "b", "0.9"]]
    rows += [["c1", "c", "0.7"], ["c2", "c", "0.99"], ["c3", "c", "0.8"]]
    kept = balance_rows(rows, "crest", rates={"a": 0.25, "b": 1.0, "c": 0.5})
    # a: int(0.25 * 8) = 2, b: both, c: int(0.5 * 3) = 1; each class most confident first.
    assert [r[0] for r in kept] == ["a7", "a6", "b2", "b1", "c2"]
    with pytest.raises(ValueError, match="rate per class"):
        balance_rows(rows, "crest")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crest")
    return {"root": root, **train_tiny_run(root)}


@pytest.mark.cli
def test_checkpoints_record_the_hand_labeled_images_per_class(run):
    # TINY_CONFIG's labeled set: 8 training images of each of its two classes.
    meta = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)["sesemi"]
    assert meta["labeled_class_counts"] == [8, 8]
    assert load_trained_model(str(run["checkpoint"])).labeled_class_counts == [8, 8]


@pytest.mark.cli
def test_pseudo_label_crest_keeps_the_rare_class_s_images(run, tmp_path):
    # The same weights, recorded as trained on 8 cats and 1 dog: alpha 1 keeps 1/8 of the
    # images labeled cat (the most confident) and every image labeled dog. The classifier's
    # bias is moved so that the pool splits into both classes (one epoch of training may not).
    images = make_image_folder(tmp_path / "pool", {"unlabeled": 12})
    files = list_images([str(images)])
    model = load_trained_model(str(run["checkpoint"]))
    log_p = torch.stack([p.probabilities for p in predict(model, files)]).log()
    checkpoint = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    head = checkpoint["state_dict"]["net.supervised_head.bias"]
    head[0] -= (log_p[:, 0] - log_p[:, 1]).median() + 1e-3
    checkpoint["sesemi"]["labeled_class_counts"] = [8, 1]
    skewed = tmp_path / "skewed.ckpt"
    torch.save(checkpoint, skewed)
    predicted = {"cat": [], "dog": []}
    for p in predict(load_trained_model(str(skewed)), files):
        confidence, index = p.probabilities.max(dim=0)
        predicted[["cat", "dog"][int(index)]].append((float(confidence), p.file))
    out = tmp_path / "crest"
    args = ("pseudo-label", str(skewed), str(images), "-o", str(out), "--balance", "crest")
    result = open_sesemi(*args, "--crest-alpha", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out / "pseudo_labels.csv")
    assert predicted["cat"] and predicted["dog"]
    for label, share in (("cat", 1 / 8), ("dog", 1.0)):
        confidence = dict((str(Path(f).resolve()), c) for c, f in predicted[label])
        got = [str((out / r["file"]).resolve()) for r in rows if r["label"] == label]
        assert len(got) == int(share * len(confidence))
        dropped = set(confidence) - set(got)
        if dropped:  # the most confident ones are kept
            assert min(confidence[f] for f in got) >= max(confidence[f] for f in dropped) - 1e-6
    meta = json.loads((out / "pseudo_labels.json").read_text())
    assert meta["balance"] == "crest" and meta["crest_rates"] == {"cat": 1 / 8, "dog": 1.0}
    bad = open_sesemi(*args, "--crest-alpha", "-1", "--overwrite", cwd=tmp_path)
    assert bad.returncode == 1 and "--crest-alpha must be at least 0" in bad.stderr


def _write_pseudo_labels(folder: Path, classes: list[str], rows: list[list]) -> None:
    folder.mkdir(exist_ok=True)
    with open(folder / "pseudo_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "confidence", *[f"p:{c}" for c in classes]])
        writer.writerows(rows)
    meta = {"class_names": classes, "labels": "hard"}
    (folder / "pseudo_labels.json").write_text(json.dumps(meta))


def test_pseudo_labels_join_a_labeled_dataset(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 3})
    pool = sorted(list_images([str(data / "train" / "dog")]))[:2]
    pseudo = tmp_path / "pseudo"
    rows = [[pool[0], "cat", "0.9", "0.9", "0.1"], [pool[1], "dog", "0.8", "0.2", "0.8"]]
    _write_pseudo_labels(pseudo, ["cat", "dog"], rows)  # absolute paths are kept
    transform = {
        "_target_": "sesemi.transforms.center_crop_transforms",
        "input_h": 32,
        "input_w": 32,
    }
    node = {"name": "image_folder", "root": str(data), "subset": "train"}
    node |= {"image_transform": transform, "pseudo_labels": str(pseudo)}
    dataset = build_dataset(node, None)
    assert len(dataset) == 6 + 2 and dataset.classes == ["cat", "dog"]
    assert dataset.targets == [0, 0, 0, 1, 1, 1, 0, 1]  # the labeled images' first
    image, target = dataset[6]
    assert image.shape == (3, 32, 32) and target == 0  # the pseudo-label, not the folder
    torch.testing.assert_close(image, dataset[3][0])  # the same file, the same transform
    _write_pseudo_labels(pseudo, ["dog", "cat"], rows)
    with pytest.raises(ValueError, match=r"name the classes \['dog', 'cat'\]"):
        build_dataset(node, None, "data.train.supervised.dataset")
    with pytest.raises(FileNotFoundError, match="pseudo-label"):
        build_dataset({**node, "pseudo_labels": str(tmp_path / "none")}, None)


@pytest.mark.cli
def test_a_next_generation_trains_on_the_expanded_labeled_set(run, tmp_path):
    out = tmp_path / "crest"
    unlabeled = make_image_folder(tmp_path / "pool", {"unlabeled": 8})
    args = ("pseudo-label", str(run["checkpoint"]), str(unlabeled), "-o", str(out))
    result = open_sesemi(*args, "--balance", "crest", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data.train.supervised.dataset.pseudo_labels={out}" in result.stdout
    added = len(_rows(out / "pseudo_labels.csv"))
    assert added == 16  # both classes had 8 labeled images: every pseudo-label is kept
    overrides = (f"data.train.supervised.dataset.pseudo_labels={out}", "run.id=generation1")
    fit = open_sesemi("-cd", "configs", "-cn", "custom", *overrides, cwd=run["root"])
    assert fit.returncode == 0, fit.stderr[-3000:]
    (checkpoint,) = (run["root"] / "runs" / "generation1").glob("*/checkpoints/last.ckpt")
    first = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    second = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # One epoch of batches of 4: 16 labeled images, then 16 + 16 pseudo-labeled ones.
    assert (first["global_step"], second["global_step"]) == (4, 8)
    assert second["sesemi"]["labeled_class_counts"] == [8, 8]  # the hand-labeled ones only


def test_a_stream_or_a_dataset_without_classes_takes_no_pseudo_labels(tmp_path):
    from torch.utils.data import IterableDataset, TensorDataset

    from sesemi.datasets.pseudo_labeled import WithPseudoLabels

    class Stream(IterableDataset):
        classes, targets = ["cat", "dog"], [0, 1]

        def __iter__(self):
            return iter([])

    with pytest.raises(ValueError, match="to a stream"):
        WithPseudoLabels(Stream(), str(tmp_path), None, "data.train.supervised.pseudo_labels")
    with pytest.raises(ValueError, match="without class names"):
        WithPseudoLabels(TensorDataset(torch.zeros(2)), str(tmp_path), None, "pseudo_labels")
