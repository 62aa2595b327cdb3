"""Export a trained classifier to ONNX, with its class names and preprocessing as metadata."""

from __future__ import annotations

import json
import logging
import os
import warnings

import torch
from torch import Tensor, nn

from sesemi import __version__
from sesemi.inference import TrainedModel
from sesemi.models.net import ClassifierNet

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")


class _LogitsAndProbabilities(nn.Module):
    def __init__(self, net: ClassifierNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(images)
        return logits, logits.softmax(dim=-1)


MIN_OPSET = 18  # the lowest opset torch's dynamo exporter writes


def export_onnx(model: TrainedModel, path: str, opset: int = 18) -> str:
    """Writes `model` as ONNX: input "images" `(N, 3, H, W)` (N dynamic), outputs "logits" and
    "probabilities" `(N, num_classes)`.

    The model's `metadata_props` hold "sesemi.class_names" and "sesemi.preprocessing" (JSON),
    so the file alone is enough to prepare inputs and name outputs.

    Args:
        model: A loaded checkpoint (`sesemi.inference.load_trained_model`).
        path: The `.onnx` file to write.
        opset: The ONNX opset version.

    Returns:
        The path written.
    """
    try:
        import onnx
    except ImportError:
        raise ImportError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'sesemi[export]'"
        ) from None
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"--opset {opset} is not supported: torch's exporter writes opsets {MIN_OPSET} to "
            f"{newest} (the installed onnx's newest); choose one of them"
        )
    pre = model.preprocessing
    example = torch.zeros(2, 3, pre["input_h"], pre["input_w"])
    wrapper = _LogitsAndProbabilities(model.net.cpu().eval())
    tmp = path + ".partial"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            tmp,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    proto = onnx.load(tmp)
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if written != opset:
        os.remove(tmp)
        raise ValueError(f"the exporter wrote opset {written}, not {opset}; choose another --opset")
    metadata = {
        "sesemi.class_names": json.dumps(model.class_names),
        "sesemi.preprocessing": json.dumps(pre),
        "sesemi.version": __version__,
        "sesemi.checkpoint": os.path.basename(model.checkpoint),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, tmp)
    os.replace(tmp, path)
    return path
