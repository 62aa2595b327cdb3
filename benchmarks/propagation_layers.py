"""Would the `propagation` unknown score gain from features of earlier backbone stages?

Rescoring only: the checkpoints that `realworld_digits.py foreign --keep-checkpoints` left in its
work folders are loaded again, and for each set of stages the score is fitted on the global
average-pooled output of every stage in the set (each L2-normalized, then concatenated; the
last stage alone is what `open_sesemi predict --unknown-score propagation` uses) and its AUROC
measured as `realworld_digits.py` does: held-out images of digits 6-9 (their val split) against
the known digits' val images. `--settings` scores each set of stages with other settings of the
score too (neighbours k, damping alpha, similarity exponent gamma; `predict` uses 10,0.9,3).
Prints one table: run (method, foreign share, seed) x stages (x settings).

    python benchmarks/propagation_layers.py W1 W2 ... [--stages layer4 layer3,layer4]
        [--settings 10,0.9,3 30,0.5,3]

(W: a `--workdir` of `realworld_digits.py foreign ... --keep-checkpoints`; timm's stage names,
`model.feature_info`, e.g. layer1..layer4 for a ResNet.)
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics

import torch
import torch.nn.functional as F
from PIL import Image
from realworld_digits import FOREIGN, KNOWN  # the split of the runs rescored (this folder)
from sklearn.metrics import roc_auc_score

from sesemi.inference import list_images, load_trained_model
from sesemi.propagation import PropagationScorer

RUN = re.compile(r"foreign_(?P<method>.+)_r(?P<ratio>[\d.]+)_s(?P<seed>\d+)$")


@torch.no_grad()
def stage_features(model, files: list[str]) -> dict[str, torch.Tensor]:
    """Each stage's pooled output `(N, C)` for the images, by timm's stage name."""
    transform = model.transform()
    net = model.net.backbone.model
    names = [info["module"] for info in net.feature_info]
    found: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(files), 256):
        batch = [transform(Image.open(f).convert("RGB")) for f in files[start : start + 256]]
        outputs = net.forward_intermediates(torch.stack(batch), intermediates_only=True)
        for name, output in zip(names, outputs, strict=True):
            found[name].append(output.mean(dim=(2, 3)))
    return {name: torch.cat(parts) for name, parts in found.items()}


def joined(features: dict[str, torch.Tensor], stages: list[str]) -> torch.Tensor:
    return torch.cat([F.normalize(features[s], dim=1) for s in stages], dim=1)


def score_run(checkpoint: pathlib.Path, data: pathlib.Path, base: pathlib.Path, sets, settings):
    """AUROC per stage set (and setting of the score) for one run."""
    model = load_trained_model(str(checkpoint))
    known = [f for c in KNOWN for f in list_images([str(base / "val" / c)])]
    foreign = [f for c in FOREIGN for f in list_images([str(base / "val" / c)])]
    parts = [
        stage_features(model, files)
        for files in (
            list_images([str(data / "train")]),
            list_images([str(data / "unlabeled")]),
            known + foreign,
        )
    ]
    truth = [0] * len(known) + [1] * len(foreign)
    result = {}
    for stages in sets:
        labeled, unlabeled, held_out = (joined(p, stages) for p in parts)
        for setting in settings:
            k, alpha, gamma = setting.split(",")
            scorer = PropagationScorer.fit(labeled, unlabeled, int(k), float(alpha), float(gamma))
            auroc = float(roc_auc_score(truth, scorer.score(held_out).numpy()))
            result[column(stages, setting, settings)] = auroc
    return result


def column(stages: list[str], setting: str, settings: list[str]) -> str:
    name = ",".join(stages)
    return name if len(settings) == 1 else f"{name} @ {setting}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--stages", nargs="+", default=["layer4", "layer3,layer4"])
    parser.add_argument(
        "--settings", nargs="+", default=["10,0.9,3"], help="k,alpha,gamma of the score"
    )
    args = parser.parse_args()
    sets = [s.split(",") for s in args.stages]
    rows = {}
    for workdir in args.workdirs:
        for run in sorted((workdir / "runs").glob("foreign_*")):
            match = RUN.match(run.name)  # cleaned-and-retrained runs end in _filtered: skipped
            checkpoints = sorted(run.glob("job/*/checkpoints/last.ckpt"))
            if not match or not checkpoints:
                continue
            method, ratio, seed = match["method"], match["ratio"], match["seed"]
            data = workdir / f"foreign_r{ratio}_s{seed}"
            base = workdir / f"digits_s{seed}"
            found = score_run(checkpoints[-1], data, base, sets, args.settings)
            rows[method, float(ratio), int(seed)] = found
            print(f"{method} {ratio} s{seed}: {found}", flush=True)
    names = [column(s, setting, args.settings) for s in sets for setting in args.settings]
    print("\n| method | foreign share | seed | " + " | ".join(names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for (method, ratio, seed), found in sorted(rows.items()):
        cells = " | ".join(f"{found[n]:.3f}" for n in names)
        print(f"| {method} | {ratio:g} | {seed} | {cells} |")
    groups = sorted({(m, r) for m, r, _ in rows})
    for method, ratio in groups:
        for name in names:
            values = [v[name] for (m, r, _), v in rows.items() if (m, r) == (method, ratio)]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"- {method} at {ratio:g}, {name}: {statistics.mean(values):.3f} ± {spread:.3f}")


if __name__ == "__main__":
    main()
