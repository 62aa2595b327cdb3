"""Active learning: each strategy's ranking on chosen tensors, and `open_sesemi suggest`."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import open_sesemi, train_tiny_run

from sesemi.inference import list_images, load_trained_model, parse_tta, predict
from sesemi.suggest import (
    STRATEGIES,
    entropies,
    k_center,
    margin_k_center,
    nearest_distances,
    rank,
    rank_entropy,
    rank_margin,
    rank_random,
    typicality,
    typiclust,
)

# Rows chosen so that margin and entropy disagree: row 1 is the closest call between two classes
# (0.50 vs 0.49), row 3 the flattest over all three.
PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],  # margin 0.85
        [0.50, 0.49, 0.01],  # margin 0.01
        [0.70, 0.20, 0.10],  # margin 0.50
        [0.40, 0.30, 0.30],  # margin 0.10, the highest entropy
    ]
)


def test_margin_puts_the_closest_call_first():
    ranking = rank_margin(PROBS)
    assert ranking.order.tolist() == [1, 3, 2, 0]
    torch.testing.assert_close(ranking.scores, torch.tensor([0.01, 0.10, 0.50, 0.85]))


def test_entropy_puts_the_flattest_prediction_first():
    ranking = rank_entropy(PROBS)
    # Margin's closest call (1) spreads almost nothing over the third class: it comes third.
    assert ranking.order.tolist() == [3, 2, 1, 0]
    flattest = -(0.4 * math.log(0.4) + 2 * 0.3 * math.log(0.3))
    assert ranking.scores[0].item() == pytest.approx(flattest)
    assert entropies(torch.tensor([[1.0, 0.0, 0.0]])).item() == 0.0  # 0 log 0 is 0, not NaN


def test_random_is_a_seeded_permutation():
    first, again = rank_random(50, seed=3), rank_random(50, seed=3)
    assert first.order.tolist() == again.order.tolist()
    assert sorted(first.order.tolist()) == list(range(50))
    assert first.order.tolist() != rank_random(50, seed=4).order.tolist()
    assert first.order.tolist() != list(range(50))
    assert (first.scores[1:] >= first.scores[:-1]).all()  # the draws, lowest first
    some = rank("random", torch.full((50, 2), 0.5), None, None, n=5, seed=3)
    assert some.order.tolist() == first.order[:5].tolist()


# One labeled point at the origin; the pool's distances to it are 1, 6, 6.08, 5 and 3.
LABELED = torch.tensor([[0.0, 0.0]])
POOL = torch.tensor([[1.0, 0.0], [6.0, 0.0], [6.0, 1.0], [-5.0, 0.0], [0.0, 3.0]])


def test_k_center_picks_far_from_the_labeled_images_then_from_its_own_picks():
    ranking = k_center(POOL, LABELED, n=3)
    # Farthest from the labeled point first (2); then not 1, the next farthest from the labeled
    # point, which sits 1 away from the first pick, but 3, far from both; then 4.
    assert ranking.order.tolist() == [2, 3, 4]
    expected = torch.tensor([math.sqrt(37), 5.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(ranking.scores, expected)
    # A labeled image next to the farthest point makes the other side come first.
    near = k_center(POOL, torch.cat([LABELED, torch.tensor([[6.0, 0.5]])]), n=1)
    assert near.order.tolist() == [3]


def test_k_center_without_labeled_images_starts_from_the_given_first_pick():
    ranking = k_center(POOL, POOL[:0], n=2, first=0)
    assert ranking.order.tolist() == [0, 3]  # (-5, 0) is the farthest from (1, 0)
    assert math.isinf(ranking.scores[0]) and ranking.scores[1] == pytest.approx(6.0)
    assert len(k_center(POOL, LABELED, n=10).order) == len(POOL)  # n is capped at the pool


def test_nearest_distances_are_the_smallest_pairwise_distances():
    features, reference = torch.randn(30, 8), torch.randn(7, 8)
    expected = torch.cdist(features.double(), reference.double()).min(dim=1).values
    torch.testing.assert_close(nearest_distances(features, reference), expected)
    assert torch.isinf(nearest_distances(features, reference[:0])).all()


def test_margin_k_center_stays_within_the_uncertain_pool_and_drops_near_duplicates():
    # 0 and 1 are the two closest calls and near-duplicates of each other; 4 and 5 are
    # confident images far from everything.
    margins = [0.01, 0.02, 0.05, 0.10, 0.90, 0.95]
    probs = torch.tensor([[(1 + m) / 2, (1 - m) / 2] for m in margins])
    features = torch.tensor(
        [[2.0, 0.0], [2.0, 0.1], [0.0, 1.5], [-1.0, 0.0], [10.0, 10.0], [-10.0, -10.0]]
    )
    ranking = margin_k_center(probs, features, LABELED, n=2, pool_factor=2)
    assert set(ranking.order.tolist()) <= {0, 1, 2, 3}  # the 2 x 2 smallest margins
    assert ranking.order.tolist() == [1, 2]  # one of the duplicates, then the farthest left
    assert rank_margin(probs).order[:2].tolist() == [0, 1]  # margin alone takes both
    assert k_center(features, LABELED, n=1).order.item() in (4, 5)  # k-center alone leaves it


def test_rank_uses_unit_length_features_and_starts_from_the_smallest_margin():
    # 0 and 1 point the same way as the labeled image, so after L2 normalization they are at
    # distance 0 from it however long they are; 2 points elsewhere and comes first.
    features = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0]])
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.55, 0.45]])
    ranking = rank("kcenter", probs, features, torch.tensor([[1.0, 0.0]]), n=1)
    assert ranking.order.tolist() == [2] and ranking.scores[0] == pytest.approx(math.sqrt(2))
    alone = rank("kcenter", probs, features, None, n=2)
    assert alone.order.tolist()[0] == 2  # the smallest margin, 0.10
    with pytest.raises(ValueError, match="unknown strategy"):
        rank("least-confidence", probs, features, None, n=1)


def test_typicality_is_one_over_the_mean_distance_to_the_nearest_neighbours():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    # Nearest other point: 1, 1 and 2 away; the two nearest: 1 and 3, 1 and 2, 2 and 3.
    torch.testing.assert_close(typicality(points, 1), torch.tensor([1.0, 1.0, 0.5]).double())
    expected = torch.tensor([1 / 2, 1 / 1.5, 1 / 2.5]).double()
    torch.testing.assert_close(typicality(points, 2), expected)
    torch.testing.assert_close(typicality(points, 20), expected)  # capped at the others
    assert typicality(points[:1]).tolist() == [0.0]  # a lone point has no neighbours


def test_distances_are_the_same_when_taken_in_chunks(monkeypatch):
    import sesemi.suggest

    features, reference = torch.randn(40, 8), torch.randn(30, 8)
    whole = typicality(features, 5), nearest_distances(features, reference)
    monkeypatch.setattr(sesemi.suggest, "DISTANCES_AT_ONCE", 100)  # 2 or 3 rows a chunk
    chunked = typicality(features, 5), nearest_distances(features, reference)
    torch.testing.assert_close(chunked, whole)


def _blob(x: float, y: float, extra: int = 0) -> torch.Tensor:
    """A centre and 8 points 0.3 around it (the centre is the most typical), plus `extra`
    points 0.6 out to the right."""
    angles = torch.arange(8) * math.pi / 4
    ring = 0.3 * torch.stack([angles.cos(), angles.sin()], dim=1)
    out = 0.6 * torch.ones(extra, 1) * torch.tensor([[1.0, 0.0]])
    return torch.cat([torch.zeros(1, 2), ring, out]) + torch.tensor([x, y])


def test_typiclust_takes_the_typical_image_of_each_uncovered_cluster_largest_first():
    covered = _blob(0, 0, extra=3)[1:]  # the labeled image is this blob's centre
    covered = torch.cat([covered, torch.tensor([[0.0, 0.05]])])  # its most typical pool image
    big, small = _blob(10, 0, extra=1), _blob(0, 10)
    pool = torch.cat([covered, big, small])
    first_big, first_small = len(covered), len(covered) + len(big)
    ranking = typiclust(pool, torch.zeros(1, 2), n=2)
    # Three clusters (1 labeled + 2): the uncovered blobs, the bigger (10 > 9) first, by its centre.
    assert ranking.order.tolist() == [first_big, first_small]
    torch.testing.assert_close(ranking.scores[1], typicality(small)[0])
    # An outlier and 3 picks: 4 clusters, the outlier alone in one. It is left while bigger
    # clusters have images; the three big ones are covered once each now, so the third pick goes
    # to the largest, the labeled blob (13 images), by its most typical pool image.
    pool = torch.cat([pool, torch.tensor([[50.0, 50.0]])])
    ranking = typiclust(pool, torch.zeros(1, 2), n=3)
    assert ranking.order.tolist() == [first_big, first_small, len(covered) - 1]
    without_guard = typiclust(pool, torch.zeros(1, 2), n=3, min_cluster=1)
    assert without_guard.order.tolist()[2] == len(pool) - 1  # the outlier is a cluster of its own
    # One cluster (the cap): the pool's most typical images, most typical first.
    one = typiclust(pool, torch.zeros(1, 2), n=3, max_clusters=1)
    typical = typicality(torch.cat([pool, torch.zeros(1, 2)]))[: len(pool)]
    assert one.order.tolist() == typical.argsort(descending=True)[:3].tolist()
    # Margin or k-center would go for the outlier first: it is the farthest from everything.
    assert k_center(pool, torch.zeros(1, 2), n=1).order.item() == len(pool) - 1
    # Without labeled images every cluster is uncovered: n picks from n clusters.
    alone = typiclust(pool, pool[:0], n=3, min_cluster=1)
    assert len(set(alone.order.tolist())) == 3


def test_the_training_folder_is_read_from_the_runs_saved_config(tmp_path):
    from sesemi.suggest import training_folders

    run = tmp_path / "runs" / "demo" / "ts"
    (run / ".hydra").mkdir(parents=True)
    (tmp_path / "data" / "digits" / "train").mkdir(parents=True)
    supervised = "{dataset: {name: image_folder, root: null, subset: train}}"
    config = f"run: {{data_root: ./data/digits}}\ndata: {{train: {{supervised: {supervised}}}}}\n"
    (run / ".hydra" / "config.yaml").write_text(config)
    # A relative data_root is relative to the folder the run was launched from.
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra: {{runtime: {{cwd: {tmp_path}}}}}\n")
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    assert training_folders(checkpoint) == [str(tmp_path / "data" / "digits" / "train")]
    (tmp_path / "data" / "digits" / "train").rmdir()  # moved away: unknown, not a wrong folder
    assert training_folders(checkpoint) is None
    assert training_folders(str(tmp_path / "elsewhere" / "last.ckpt")) is None


def test_the_command_offers_every_strategy():
    from sesemi.commands import SUGGEST_STRATEGIES

    assert tuple(SUGGEST_STRATEGIES) == STRATEGIES


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny two-class run trained on data/train and its last checkpoint."""
    return train_tiny_run(tmp_path_factory.mktemp("suggest"))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _outputs(checkpoint: Path, files: list[str], tta: str = "none"):
    model = load_trained_model(str(checkpoint))
    found = list(predict(model, files, tta=parse_tta(tta), features=True))
    return torch.stack([p.probabilities for p in found]), torch.stack([p.features for p in found])


