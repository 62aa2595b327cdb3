"""Every method on any data in one word: `method=<name>` trains on the digits and on an
imagewoof-shaped folder, in process, through the Python API."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import FAST, make_image_folder
from omegaconf import OmegaConf

import sesemi
from sesemi.cli import builtin_configs
from sesemi.data import SESEMIDataModule

# The loss terms each method adds to the supervised one (what its run must log).
HEADS = {
    "supervised": [],
    "rotation": ["rotation_prediction"],
    "rotation_flip": ["rotation_prediction"],
    "jigsaw": ["jigsaw_prediction"],
    "entropy_minimization": ["entropy_minimization"],
    "pi_model": ["pi_model"],
    "mean_teacher": ["mean_teacher"],
    "fixmatch": ["fixmatch"],
    "flexmatch": ["fixmatch"],
    "freematch": ["fixmatch"],
    "softmatch": ["fixmatch"],
    "fixmatch_da": ["fixmatch"],
    "debiaspl": ["fixmatch"],
    "fixmatch_balanced": ["fixmatch"],
    "flexmatch_da": ["fixmatch"],
    "flexmatch_balanced": ["fixmatch"],
    "openmatch": ["openmatch"],
    "outlier_exposure": ["outlier_exposure"],
    "cdmad": [],  # alone: supervised, evaluated with debiased logits
    "abc": ["abc"],  # alone: the balanced classifier pseudo-labels for itself
    "daso": ["fixmatch", "daso"],  # on FixMatch (ADD_ONS): it blends another head's labels
    "rotation_entropy": ["rotation_prediction", "entropy_minimization"],
    "noisy_student_teacher": [],
    "noisy_student": ["pseudo_label"],
}

# Add-ons that refine another head's pseudo-labels, trained here on the base method named.
ADD_ONS = {"daso": "fixmatch"}


def test_every_built_in_method_is_covered_here():
    assert sorted(HEADS) == builtin_configs("method")


@pytest.mark.parametrize(
    "balanced, policy",
    [("fixmatch_balanced", "fixmatch_da"), ("flexmatch_balanced", "flexmatch_da")],
)
def test_a_balanced_method_is_its_policy_with_class_balanced_labeled_batches(balanced, policy):
    # The measured long-tailed settings (benchmarks: POLICY + class_balanced, unfilled labeled
    # batches) in one word.
    one_word = sesemi.compose("demo", [f"method={balanced}"])
    unfilled = "data.train.supervised.full_batches=false"
    spelled = sesemi.compose(
        "demo", [f"method={policy}", "data.train.supervised.class_balanced=true", unfilled]
    )
    assert one_word == spelled and one_word.data.train.supervised.class_balanced
    assert not sesemi.compose("demo", [f"method={policy}"]).data.train.supervised.class_balanced


# The methods whose labeled batches are always full, as FixMatch's paper and USB draw them.
FULL_LABELED_BATCHES = {
    "fixmatch",
    "flexmatch",
    "freematch",
    "softmatch",
    "fixmatch_da",
    "debiaspl",
}  # flexmatch_da, fixmatch_balanced, flexmatch_balanced: unfilled, measured better (their files)


@pytest.mark.parametrize("method", sorted(HEADS))
def test_the_fixmatch_family_fills_every_labeled_batch(method, digits_root):
    # The demo's 50 labeled digits in batches of 4: full batches are 13 of 4 (two images repeated
    # with new crops); unfilled ones 12 of 4 and a last of 2.
    cfg = sesemi.compose(
        "demo", [f"method={method}", f"run.data_root={digits_root}", "data.image_size=32"]
    )
    full = method in FULL_LABELED_BATCHES
    assert cfg.data.train.supervised.full_batches == full
    labeled = OmegaConf.to_container(cfg.data.train.supervised, resolve=True)
    data = SESEMIDataModule({"train": {"supervised": labeled}}, digits_root, 4, seed=0)
    sizes = [len(batch[1]) for batch in data.train_dataloader()["supervised"]]
    assert sizes == ([4] * 13 if full else [4] * 12 + [2])


def test_flexmatch_da_aligns_to_uniform_in_front_of_flexmatchs_thresholds():
    # The measured 1-label setting: FlexMatch's policy wrapped by distribution alignment.
    threshold = "learner.hparams.model.regularization_loss_heads.fixmatch.head.threshold"
    flexmatch = sesemi.compose("demo", ["method=flexmatch"])
    one_word = sesemi.compose("demo", ["method=flexmatch_da"])
    node = OmegaConf.select(one_word, threshold)
    assert node._target_.endswith("DistributionAlignment") and node.target == "uniform"
    assert node.policy == OmegaConf.select(flexmatch, threshold)
    OmegaConf.update(one_word, threshold, OmegaConf.select(flexmatch, threshold), merge=False)
    # Its labeled batches are not filled (measured better at 1 label per class); FlexMatch's are.
    assert not one_word.data.train.supervised.full_batches
    assert flexmatch.data.train.supervised.full_batches
    one_word.data.train.supervised.full_batches = True
    assert one_word == flexmatch  # nothing else differs


def test_outlier_exposure_adds_its_loader_and_head_to_another_method():
    flexmatch = sesemi.compose("demo", ["method=flexmatch"])
    both = sesemi.compose("demo", ["method=[flexmatch,outlier_exposure]"])
    heads = both.learner.hparams.model.regularization_loss_heads
    assert (
        set(heads) == {"fixmatch", "outlier_exposure"}
        and heads.outlier_exposure.scale_factor == 0.5
    )
    assert both.data.train.outliers.dataset.subset == "outliers"
    assert set(both.data.train) == {*flexmatch.data.train, "outliers"}
    assert heads.fixmatch == flexmatch.learner.hparams.model.regularization_loss_heads.fixmatch


def test_cdmad_switches_on_debiasing_and_its_checkpoint_predicts_debiased(
    digits_root, tmp_path, one_thread
):
    import torch

    from sesemi.inference import load_trained_model, predict

    fixmatch = sesemi.compose("demo", ["method=fixmatch"])
    both = sesemi.compose("demo", ["method=[fixmatch,cdmad]"])
    debias = both.learner.hparams.model.debias_logits
    assert debias.pixel == 0.0 and fixmatch.learner.hparams.model.debias_logits is None
    both.learner.hparams.model.debias_logits = None
    assert both == fixmatch  # nothing else differs

    result = _fit("demo", "[fixmatch,cdmad]", digits_root, tmp_path)
    model = load_trained_model(result.last_checkpoint)
    assert model.net.reference_image == (-1.0, -1.0, -1.0)  # black; recorded as data
    files = [str(f) for f in sorted((digits_root / "val").glob("*/*"))[:6]]
    found = torch.stack([p.probabilities for p in predict(model, files)])
    from PIL import Image

    images = torch.stack([model.transform()(Image.open(f).convert("RGB")) for f in files])
    model.net.reference_image = None
    with torch.no_grad():
        black = torch.full_like(images[:1], -1.0)
        expected = (model.net(images) - model.net(black)).softmax(dim=1)
        raw = model.net(images).softmax(dim=1)
    torch.testing.assert_close(found, expected)
    assert not torch.allclose(found, raw, atol=1e-3)
    # The exported model subtracts the reference image's logits too.
    import onnxruntime

    from sesemi.export import export_onnx

    model.net.reference_image = (-1.0, -1.0, -1.0)
    onnx_file = export_onnx(model, str(tmp_path / "cdmad.onnx"))
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    _, probabilities = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(probabilities), expected, atol=1e-4, rtol=1e-4)


def test_abc_adds_a_balanced_classifier_that_its_checkpoint_predicts_with(
    digits_root, tmp_path, one_thread
):
    import torch
    from PIL import Image

    from sesemi.inference import load_trained_model, predict

    fixmatch = sesemi.compose("demo", ["method=fixmatch"])
    both = sesemi.compose("demo", ["method=[fixmatch,abc]"])
    model_node = both.learner.hparams.model
    assert model_node.balanced_head and not fixmatch.learner.hparams.model.balanced_head
    assert set(model_node.regularization_loss_heads) == {"fixmatch", "abc"}
    fixmatch_heads = fixmatch.learner.hparams.model.regularization_loss_heads
    assert model_node.regularization_loss_heads.fixmatch == fixmatch_heads.fixmatch
    assert both.data == fixmatch.data

    # ABC reads the labeled set's images per class.
    cfg = sesemi.compose("demo", ["method=[fixmatch,abc]", f"run.data_root={digits_root}"])
    train = OmegaConf.to_container(cfg.data.train, resolve=True)
    data = SESEMIDataModule({"train": train}, digits_root, 4, seed=0)
    classes = sorted(p.name for p in (digits_root / "train").iterdir())
    counts = [len(list((digits_root / "train" / c).iterdir())) for c in classes]
    assert data.class_counts()["supervised"] == counts

    result = _fit("demo", "[fixmatch,abc]", digits_root, tmp_path)
    assert {"train/abc/labeled_kept", "train/abc/mask_rate"} <= set(
        (Path(result.run_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    )
    model = load_trained_model(result.last_checkpoint)
    assert model.net.balanced_head is not None
    files = [str(f) for f in sorted((digits_root / "val").glob("*/*"))[:6]]
    found = torch.stack([p.probabilities for p in predict(model, files)])
    images = torch.stack([model.transform()(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        features = model.net.backbone(images)
        expected = model.net.balanced_head(features).softmax(dim=1)
        base = model.net.supervised_head(features).softmax(dim=1)
    torch.testing.assert_close(found, expected)
    assert not torch.allclose(found, base, atol=1e-3)
    # The exported model predicts with the balanced classifier too.
    import onnxruntime

    from sesemi.export import export_onnx

    onnx_file = export_onnx(model, str(tmp_path / "abc.onnx"))
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    _, probabilities = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(probabilities), expected, atol=1e-4, rtol=1e-4)


def test_a_balanced_head_with_no_head_to_train_it_stops_before_training(digits_root, tmp_path):
    cfg = sesemi.compose(
        "demo",
        [
            f"run.data_root={digits_root}",
            f"run.dir={tmp_path}",
            "learner.hparams.model.balanced_head=true",
            *FAST,
        ],
    )
    with pytest.raises(ValueError, match="no loss head trains it"):
        sesemi.fit(cfg)


def test_daso_alone_stops_before_training_and_names_a_base_method(digits_root, tmp_path):
    cfg = sesemi.compose(
        "demo", ["method=daso", f"run.data_root={digits_root}", f"run.dir={tmp_path}", *FAST]
    )
    with pytest.raises(ValueError, match=r"add one, e\.g\. 'method=\[fixmatch,daso\]'"):
        sesemi.fit(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_daso_adds_its_head_to_any_fixmatch_family_method_and_keeps_the_base():
    for base in ("fixmatch_da", "freematch"):
        alone = sesemi.compose("demo", [f"method={base}"])
        both = sesemi.compose("demo", [f"method=[{base},daso]"])
        heads = both.learner.hparams.model.regularization_loss_heads
        assert set(heads) == {"fixmatch", "daso"}
        assert heads.fixmatch == alone.learner.hparams.model.regularization_loss_heads.fixmatch
        assert both.data == alone.data
    # Blending starts after 2 % of the run, the paper's 5k of 250k steps.
    from sesemi.config.resolvers import SESEMIConfigAttributes, resolve

    cfg = sesemi.compose("demo", ["method=[fixmatch,daso]"])
    attributes = SESEMIConfigAttributes(
        iterations_per_epoch=6, max_iterations=600, num_gpus=0, num_nodes=1, num_classes=10
    )
    head = resolve(cfg.learner.hparams.model.regularization_loss_heads.daso.head, attributes)
    assert head["pretrain_steps"] == pytest.approx(12)


def test_a_daso_run_resumed_between_epochs_ends_with_the_same_weights_and_queues(
    digits_root, tmp_path, one_thread
):
    import torch

    def fit(name: str, *extra: str):
        overrides = [
            "method=[fixmatch,daso]",
            f"run.data_root={digits_root}",
            f"run.dir={tmp_path / name}",
            *FAST,
            "run.num_iterations=null",
            "run.seed=3",
            "data.train.supervised.full_batches=false",
            "learner.hparams.model.regularization_loss_heads.daso.head.dist_period=5",
            "learner.hparams.lr_scheduler=null",  # a schedule would follow each run's length
            *extra,
        ]
        return sesemi.fit(sesemi.compose("demo", overrides))

    whole = fit("whole", "run.num_epochs=2")
    first = fit("first", "run.num_epochs=1")
    rest = fit("rest", "run.num_epochs=2", f"run.resume_from_checkpoint={first.last_checkpoint}")
    a, b, c = (torch.load(r.last_checkpoint, weights_only=True) for r in (whole, first, rest))
    assert a["global_step"] == c["global_step"] == 2 * b["global_step"] > 5
    assert a["state_dict"].keys() == c["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, c["state_dict"][key]), key
    # The queues and the pseudo-label counts moved in the second epoch, and were carried over.
    daso = {k: v for k, v in a["state_dict"].items() if k.startswith("heads.daso.")}
    assert daso["heads.daso.periods"] > 0 and daso["heads.daso.queue_filled"].sum() > 0
    assert not torch.equal(daso["heads.daso.queue"], b["state_dict"]["heads.daso.queue"])


def write_pseudo_labels(folder: Path, images: Path, classes: list[str]) -> Path:
    """A `pseudo_labeled` folder labeling `images/<class>/*` with their folder's class."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pseudo_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "confidence", *[f"p:{c}" for c in classes]])
        for path in sorted(images.glob("*/*.png"))[:40]:
            probs = [1.0 if c == path.parent.name else 0.0 for c in classes]
            writer.writerow([os.path.relpath(path, folder), path.parent.name, 1.0, *probs])
    (folder / "pseudo_labels.json").write_text(
        json.dumps({"class_names": classes, "labels": "hard"})
    )
    return folder


