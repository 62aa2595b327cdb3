"""The `propagation` unknown score: the label mass against its closed form, the score on
hand-made clusters, the training folders read from a run, and `open_sesemi predict`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import open_sesemi, train_tiny_run
from omegaconf import OmegaConf

from sesemi.inference import list_images, load_trained_model, predict, unknown_score
from sesemi.propagation import PropagationScorer, fit_scorer, labeled_mass
from sesemi.suggest import training_folders


def _cluster(centre: list[float], n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(centre) + 0.05 * torch.rand(n, len(centre), generator=g)


@pytest.mark.parametrize("gamma", [3.0, 2.0])
def test_labeled_mass_is_the_closed_form_of_the_propagation(gamma):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.rand(12, 4, generator=g), dim=1)
    labeled = torch.zeros(12, dtype=torch.bool)
    labeled[[0, 5]] = True
    k, alpha = 3, 0.8
    # The graph by hand: the k most similar other images, weight s^gamma, symmetrized.
    sims = x @ x.T
    sims.fill_diagonal_(float("-inf"))
    w = torch.zeros(12, 12, dtype=torch.float64)
    top = sims.topk(k, dim=1)
    w.scatter_(1, top.indices, top.values.double().pow(gamma))
    w = (w + w.T) / 2
    d = w.sum(dim=1)
    s = w / d.sqrt()[:, None] / d.sqrt()[None, :]
    f = torch.linalg.solve(torch.eye(12, dtype=torch.float64) - alpha * s, labeled.double())
    expected = (f / d.sqrt()).float()
    torch.testing.assert_close(labeled_mass(x, labeled, k=k, alpha=alpha, gamma=gamma), expected)
    with pytest.raises(ValueError, match="alpha must be in"):
        labeled_mass(x, labeled, alpha=1.0)
    # A scorer fitted with these settings uses them for the graph and for its queries: a
    # query's mass is the mean of s^gamma * m over its k most similar training images.
    scorer = PropagationScorer.fit(x[labeled], x[~labeled], k=k, alpha=alpha, gamma=gamma)
    order = torch.cat([torch.nonzero(labeled).flatten(), torch.nonzero(~labeled).flatten()])
    torch.testing.assert_close(scorer.mass, expected[order])
    query = F.normalize(torch.rand(2, 4, generator=g), dim=1)
    best = (query @ scorer.bank.T).topk(k, dim=1)
    by_hand = (best.values.clamp(min=0).pow(gamma) * scorer.mass[best.indices]).mean(dim=1)
    torch.testing.assert_close(scorer.masses(query), by_hand)


def test_images_of_a_cluster_nobody_labeled_score_as_unknown():
    # Clusters A and B hold labeled images, C (as near to A as B is) holds none.
    a, b, c = [1.0, 0.2, 0.2, 0.0], [0.2, 1.0, 0.2, 0.0], [0.2, 0.2, 1.0, 0.0]
    labeled = torch.cat([_cluster(a, 2, 0), _cluster(b, 2, 1)])
    unlabeled = torch.cat([_cluster(a, 12, 2), _cluster(b, 12, 3), _cluster(c, 12, 4)])
    scorer = PropagationScorer.fit(labeled, unlabeled)
    assert scorer.labeled == 4 and len(scorer.reference) == 36
    known = torch.cat([_cluster(a, 5, 5), _cluster(b, 5, 6)])
    foreign = _cluster(c, 5, 7)
    known_scores, foreign_scores = scorer.score(known), scorer.score(foreign)
    assert ((0 <= known_scores) & (known_scores <= 1)).all()
    # C is no image's neighbour from A or B: no mass reaches it. Its images tie with C's 12
    # unlabeled ones (counted half) and have less mass than A's and B's 24.
    torch.testing.assert_close(foreign_scores, torch.full((5,), (24 + 6) / 36))
    assert known_scores.max() <= 24 / 36  # within the labeled clusters' images
    # An image unlike every training image (nearest: A, at cosine 0.38) gets little mass too:
    # less than every image of A and B (though more than C's none).
    novel = scorer.score(torch.tensor([[1.0, 0.2, 0.2, 2.5]]))
    torch.testing.assert_close(novel, torch.tensor([24 / 36]))
    # The score is the share of unlabeled images with more mass (ties count half).
    mass = scorer.masses(foreign[:1])
    more = (scorer.reference > mass).sum() + 0.5 * (scorer.reference == mass).sum()
    torch.testing.assert_close(foreign_scores[:1], (more / 36).reshape(1).float())
    # unknown_score reads it too; without a scorer it says what it needs.
    probs = torch.full((1, 2), 0.5)
    torch.testing.assert_close(
        unknown_score(probs, "propagation", features=foreign[:1], scorer=scorer), foreign_scores[:1]
    )
    with pytest.raises(ValueError, match="PropagationScorer"):
        unknown_score(probs, "propagation")
    with pytest.raises(ValueError, match="needs unlabeled images"):
        PropagationScorer.fit(labeled, unlabeled[:0])


def test_unlabeled_training_folders_come_from_the_runs_resolved_config(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    for split in ("train", "unlabeled", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)

    def image_folder(subset: str) -> dict:
        return {"dataset": {"name": "image_folder", "root": None, "subset": subset}}

    train = {
        "supervised": image_folder("train"),
        "fixmatch": image_folder("${data.unlabeled_subset}"),
        "other": image_folder("${sesemi:nowhere}"),  # unresolvable here: skipped, not the root
    }
    config = {
        "run": {"data_root": str(tmp_path / "data")},
        "data": {"unlabeled_subset": ["train", "unlabeled"], "train": train},
    }
    OmegaConf.save(OmegaConf.create(config), run / ".hydra" / "config.yaml")
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    data = tmp_path / "data"
    assert training_folders(checkpoint) == [str(data / "train")]
    assert training_folders(checkpoint, "unlabeled") == [
        str(data / "train"),
        str(data / "unlabeled"),
    ]
    with pytest.raises(ValueError, match="'labeled' or 'unlabeled'"):
        training_folders(checkpoint, "val")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny two-class run with labeled (train) and unlabeled images, and its checkpoint."""
    return train_tiny_run(
        tmp_path_factory.mktemp("propagation"), {"train": 4, "unlabeled": 8, "val": 4}
    )


