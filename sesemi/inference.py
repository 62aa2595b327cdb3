"""Using a trained checkpoint: load the classifier with its class names and preprocessing,
list input images, and predict class probabilities with optional test-time augmentation."""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from sesemi.checkpoints import METADATA_KEY, read_checkpoint, upgrade_state_dict
from sesemi.datasets.image_folder import ImageReadError, _is_image, load_image
from sesemi.models.backbones import PyTorchImageModels
from sesemi.models.heads.openmatch import ova_probabilities
from sesemi.models.net import ClassifierNet
from sesemi.propagation import PropagationScorer
from sesemi.transforms import center_crop_transforms, interpolation_mode, to_normalized_tensor

log = logging.getLogger(__name__)

# The eval preprocessing a checkpoint records: `center_crop_transforms` arguments.
PREPROCESSING_KEYS = tuple(
    k for k in inspect.signature(center_crop_transforms).parameters if k != "uint8_output"
)
TTA_VIEWS = ("flip", "crops")
# `_target_`s of the one backbone an old checkpoint's hyperparameters may name to be rebuilt.
TIMM_BACKBONE_TARGETS = ("sesemi.PyTorchImageModels", "sesemi.models.backbones.PyTorchImageModels")


def preprocessing_from_transform(node: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `center_crop_transforms` arguments that reproduce an image-transform config node.

    A node of `center_crop_transforms` (or any recipe sharing its argument names, such as
    `train_transforms`) gives its values, with `center_crop_transforms` defaults for the rest.
    Returns None when the node names none of them.
    """
    if not node:
        return None
    parameters = inspect.signature(center_crop_transforms).parameters
    defaults = {k: parameters[k].default for k in PREPROCESSING_KEYS}
    given = {k: node[k] for k in PREPROCESSING_KEYS if k in node}
    if not given:
        return None
    merged = {**defaults, **given}
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in merged.items()}


# One image as `TrainedModel.predict` takes it: a path, a PIL image or a uint8 numpy array.
ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class ClassPrediction:
    """One image's prediction.

    Attributes:
        label: The most probable class's name.
        probability: Its probability.
        probabilities: Every class's probability, by class name (in the model's class order).
        unknown: How unlike the known classes the image looks, in [0, 1] (`unknown_score`,
            the kind `TrainedModel.predict` was asked for).
    """

    label: str
    probability: float
    probabilities: dict[str, float]
    unknown: float = 0.0


@dataclass
class TrainedModel:
    """A classifier loaded from a checkpoint, ready to predict.

    Attributes:
        net: The backbone and classifier in eval mode, returning logits.
        class_names: The class names in output order.
        preprocessing: `center_crop_transforms` arguments preparing an image for `net`.
        checkpoint: The checkpoint path.
        ova: The one-vs-all outlier detectors of a `method=openmatch` run (features -> 2K
            logits), or None.
        labeled_class_counts: The run's hand-labeled training images of each class, or None
            (older checkpoints, and runs without labeled images).
    """

    net: ClassifierNet
    class_names: list[str]
    preprocessing: dict[str, Any]
    checkpoint: str
    ova: nn.Module | None = None
    labeled_class_counts: list[int] | None = None

    def transform(self) -> v2.Compose:
        """The eval preprocessing: PIL image to a normalized `(3, H, W)` tensor."""
        return center_crop_transforms(**self.preprocessing)

    def predict(
        self,
        images: Sequence[ImageInput] | ImageInput,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        tta: str | Sequence[str] | None = None,
        unknown: str = "auto",
        scorer: PropagationScorer | None = None,
    ) -> list[ClassPrediction]:
        """Predicts image files or PIL images, as `open_sesemi predict` does.

        Args:
            images: Image paths, PIL images, uint8 numpy arrays `(H, W)` or `(H, W, 3|4)`
                (RGB, as PIL reads them; a `(N, H, W[, C])` array is N images), or a mix
                (one image alone is fine too).
            batch_size: Images per forward pass.
            device: Where the network runs ("cpu", "cuda", ...).
            tta: Test-time augmentation: None, "flip", "crops" or "flip,crops".
            unknown: The unknown score (`unknown_score`): "auto" (ova where the model has
                one-vs-all detectors, else msp), "msp", "entropy", "ova" or "propagation".
            scorer: For "propagation", the scorer of the training images (default:
                `self.propagation_scorer()`, from the run's folders).

        Returns:
            One `ClassPrediction` per image, in order: the top class, its probability, every
            class's probability and the unknown score. An unreadable file raises
            `ImageReadError` naming it.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)) or _is_one_array_image(images):
            images = [images]
        if unknown == "auto":
            unknown = "ova" if self.ova is not None else "msp"
        if unknown not in UNKNOWN_SCORES:
            raise ValueError(f"unknown score '{unknown}'; use auto or one of: {UNKNOWN_SCORES}")
        if unknown == "propagation" and scorer is None:
            scorer = self.propagation_scorer(batch_size=batch_size, device=device, tta=tta)
        items = [_as_item(i) for i in images]
        results = []
        features = scorer is not None
        for p in predict(self, items, batch_size, 0, device, parse_tta(tta), features=features):
            if p.probabilities is None:
                raise ImageReadError(p.error)
            label = self.class_names[int(p.probabilities.argmax())]
            every = dict(zip(self.class_names, p.probabilities.tolist(), strict=True))
            score = float(unknown_score(p.probabilities, unknown, p.inliers, p.features, scorer))
            results.append(ClassPrediction(label, every[label], every, score))
        return results

    def propagation_scorer(
        self,
        labeled: str | None = None,
        unlabeled: str | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        tta: str | Sequence[str] | None = None,
    ) -> PropagationScorer:
        """The `propagation` unknown score fitted on this model's training images: those in
        the folders given, else in the checkpoint's run's folders (`sesemi.propagation`)."""
        from sesemi.propagation import fit_scorer, training_images

        labeled_files = training_images(self.checkpoint, "labeled", labeled)
        unlabeled_files = training_images(self.checkpoint, "unlabeled", unlabeled)
        return fit_scorer(
            self, labeled_files, unlabeled_files, batch_size, 0, device, parse_tta(tta)
        )


