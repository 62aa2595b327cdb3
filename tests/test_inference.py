"""Using a trained checkpoint: predict, TTA, evaluation reports, ONNX export, pseudo-labels."""

from __future__ import annotations

import csv
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, TINY_CONFIG, make_image_folder, open_sesemi

from sesemi.inference import (
    list_images,
    load_trained_model,
    parse_tta,
    predict,
    tta_views,
    unknown_score,
)

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny two-class run (with kNN evaluation) and its last checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    data = make_image_folder(root / "data")
    (root / "configs").mkdir()
    config = TINY_CONFIG.format(data_root=data, runs=root / "runs")
    (root / "configs" / "custom.yaml").write_text(config)
    fit = open_sesemi("-cd", "configs", "-cn", "custom", "learner.hparams.knn={k:3}", cwd=root)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run_dir,) = glob.glob(str(root / "runs" / "tiny" / "*"))
    return {
        "root": root,
        "data": data,
        "run_dir": Path(run_dir),
        "checkpoint": Path(run_dir) / "checkpoints" / "last.ckpt",
    }


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_checkpoint_carries_class_names_and_preprocessing(trained):
    checkpoint = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)
    meta = checkpoint["sesemi"]
    assert meta["class_names"] == ["cat", "dog"]
    # The val transform of the config: center_crop_transforms at 32 px, defaults otherwise.
    assert meta["preprocessing"]["input_h"] == 32 and meta["preprocessing"]["crop_pct"] == 0.875
    model = load_trained_model(str(trained["checkpoint"]))
    assert model.class_names == ["cat", "dog"]