def test_predict_returns_the_backbone_features_and_the_same_probabilities(trained):
    from sesemi.datasets.image_folder import load_image

    model = load_trained_model(str(trained["checkpoint"]))
    files = list_images([str(trained["data"] / "val")])
    plain = torch.stack([p.probabilities for p in predict(model, files, batch_size=3)])
    probs, features = _outputs(trained["checkpoint"], files)
    images = torch.stack([model.transform()(load_image(f)) for f in files])
    with torch.no_grad():
        torch.testing.assert_close(features, model.net.backbone(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, plain)
    assert all(p.features is None for p in predict(model, files))


def test_suggest_writes_the_ranked_csv_and_copies_the_images(trained, tmp_path):
    val = trained["data"] / "val"
    out, copies = tmp_path / "to_label.csv", tmp_path / "to_label"
    args = ("suggest", str(trained["checkpoint"]), str(val), "-n", "3", "--strategy", "margin")
    result = open_sesemi(*args, "-o", str(out), "--copy-to", str(copies), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    assert list(rows[0]) == ["rank", "file", "score", "guess", "probability"]
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    # The three smallest margins of the model's own predictions, smallest first.
    files = list_images([str(val)])
    probs, _ = _outputs(trained["checkpoint"], files)
    top = probs.topk(2).values
    margins = (top[:, 0] - top[:, 1]).tolist()
    expected = sorted(range(len(files)), key=lambda i: margins[i])[:3]
    assert [r["file"] for r in rows] == [files[i] for i in expected]
    for row, i in zip(rows, expected, strict=True):
        assert float(row["score"]) == pytest.approx(margins[i], abs=1e-5)
        assert row["guess"] == ["cat", "dog"][int(probs[i].argmax())]
        assert float(row["probability"]) == pytest.approx(float(probs[i].max()), abs=1e-5)
    copied = sorted(copies.iterdir())
    names = [f"{k:04d}_{Path(r['file']).name}" for k, r in enumerate(rows, start=1)]
    assert [c.name for c in copied] == names
    for c, row in zip(copied, rows, strict=True):
        assert Path(row["file"]).is_file()  # copied, not moved
        assert c.read_bytes() == Path(row["file"]).read_bytes()

    # Neither the CSV nor a non-empty copy folder is replaced without --overwrite.
    before = out.read_text()
    again = open_sesemi(*args, "-o", str(out), cwd=tmp_path)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr and out.read_text() == before
    other = tmp_path / "other.csv"
    again = open_sesemi(*args, "-o", str(other), "--copy-to", str(copies), cwd=tmp_path)
    assert again.returncode == 1 and "--copy-to" in again.stderr and "--overwrite" in again.stderr
    assert not other.exists()
    replaced = open_sesemi(*args, "-o", str(out), "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]


def test_suggest_skips_unreadable_images_and_caps_n(trained, tmp_path):
    pool = tmp_path / "unlabeled"
    pool.mkdir()
    for f in sorted((trained["data"] / "val" / "cat").glob("*.png"))[:3]:
        (pool / f.name).write_bytes(f.read_bytes())
    (pool / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "to_label.csv"
    args = ("suggest", str(trained["checkpoint"]), str(pool), "-n", "10", "-o", str(out))
    result = open_sesemi(*args, "--strategy", "entropy", "--tta", "flip", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broken.png" in result.stderr and "1 unreadable file(s) skipped" in result.stdout
    assert "-n 10 is more than the 3 readable image(s)" in result.stderr
    rows = _rows(out)
    assert len(rows) == 3 and not any("broken" in r["file"] for r in rows)
    # Entropy of the flip-averaged probabilities, highest first.
    files = [r["file"] for r in rows]
    probs, _ = _outputs(trained["checkpoint"], files, tta="flip")
    scores = [float(r["score"]) for r in rows]
    assert scores == pytest.approx(entropies(probs).tolist(), abs=1e-5)
    assert scores == sorted(scores, reverse=True)


def test_kcenter_starts_from_the_checkpoints_training_images(trained, tmp_path):
    out = tmp_path / "to_label.csv"
    args = ("suggest", str(trained["checkpoint"]), str(trained["data"]), "-o", str(out))
    result = open_sesemi(*args, "-n", "2", "--strategy", "kcenter", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left out 16 input image(s) that are labeled already" in result.stderr
    rows = _rows(out)
    assert all("/val/" in r["file"] for r in rows)  # data/train is the labeled set
    # The first pick is the val image farthest from every train image (unit-length features).
    val = list_images([str(trained["data"] / "val")])
    _, features = _outputs(trained["checkpoint"], val)
    _, labeled = _outputs(trained["checkpoint"], list_images([str(trained["data"] / "train")]))
    unit = torch.nn.functional.normalize
    distances = nearest_distances(unit(features, dim=1), unit(labeled, dim=1))
    assert rows[0]["file"] == val[int(distances.argmax())]
    assert float(rows[0]["score"]) == pytest.approx(float(distances.max()), abs=1e-4)
    # An explicit --labeled folder replaces it; one that is not there is one line.
    missing = open_sesemi(*args, "--overwrite", "--labeled", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 1 and "--labeled folder" in missing.stderr
    ema = open_sesemi(*args, "--overwrite", "--ema", cwd=tmp_path)
    assert ema.returncode == 1 and "no EMA weights" in ema.stderr


def test_typiclust_is_the_default_and_counts_the_checkpoints_training_images(trained, tmp_path):
    out = tmp_path / "to_label.csv"
    args = ("suggest", str(trained["checkpoint"]), str(trained["data"] / "val"), "-o", str(out))
    result = open_sesemi(*args, "-n", "3", "--seed", "1", cwd=tmp_path)  # the default strategy
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    val = list_images([str(trained["data"] / "val")])
    _, features = _outputs(trained["checkpoint"], val)
    _, labeled = _outputs(trained["checkpoint"], list_images([str(trained["data"] / "train")]))
    unit = torch.nn.functional.normalize
    expected = typiclust(unit(features, dim=1), unit(labeled, dim=1), 3, seed=1)
    assert [r["file"] for r in rows] == [val[i] for i in expected.order.tolist()]
    scores = [float(r["score"]) for r in rows]
    assert scores == pytest.approx(expected.scores.tolist(), rel=1e-3)