def _trained_terms(result) -> set[str]:
    header = (Path(result.run_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    return {
        h[len("train/") : -len("_loss")]
        for h in header
        if h.startswith("train/") and h.endswith("_loss")
    }


def _fit(name: str, method: str, data_root: Path, tmp_path: Path, extra=()):
    if method in ADD_ONS:
        method = f"[{ADD_ONS[method]},{method}]"
    overrides = [f"method={method}", f"run.data_root={data_root}", f"run.dir={tmp_path / 'runs'}"]
    if method == "noisy_student":
        classes = sorted(p.name for p in (data_root / "train").iterdir())
        source = (
            data_root / "unlabeled" if (data_root / "unlabeled").is_dir() else data_root / "train"
        )
        pseudo = write_pseudo_labels(tmp_path / "pseudo", source, classes)
        overrides.append(f"data.train.pseudo.dataset.root={pseudo}")
    if method == "outlier_exposure":  # alone: supervised; any images serve as outliers here
        overrides.append("data.train.outliers.dataset.subset=val")
    return sesemi.fit(sesemi.compose(name, [*overrides, *FAST, *extra]))


@pytest.mark.parametrize("method", sorted(HEADS))
def test_every_method_trains_a_few_steps_on_the_digits(method, digits_root, tmp_path, one_thread):
    result = _fit("demo", method, digits_root, tmp_path)
    assert _trained_terms(result) == {"supervised", *HEADS[method]}
    assert 0.0 <= result.metrics["val/top1"] <= 1.0 and result.last_checkpoint is not None
    if method == "mean_teacher":
        assert "val/ema/top1" in result.metrics


@pytest.fixture(scope="module")
def imagewoof_root(tmp_path_factory) -> Path:
    """An imagewoof2-shaped folder: train/ and val/ with 10 class folders, no unlabeled/."""
    classes = tuple(f"n0208{i:04d}" for i in range(10))
    root = tmp_path_factory.mktemp("woof") / "imagewoof2"
    return make_image_folder(root, {"train": 3, "val": 1}, classes)


@pytest.mark.parametrize("method", sorted(HEADS))
def test_every_method_trains_a_few_steps_on_an_imagewoof_shaped_folder(
    method, imagewoof_root, tmp_path, one_thread
):
    result = _fit("imagewoof", method, imagewoof_root, tmp_path, ["data.image_size=32"])
    assert _trained_terms(result) == {"supervised", *HEADS[method]}
    assert result.metrics["val/top1"] >= 0.0


def test_training_batches_carry_each_samples_dataset_index(image_root):
    from sesemi.data import SESEMIDataModule

    cfg = sesemi.compose("base", [f"run.data_root={image_root}", "data.image_size=32"])
    data = SESEMIDataModule(cfg.data, cfg.run.data_root, 4, stages=("train",))
    loaders = data.train_dataloader()
    images, targets, indices = next(iter(loaders["supervised"]))
    dataset = data.train["supervised"].dataset
    assert images.shape == (4, 3, 32, 32) and indices.shape == (4,)
    assert targets.tolist() == [dataset.targets[i] for i in indices.tolist()]
    assert len(set(indices.tolist())) == 4  # shuffled, each a distinct sample
    rotated, labels = next(iter(loaders["rotation_prediction"]))  # its collation drops them
    assert rotated.shape == (16, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3] * 4