def _is_array(value: Any, *ndims: int) -> bool:
    return isinstance(value, np.ndarray) and value.ndim in ndims


def _is_one_array_image(value: Any) -> bool:
    # (H, W) or (H, W, 1|3|4) is one image; (N, H, W) and (N, H, W, C) are N images.
    return _is_array(value, 2) or (_is_array(value, 3) and value.shape[2] in (1, 3, 4))


def _as_item(image: Any) -> str | Image.Image:
    """A path or a PIL image, as `predict` reads them, from what `TrainedModel.predict` takes."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if _is_array(image, 2, 3):
        shape = tuple(image.shape)
        if str(image.dtype) != "uint8" or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise TypeError(
                f"a numpy image must be uint8 (H, W) or (H, W, 3|4), got {image.dtype} {shape}; "
                "convert it, e.g. (x * 255).round().astype('uint8') for floats in [0, 1], or "
                "x.transpose(1, 2, 0) for channels first"
            )
        return Image.fromarray(image[..., 0] if len(shape) == 3 and shape[2] == 1 else image)
    raise TypeError(
        f"cannot predict a {type(image).__name__}; give image paths, PIL images or uint8 "
        "numpy arrays (H, W) or (H, W, 3)"
    )


def _backbone_from_spec(spec: Any, path: str) -> nn.Module:
    """Rebuilds a backbone from plain values; only sesemi's timm backbone can be rebuilt."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ValueError(
            f"'{path}' describes no sesemi.PyTorchImageModels backbone, so it cannot be rebuilt "
            "from the file alone; load it in Python with your backbone and load_state_dict"
        )
    kwargs = dict(spec)
    plain = (str, int, float, bool, type(None), list, tuple)
    for key, value in kwargs.items():
        if not isinstance(key, str) or not isinstance(value, plain):
            raise ValueError(f"'{path}': backbone argument '{key}' is not a plain value")
    kwargs["pretrained"] = False  # the checkpoint holds the weights; no download
    kwargs.pop("freeze", None)
    return PyTorchImageModels(**kwargs)