def test_fit_reports_its_last_validation(trained):
    with open(trained["run_dir"] / "val_confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert sum(int(v) for row in rows for v in row[1:]) == 8  # the 8 val images


def test_knn_accuracy_is_the_vote_of_the_labeled_images_features(trained):
    from sesemi.callbacks import KNNEvaluation
    from sesemi.datasets import dataset

    rows = _rows(trained["run_dir"] / "metrics.csv")
    logged = [float(r["val/knn/top1"]) for r in rows if r.get("val/knn/top1")][-1]
    # Recompute the last validation's vote from the final weights: bank = the labeled train
    # images, both read with the val transform; k = 3 as configured, temperature 0.07.
    model = load_trained_model(str(trained["checkpoint"]))
    knn = KNNEvaluation([], k=3, temperature=0.07)

    def features(subset):
        ds = dataset("image_folder", str(trained["data"]), subset, model.transform())
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            return knn._unit(model.net.backbone(images)), torch.tensor(ds.targets)

    knn._bank = features("train")
    val, targets = features("val")
    expected = (knn.scores(val, 2).argmax(dim=1) == targets).float().mean().item()
    assert logged == pytest.approx(expected, abs=1e-6)


def test_predict_writes_one_row_per_image_and_reports_unreadable(trained, tmp_path):
    images = tmp_path / "new"
    for split in ("cat", "dog"):
        for f in sorted((trained["data"] / "val" / split).glob("*.png"))[:2]:
            (images / split).mkdir(parents=True, exist_ok=True)
            (images / split / f.name).write_bytes(f.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (images / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "predictions.csv"
    args = ("predict", str(trained["checkpoint"]), str(images), "-o", str(out), "-k", "2")
    result = open_sesemi(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable" in result.stdout and "broken.jpg" in result.stderr
    rows = _rows(out)
    assert len(rows) == 5  # 4 images + the broken one, never notes.txt
    broken = [r for r in rows if r["file"].endswith("broken.jpg")]
    assert broken and broken[0]["error"] and not broken[0]["class_1"]
    for row in rows:
        if row["error"]:
            continue
        assert {row["class_1"], row["class_2"]} == {"cat", "dog"}
        s1, s2 = float(row["score_1"]), float(row["score_2"])
        assert s1 >= s2 and s1 + s2 == pytest.approx(1.0, abs=1e-5)
    # A second run never overwrites the first one's CSV without --overwrite.
    before = out.read_text()
    again = open_sesemi(*args, cwd=tmp_path)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert out.read_text() == before


@pytest.mark.parametrize("tta", ["flip", "crops", "flip,crops"])
def test_tta_averages_the_probabilities_of_its_views(trained, tta):
    model = load_trained_model(str(trained["checkpoint"]))
    model.preprocessing["crop_pct"] = 0.5  # corners distinct from the center crop
    files = list_images([str(trained["data"] / "val")])[:3]
    views = parse_tta(tta)
    got = torch.stack([p.probabilities for p in predict(model, files, batch_size=2, tta=views)])
    from sesemi.datasets.image_folder import load_image
    from sesemi.inference import _TTAInput

    prepare = _TTAInput(model.preprocessing, "crops" in views)
    batch = torch.stack([prepare(load_image(f)) for f in files])
    expected_views = tta_views(batch, views, (32, 32))
    assert len(expected_views) == {"flip": 2, "crops": 5, "flip,crops": 10}[tta]
    with torch.no_grad():
        expected = torch.stack([model.net(v).softmax(-1) for v in expected_views]).mean(0)
        plain = model.net(torch.stack([model.transform()(load_image(f)) for f in files]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain.softmax(-1), atol=1e-4)  # the views do change it


def test_tta_views_are_flips_and_corner_crops():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    center, top_left, top_right, bottom_left, bottom_right = tta_views(images, ("crops",), (2, 2))
    torch.testing.assert_close(center, images[..., 1:3, 1:3])
    torch.testing.assert_close(top_left, images[..., :2, :2])
    torch.testing.assert_close(bottom_right, images[..., 2:, 2:])
    plain, flipped = tta_views(images, ("flip",), (4, 4))
    torch.testing.assert_close(flipped, images.flip(-1))
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        parse_tta("rotate")


def test_test_mode_writes_confusion_matrix_and_per_class_accuracy(trained):
    args = ("-cd", "configs", "-cn", "custom", "run.mode=TEST")
    result = open_sesemi(
        *args, f"run.pretrained_checkpoint_path={trained['checkpoint']}", cwd=trained["root"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(sorted(glob.glob(str(trained["root"] / "runs" / "tiny" / "*")))[-1])
    with open(run_dir / "test_confusion_matrix.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header[1:] == ["cat", "dog"] and [r[0] for r in rows] == ["cat", "dog"]
    counts = np.array([[int(v) for v in r[1:]] for r in rows])
    assert counts.sum() == 8  # the test loader reads the 8 val images
    assert counts.sum(axis=1).tolist() == [4, 4]
    per_class = _rows(run_dir / "test_per_class_accuracy.csv")
    for i, row in enumerate(per_class):
        assert float(row["accuracy"]) == pytest.approx(counts[i, i] / 4, abs=1e-4)
    # sesemi's own summary (Lightning's results table before it is drawn by rich when installed).
    summary = result.stdout[result.stdout.index("sesemi TEST finished") :].splitlines()
    top1 = float(next(line for line in summary if line.split()[:1] == ["test/top1"]).split()[1])
    assert counts.trace() / 8 == pytest.approx(top1, abs=1e-4)
    assert (run_dir / "test_confusion_matrix.png").stat().st_size > 1000


def test_onnx_export_matches_pytorch(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    result = open_sesemi("export", str(trained["checkpoint"]), "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["sesemi.class_names"]) == ["cat", "dog"]
    assert json.loads(meta["sesemi.preprocessing"])["input_h"] == 32
    model = load_trained_model(str(trained["checkpoint"]))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        logits, probabilities = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = model.net(images)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
        np.testing.assert_allclose(probabilities, expected.softmax(-1).numpy(), atol=1e-4)


def test_pseudo_labels_keep_confident_images_and_train_a_student(trained, tmp_path):
    out = tmp_path / "pseudo"
    unlabeled = trained["data"] / "train"
    model = load_trained_model(str(trained["checkpoint"]))
    files = list_images([str(unlabeled)])
    confidence = [float(p.probabilities.max()) for p in predict(model, files)]
    threshold = float(np.median(confidence))
    args = ("pseudo-label", str(trained["checkpoint"]), str(unlabeled), "-o", str(out))
    result = open_sesemi(*args, "--threshold", str(threshold), "--labels", "soft", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out / "pseudo_labels.csv")
    assert len(rows) == sum(c >= threshold for c in confidence)
    assert all(float(r["confidence"]) >= threshold for r in rows)

    from sesemi.datasets import dataset

    soft = dataset("pseudo_labeled", root=str(out))
    hard = dataset("pseudo_labeled", root=str(out), soft=False)
    assert soft.classes == ["cat", "dog"] and len(soft) == len(rows)
    _, probabilities = soft[0]
    _, label = hard[0]
    assert probabilities.shape == (2,) and int(probabilities.argmax()) == label
    assert rows[0]["label"] == soft.classes[label]

    # The student: the experiment's config with method=noisy_student reading these labels.
    student = ("method=noisy_student", f"data.train.pseudo.dataset.root={out}", "run.id=student")
    student += ("data.train.pseudo.batch_size=4",)  # a handful of pseudo-labeled images
    fit = open_sesemi("-cd", "configs", "-cn", "custom", *student, cwd=trained["root"])
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run_dir,) = glob.glob(str(trained["root"] / "runs" / "student" / "*"))
    header = (Path(run_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "train/pseudo_label_loss" in header and "train/pseudo_label/agreement" in header


def test_bad_checkpoint_and_inputs_get_one_line(trained, tmp_path):
    fake = tmp_path / "fake.ckpt"
    fake.write_text("not a checkpoint")
    result = open_sesemi("predict", str(fake), str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "not a readable PyTorch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    result = open_sesemi(
        "predict", str(trained["checkpoint"]), str(tmp_path / "nope"), cwd=tmp_path
    )
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = open_sesemi("predict", str(trained["checkpoint"]), cwd=tmp_path)
    assert result.returncode == 1 and "no inputs" in result.stderr


def test_noisy_student_demo_stages_run_end_to_end(tmp_path, digits_root):
    tiny = [f"run.data_root={digits_root}", *FAST]
    teacher = open_sesemi("-cn", "demo", "method=noisy_student_teacher", *tiny, cwd=tmp_path)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    (checkpoint,) = glob.glob(str(tmp_path / "runs/demo/*/checkpoints/last.ckpt"))
    pseudo = tmp_path / "digits_pseudo"
    student = ["-cn", "demo", "method=noisy_student", *tiny]
    # Without pseudo-labels the student stops before training, saying how to make them.
    early = open_sesemi(*student, f"data.train.pseudo.dataset.root={pseudo}", cwd=tmp_path)
    assert early.returncode == 1 and "open_sesemi pseudo-label" in early.stderr
    label = open_sesemi(
        "pseudo-label", checkpoint, str(digits_root / "unlabeled"), "-o", str(pseudo), cwd=tmp_path
    )
    assert label.returncode == 0, label.stderr[-3000:]
    assert "1208 of 1208" in label.stdout  # threshold 0 keeps every unlabeled digit
    done = open_sesemi(*student, f"data.train.pseudo.dataset.root={pseudo}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = max(glob.glob(str(tmp_path / "runs/demo/*/metrics.csv")), key=os.path.getmtime)
    assert "train/pseudo_label_loss" in Path(metrics).read_text().splitlines()[0]


def test_the_python_api_predicts_what_the_cli_writes(trained, tmp_path):
    import sesemi

    files = list_images([str(trained["data"] / "val")])
    out = tmp_path / "predictions.csv"
    args = ("predict", str(trained["checkpoint"]), *files, "-o", str(out), "-k", "2")
    assert open_sesemi(*args, cwd=tmp_path).returncode == 0
    model = sesemi.load_classifier(trained["checkpoint"])
    predictions = model.predict(files)
    assert len(predictions) == len(files) == 8
    for row, p in zip(_rows(out), predictions, strict=True):
        assert row["class_1"] == p.label
        assert float(row["score_1"]) == pytest.approx(p.probability, abs=1e-6)
        assert p.probabilities[row["class_2"]] == pytest.approx(float(row["score_2"]), abs=1e-6)
    from PIL import Image

    (again,) = model.predict(Image.open(files[0]))  # a PIL image works too
    assert again.probabilities == pytest.approx(predictions[0].probabilities)
    # So does a uint8 numpy array (one image, a stack of images, or several in a list).
    array = np.asarray(Image.open(files[0]).convert("RGB"))
    (from_array,) = model.predict(array)
    assert from_array.probabilities == pytest.approx(predictions[0].probabilities)
    stack = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:3]])
    for p, expected in zip(model.predict(stack), predictions[:3], strict=True):
        assert p.probabilities == pytest.approx(expected.probabilities)
    assert len(model.predict([array, files[1]])) == 2
    with pytest.raises(TypeError, match=r"must be uint8 .* got float32"):
        model.predict(array.astype("float32") / 255)
    with pytest.raises(TypeError, match="cannot predict a dict"):
        model.predict([{"image": files[0]}])


def test_a_checkpoint_cannot_make_predict_run_code(trained, tmp_path):
    # A checkpoint whose recorded backbone names another callable is refused: the network is
    # rebuilt from sesemi's timm backbone and plain values, never from a `_target_` in the file.
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    checkpoint = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)
    checkpoint["sesemi"]["model"]["backbone"] = None
    hostile = {"_target_": "logging.basicConfig", "filename": str(victim), "filemode": "w"}
    checkpoint["hyper_parameters"]["hparams"]["model"]["backbone"] = hostile
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, path)
    result = open_sesemi("predict", str(path), str(trained["data"] / "val"), cwd=tmp_path)
    assert result.returncode == 1 and "cannot be rebuilt" in result.stderr
    assert victim.read_text() == "keep me"


def test_ema_weights_load_from_a_checkpoint(tmp_path):
    from sesemi.build import build_classifier

    hparams = {
        "num_classes": 3,
        "model": {
            "backbone": {"_target_": "sesemi.PyTorchImageModels", "name": "test_resnet"},
            "supervised_loss": {"callable": {"_target_": "torch.nn.CrossEntropyLoss"}},
            "ema": {"decay": 0.5},
        },
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1},
    }
    learner = build_classifier(hparams)
    with torch.no_grad():  # make student and teacher differ
        for p in learner.backbone.parameters():
            p.add_(1.0)
    path = tmp_path / "ema.ckpt"
    state = {"hyper_parameters": {"hparams": hparams}, "state_dict": learner.state_dict()}
    torch.save(state, path)
    images = torch.randn(2, 3, 32, 32)
    learner.eval()
    with torch.no_grad():
        teacher = load_trained_model(str(path), ema=True).net(images)
        student = load_trained_model(str(path)).net(images)
        torch.testing.assert_close(teacher, learner.ema(images))
        torch.testing.assert_close(student, learner.net(images))
    assert not torch.allclose(teacher, student)
    no_ema = {**hparams, "model": {**hparams["model"], "ema": None}}
    state = {"hyper_parameters": {"hparams": no_ema}}
    torch.save({**state, "state_dict": build_classifier(no_ema).state_dict()}, path)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_trained_model(str(path), ema=True)


def test_class_balancing_drops_the_least_confident_or_duplicates_the_most_confident():
    from sesemi.commands import balance_rows

    rows = [
        ["a1", "a", "0.9"], ["a2", "a", "0.5"], ["a3", "a", "0.7"],
        ["b1", "b", "0.6"],
        ["c1", "c", "0.8"], ["c2", "c", "0.95"],
    ]  # fmt: skip
    dropped = balance_rows(rows, "drop")  # to the smallest class: 1 each, the most confident
    assert [r[0] for r in dropped] == ["a1", "b1", "c2"]
    duplicated = balance_rows(rows, "duplicate")  # to the largest class: 3 each
    assert [r[0] for r in duplicated] == ["a1", "a3", "a2", "b1", "b1", "b1", "c2", "c1", "c2"]
    two = balance_rows(rows, "duplicate", per_class=2)  # larger classes keep their best 2
    assert [r[0] for r in two] == ["a1", "a3", "b1", "b1", "c2", "c1"]
    assert balance_rows(rows, "none") is rows
    with pytest.raises(ValueError, match="--balance"):
        balance_rows(rows, "oversample")


def test_pseudo_label_balance_option_writes_equal_class_counts(trained, tmp_path):
    out = tmp_path / "balanced"
    args = ("pseudo-label", str(trained["checkpoint"]), str(trained["data"] / "train"))
    result = open_sesemi(
        *args, "-o", str(out), "--balance", "duplicate", "--per-class", "5", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    labels = [r["label"] for r in _rows(out / "pseudo_labels.csv")]
    assert {label: labels.count(label) for label in set(labels)} == dict.fromkeys(set(labels), 5)
    assert json.loads((out / "pseudo_labels.json").read_text())["balance"] == "duplicate"


@pytest.mark.parametrize("opset", ["5", "999"])
def test_an_opset_the_exporter_cannot_write_is_one_line_and_writes_nothing(
    trained, tmp_path, opset
):
    out = tmp_path / "model.onnx"
    result = open_sesemi(
        "export", str(trained["checkpoint"]), "-o", str(out), "--opset", opset, cwd=tmp_path
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"--opset {opset} is not supported" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_broken_weights_or_an_unknown_device_are_one_line_and_write_nothing(trained, tmp_path):
    checkpoint = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["net.supervised_head.weight"].fill_(float("nan"))
    broken = tmp_path / "nan.ckpt"
    torch.save(checkpoint, broken)
    images = str(trained["data"] / "val")
    out = tmp_path / "predictions.csv"
    result = open_sesemi("predict", str(broken), images, "-o", str(out), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "nan.ckpt" in result.stderr and "non-finite" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    pseudo = tmp_path / "pseudo"
    args = ("pseudo-label", str(broken), images, "-o", str(pseudo), "--threshold", "0.99")
    result = open_sesemi(*args, cwd=tmp_path)
    assert result.returncode == 1 and "non-finite" in result.stderr
    assert not (pseudo / "pseudo_labels.csv").exists()
    result = open_sesemi(
        "predict", str(trained["checkpoint"]), images, "--device", "tpu9", cwd=tmp_path
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--device tpu9 is not a device" in result.stderr


def test_a_checkpoint_whose_description_does_not_fit_its_weights_is_one_line(trained, tmp_path):
    checkpoint = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)
    checkpoint["sesemi"]["model"]["backbone"]["name"] = "test_efficientnet"
    odd = tmp_path / "odd.ckpt"
    torch.save(checkpoint, odd)
    result = open_sesemi("predict", str(odd), str(trained["data"] / "val"), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "odd.ckpt" in result.stderr and "do not fit the network it describes" in result.stderr


def test_unknown_scores_match_their_formulas():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    torch.testing.assert_close(unknown_score(probs, "msp"), torch.tensor([0.0, 0.75, 0.3]))
    entropy = -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1)) / np.log(4)
    expected = torch.tensor([0.0, 1.0, entropy], dtype=torch.float32)
    torch.testing.assert_close(unknown_score(probs, "entropy"), expected)
    with pytest.raises(ValueError, match="unknown score 'energy'"):
        unknown_score(probs, "energy")


def test_predict_writes_an_unknown_score_and_marks_images_above_the_threshold(trained, tmp_path):
    images = trained["data"] / "val"
    out = tmp_path / "plain.csv"
    result = open_sesemi(
        "predict", str(trained["checkpoint"]), str(images), "-o", str(out), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    assert "prediction" not in rows[0]  # only with --unknown-threshold
    scores = sorted(float(r["unknown"]) for r in rows)
    for row in rows:  # msp: one minus the top probability
        assert float(row["unknown"]) == pytest.approx(1 - float(row["score_1"]), abs=2e-6)
    middle = (scores[0] + scores[-1]) / 2
    assert scores[0] < middle < scores[-1]  # the images differ, so a threshold splits them
    marked = tmp_path / "marked.csv"
    args = ("predict", str(trained["checkpoint"]), str(images), "-o", str(marked))
    result = open_sesemi(*args, "--unknown-threshold", str(middle), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    above = sum(s > middle for s in scores)
    assert f"({above} unknown: msp score above {middle})" in result.stdout
    for row in _rows(marked):
        expected = "unknown" if float(row["unknown"]) > middle else row["class_1"]
        assert row["prediction"] == expected
    entropy = tmp_path / "entropy.csv"
    result = open_sesemi(
        "predict", str(trained["checkpoint"]), str(images), "-o", str(entropy),
        "--unknown-score", "entropy", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for row in _rows(entropy):
        p = float(row["score_1"])
        h = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2) if 0 < p < 1 else 0.0
        assert float(row["unknown"]) == pytest.approx(h, abs=1e-4)


@pytest.mark.parametrize(
    "option, message",
    [
        (("--unknown-threshold", "1.5"), "--unknown-threshold must be in [0, 1], got 1.5"),
        (("--unknown-score", "energy"), "--unknown-score must be one of auto, msp, entropy, ova"),
        (("--unknown-score", "ova"), "has no one-vs-all heads (train with method=openmatch)"),
    ],
)
def test_bad_unknown_options_are_one_line_errors(trained, tmp_path, option, message):
    out = tmp_path / "p.csv"
    result = open_sesemi(
        "predict",
        str(trained["checkpoint"]),
        str(trained["data"] / "val"),
        "-o",
        str(out),
        *option,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and message in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