def test_predict_writes_the_propagation_score_of_the_runs_training_images(trained, tmp_path):
    data, checkpoint = trained["data"], trained["checkpoint"]
    out = tmp_path / "predictions.csv"
    args = ("predict", str(checkpoint), str(data / "val"), "-o", str(out))
    result = open_sesemi(
        *args, "--unknown-score", "propagation", "--unknown-threshold", "0.5", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The run's labeled folder (train) and unlabeled ones (train + unlabeled, less the labeled).
    assert "over 8 labeled and 16 unlabeled training images" in result.stderr
    model = load_trained_model(str(checkpoint))
    labeled = list_images([str(data / "train")])
    scorer = fit_scorer(model, labeled, list_images([str(data / "train"), str(data / "unlabeled")]))
    files = list_images([str(data / "val")])
    features = torch.stack([p.features for p in predict(model, files, features=True)])
    expected = dict(zip(files, scorer.score(features).tolist(), strict=True))
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(files)
    for row in rows:
        assert float(row["unknown"]) == pytest.approx(expected[row["file"]], abs=1e-5)
        marked = row["prediction"] == "unknown"
        assert marked == (expected[row["file"]] > 0.5)


def test_predict_names_the_missing_training_images(trained, tmp_path):
    checkpoint, val = str(trained["checkpoint"]), str(trained["data"] / "val")
    out = str(tmp_path / "p.csv")
    gone = open_sesemi(
        "predict", checkpoint, val, "-o", out, "--unknown-score", "propagation",
        "--labeled", str(tmp_path / "nowhere"), cwd=tmp_path,
    )  # fmt: skip
    assert gone.returncode != 0
    assert "--labeled folder" in gone.stderr and "does not exist" in gone.stderr
    stray = open_sesemi("predict", checkpoint, val, "-o", out, "--labeled", val, cwd=tmp_path)
    assert stray.returncode != 0 and "for --unknown-score propagation" in stray.stderr
    # A copy of the checkpoint away from its run: no saved config names the folders.
    alone = tmp_path / "alone" / "checkpoints" / "last.ckpt"
    alone.parent.mkdir(parents=True)
    alone.write_bytes(trained["checkpoint"].read_bytes())
    lost = open_sesemi(
        "predict", str(alone), val, "-o", out, "--unknown-score", "propagation", cwd=tmp_path
    )
    assert lost.returncode != 0
    assert "needs the labeled training images" in lost.stderr and "--labeled DIR" in lost.stderr
    assert not Path(out).exists()


def test_a_training_image_scores_as_the_graphs_reference_without_itself():
    a, c = [1.0, 0.2, 0.2, 0.0], [0.2, 0.2, 1.0, 0.0]
    labeled, unlabeled = _cluster(a, 2, 0), torch.cat([_cluster(a, 12, 2), _cluster(c, 12, 4)])
    scorer = PropagationScorer.fit(labeled, unlabeled)
    # Scored as images to predict, the unlabeled training images get the reference's masses
    # (each without its own entry), so a threshold of 0.5 flags half of them.
    torch.testing.assert_close(scorer.masses(unlabeled).sort().values, scorer.reference)
    assert (scorer.score(unlabeled) > 0.5).sum() == 12


def test_a_large_unlabeled_folder_is_sampled_the_same_way_every_time(trained, monkeypatch):
    import sesemi.propagation

    data = trained["data"]
    model = load_trained_model(str(trained["checkpoint"]))
    labeled = list_images([str(data / "train")])
    pool = list_images([str(data / "unlabeled")])
    monkeypatch.setattr(sesemi.propagation, "MAX_POOL", 5)
    first, again = (fit_scorer(model, labeled, pool) for _ in range(2))
    assert first.labeled == 8 and len(first.reference) == 5
    torch.testing.assert_close(first.bank, again.bank)


def test_the_python_api_gives_each_prediction_its_unknown_score(trained):
    data = trained["data"]
    model = load_trained_model(str(trained["checkpoint"]))
    files = list_images([str(data / "val")])
    plain = model.predict(files)  # auto: 1 - max probability (no one-vs-all detectors)
    for p in plain:
        assert p.unknown == pytest.approx(1 - p.probability, abs=1e-6)
    scorer = model.propagation_scorer()  # the run's folders, as predict reads them
    assert scorer.labeled == 8 and len(scorer.reference) == 16
    features = torch.stack([p.features for p in predict(model, files, features=True)])
    expected = scorer.score(features).tolist()
    found = [p.unknown for p in model.predict(files, unknown="propagation", scorer=scorer)]
    assert found == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="unknown score 'energy'"):
        model.predict(files, unknown="energy")