def _legacy_backbone_spec(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The backbone of a checkpoint written before it recorded its `model` description: the
    plain arguments of a `sesemi.PyTorchImageModels` node in its hyperparameters, if any."""
    try:
        node = dict(checkpoint["hyper_parameters"]["hparams"]["model"]["backbone"])
    except (KeyError, TypeError):
        return None
    if node.pop("_target_", None) not in TIMM_BACKBONE_TARGETS:
        return None
    return node


def load_trained_model(path: str, ema: bool = False) -> TrainedModel:
    """Loads a `Classifier` checkpoint's network on the CPU, as data.

    The file is read with `weights_only=True` and the network is rebuilt from the plain
    description the checkpoint records (a timm model name and its arguments); nothing named in
    the file is imported or called.

    Args:
        path: A checkpoint written by `open_sesemi` (best or last).
        ema: Use the EMA teacher's weights (checkpoints of runs with `model.ema`).

    Returns:
        The model with the class names and preprocessing recorded in the checkpoint; older
        checkpoints without them get class indices as names and default preprocessing, with a
        warning.
    """
    checkpoint = read_checkpoint(path)
    meta = checkpoint.get(METADATA_KEY) or {}
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' is not an open_sesemi checkpoint (no state_dict)")
    state = upgrade_state_dict(state)
    spec = (meta.get("model") or {}).get("backbone") or _legacy_backbone_spec(checkpoint)
    backbone = _backbone_from_spec(spec, path)
    prefix = "ema.average.module." if ema else "net."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if ema and not weights:
        raise ValueError(
            f"'{path}' holds no EMA weights (its run had no model.ema); drop --ema "
            "(ema=True in Python)"
        )
    head = weights.get("supervised_head.weight")
    if head is None:
        raise ValueError(f"'{path}' holds no classifier weights (net.supervised_head)")
    reference = (meta.get("model") or {}).get("reference_image")  # CDMAD's, or None
    if reference is not None and not (
        isinstance(reference, list | tuple) and all(isinstance(v, int | float) for v in reference)
    ):
        raise ValueError(f"'{path}' records a reference image that is not a list of numbers")
    net = ClassifierNet(
        backbone,
        int(head.shape[0]),
        reference_image=reference,
        balanced_head="balanced_head.weight" in weights,  # ABC's, which predicts when present
    )
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(
            f"'{path}': its weights do not fit the network it describes ({str(e).splitlines()[0]})"
        ) from None
    net.eval()
    class_names = meta.get("class_names")
    preprocessing = meta.get("preprocessing")
    if class_names is None:
        log.warning("'%s' records no class names; using class indices", path)
        class_names = [str(i) for i in range(net.num_classes)]
    if preprocessing is None:
        log.warning("'%s' records no preprocessing; using center_crop_transforms()", path)
        preprocessing = preprocessing_from_transform({"input_h": 224})
    counts = meta.get("labeled_class_counts")
    if counts is not None and (
        not isinstance(counts, list | tuple)
        or len(counts) != net.num_classes
        or not all(isinstance(n, int) and n >= 0 for n in counts)
    ):
        raise ValueError(f"'{path}' records labeled class counts that are not one count per class")
    return TrainedModel(
        net,
        list(class_names),
        dict(preprocessing),
        path,
        _ova(state, path),
        list(counts) if counts is not None else None,
    )


def _ova(state: Mapping[str, Tensor], path: str) -> nn.Module | None:
    """The one-vs-all layer of an OpenMatch head (`heads.<name>.ova`), if the run had one."""
    names = sorted(
        k[: -len(".weight")] for k in state if k.startswith("heads.") and k.endswith(".ova.weight")
    )
    if not names:
        return None
    weight, bias = state[f"{names[0]}.weight"], state.get(f"{names[0]}.bias")
    if weight.ndim != 2 or bias is None or bias.shape != weight.shape[:1]:
        raise ValueError(f"'{path}': its one-vs-all weights ({names[0]}) are malformed")
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    layer.load_state_dict({"weight": weight, "bias": bias})
    return layer.eval()


def list_images(inputs: Sequence[str], file_list: str | None = None) -> list[str]:
    """The image files to predict on: folders are searched recursively, files are kept as given.

    Args:
        inputs: Image files and folders.
        file_list: An optional text file with one image path per line (relative paths are
            taken from the list's folder).

    Returns:
        The files in the order given, each folder's images sorted; hidden files and files
        without an image extension inside folders are left out.
    """
    files: list[str] = []
    paths = list(inputs)
    if file_list is not None:
        if not os.path.isfile(file_list):
            raise FileNotFoundError(f"file list '{file_list}' does not exist")
        base = os.path.dirname(os.path.abspath(file_list))
        with open(file_list) as f:
            lines = [line.strip() for line in f]
        paths += [
            line if os.path.isabs(line) else os.path.join(base, line) for line in lines if line
        ]
    if not paths:
        raise ValueError("no inputs: give image files or folders, or --file-list")
    for path in paths:
        if os.path.isdir(path):
            found = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(folder, n) for n in sorted(names) if _is_image(n)]
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"input '{path}' does not exist")
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(paths)}")
    return files


def parse_tta(tta: str | Sequence[str] | None) -> tuple[str, ...]:
    """Parses a TTA option ("flip", "crops", "flip,crops", "none") into view names."""
    if tta is None or tta == "none" or tta == "":
        return ()
    names = tta.split(",") if isinstance(tta, str) else list(tta)
    unknown = [n for n in names if n not in TTA_VIEWS]
    if unknown:
        raise ValueError(
            f"unknown test-time augmentation {unknown}; use none, {', '.join(TTA_VIEWS)} "
            "or a comma-separated combination"
        )
    return tuple(dict.fromkeys(names))


UNKNOWN_SCORES = ("msp", "entropy", "ova", "propagation")


def unknown_score(
    probabilities: Tensor,
    kind: str = "msp",
    inliers: Tensor | None = None,
    features: Tensor | None = None,
    scorer: PropagationScorer | None = None,
) -> Tensor:
    """How unlike the known classes each image looks, in [0, 1], from its class probabilities.

    "msp": `1 - max_c p_c`, one minus the maximum softmax probability (Hendrycks & Gimpel,
    arXiv:1610.02136); "entropy": `H(p) / log C`, the prediction's entropy over its maximum.
    Both are 0 for a one-hot prediction and 1 - 1/C (msp) or 1 (entropy) for a uniform one.
    "ova": `1 - p_inlier(argmax_c p_c)`, OpenMatch's outlier score from the one-vs-all
    detector of the predicted class (`inliers`, from a `method=openmatch` model).
    "propagation": the share of the unlabeled training images better connected to the labeled
    ones than the image, through the features' neighbour graph (`sesemi.propagation`; `scorer`
    is fitted on the training images' features, `features` are the image's).

    Args:
        probabilities: Class probabilities `(..., C)` (TTA-averaged where `predict` averages).
        kind: "msp", "entropy", "ova" or "propagation".
        inliers: Each class's OVA inlier probability `(..., C)` (for "ova").
        features: The images' backbone features `(..., D)` (for "propagation").
        scorer: The `PropagationScorer` of the model's training images (for "propagation").
    """
    if kind == "propagation":
        if scorer is None or features is None:
            raise ValueError(
                "the 'propagation' unknown score needs the image's features and a "
                "PropagationScorer fitted on the training images' features"
            )
        return scorer.score(features.reshape(-1, features.shape[-1])).reshape(features.shape[:-1])
    if kind == "ova":
        if inliers is None:
            raise ValueError(
                "the 'ova' unknown score needs one-vs-all heads, which this model lacks (train "
                "it with method=openmatch); use msp or entropy"
            )
        predicted = probabilities.argmax(dim=-1, keepdim=True)
        return 1.0 - inliers.gather(-1, predicted).squeeze(-1)
    if kind == "msp":
        return 1.0 - probabilities.max(dim=-1).values
    if kind == "entropy":
        classes = probabilities.shape[-1]
        if classes < 2:
            return torch.zeros(probabilities.shape[:-1])
        p = probabilities.clamp(min=0.0)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(dim=-1)
        return (entropy / math.log(classes)).clamp(0.0, 1.0)
    raise ValueError(f"unknown score '{kind}'; use one of: {', '.join(UNKNOWN_SCORES)}")


class _TTAInput:
    """Prepares one PIL image for the model: the standard crop, or a larger one for five crops."""

    def __init__(self, preprocessing: Mapping[str, Any], crops: bool) -> None:
        self.crops = crops
        if not crops:
            self.transform = center_crop_transforms(**preprocessing)
            return
        h, w, pct = preprocessing["input_h"], preprocessing["input_w"], preprocessing["crop_pct"]
        interpolation = interpolation_mode(preprocessing["interpolation"])
        self.transform = v2.Compose(
            [
                v2.Resize(round(max(h, w) / pct), interpolation=interpolation, antialias=True),
                v2.CenterCrop((round(h / pct), round(w / pct))),
                *to_normalized_tensor(preprocessing["norm_mean"], preprocessing["norm_std"]),
            ]
        )

    def __call__(self, image: Any) -> Tensor:
        return self.transform(image)


def tta_views(images: Tensor, views: Sequence[str], size: tuple[int, int]) -> list[Tensor]:
    """The test-time views of a batch, each `(B, C, *size)`.

    With "crops", `images` are the larger center region and the views are its center and four
    corner crops of `size`; with "flip", every view is also taken mirrored.
    """
    crops = [images]
    if "crops" in views:
        crops = list(v2.functional.five_crop(images, list(size)))
        crops = [crops[4], *crops[:4]]  # center first
    if "flip" in views:
        crops = [c for crop in crops for c in (crop, crop.flip(-1))]
    return crops


class _ImageFiles(Dataset):
    """Image files decoded and prepared for prediction; an unreadable file yields its error."""

    def __init__(self, files: Sequence[str | Image.Image], transform: Any) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str]:
        item = self.files[index]
        try:
            image = item.convert("RGB") if isinstance(item, Image.Image) else load_image(item)
            return self.transform(image), index, ""
        except OSError as e:
            return None, index, str(e)


def _collate(items: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, list, list]:
    good = [(x, i) for x, i, _ in items if x is not None]
    failed = [(i, error) for x, i, error in items if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], failed


@dataclass
class Prediction:
    """One file's result: class probabilities (and, if asked for, the backbone's pooled
    features `(D,)`, averaged over the TTA views; for a model with one-vs-all heads, each class's
    inlier probability `(C,)`, averaged too), or the error that kept it from being read."""

    file: str
    probabilities: Tensor | None
    error: str = ""
    features: Tensor | None = None
    inliers: Tensor | None = None


@torch.no_grad()
def predict(
    model: TrainedModel,
    files: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    tta: Sequence[str] = (),
    progress: bool = False,
    features: bool = False,
) -> Iterator[Prediction]:
    """Predicts class probabilities for image files, in order, in batches.

    Args:
        model: The loaded model.
        files: Image files.
        batch_size: Images per forward pass (times the number of TTA views).
        num_workers: DataLoader processes decoding images.
        device: Where the model runs.
        tta: Test-time views to average probabilities over: "flip" (the mirrored image too)
            and/or "crops" (center and four corners of the region the standard crop comes from).
        progress: Show a progress bar on stderr.
        features: Also return each image's backbone features (`Prediction.features`).

    Yields:
        One `Prediction` per file, in the order of `files`.
    """
    from tqdm import tqdm

    pre = model.preprocessing
    size = (pre["input_h"], pre["input_w"])
    dataset = _ImageFiles(files, _TTAInput(pre, "crops" in tta))
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    net = model.net.to(device)
    bar = tqdm(total=len(files), unit="img", disable=not progress, dynamic_ncols=True)
    for images, indices, failed in loader:
        results: dict[int, Prediction] = {
            i: Prediction(files[i], None, error) for i, error in failed
        }
        if images is not None:
            views = tta_views(images.to(device), tta, size)
            outputs = [net.features_and_logits(v) for v in views]  # each (B, D), (B, K)
            pooled = [f for f, _ in outputs]
            probabilities = torch.stack([z.softmax(dim=-1) for _, z in outputs]).mean(dim=0)
            if not torch.isfinite(probabilities).all():
                raise ValueError(
                    f"the model of '{model.checkpoint}' gives non-finite outputs (NaN or inf): "
                    "its weights are broken; use another checkpoint of the run"
                )
            mean = torch.stack(pooled).mean(dim=0).float().cpu() if features else None
            inliers = None
            if model.ova is not None:
                ova = model.ova.to(device)
                inliers = [ova_probabilities(ova(f))[:, 1] for f in pooled]  # (B, K) each
                inliers = torch.stack(inliers).mean(dim=0).cpu()
            for k, (i, p) in enumerate(zip(indices, probabilities.float().cpu(), strict=True)):
                results[i] = Prediction(
                    files[i],
                    p,
                    features=mean[k] if features else None,
                    inliers=inliers[k] if inliers is not None else None,
                )
        for i in sorted(results):
            yield results[i]
        bar.update(len(results))
    bar.close()


def resolve_device(name: str) -> torch.device:
    """ "auto" is the first GPU when there is one, else the CPU; other names are torch's."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device {name} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available; use --device cpu")
    return device
