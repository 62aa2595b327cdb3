"""WebDataset shards: `open_sesemi shards` writes an image folder, `webdataset` datasets read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import make_image_folder, open_sesemi, write_images
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

import sesemi
from sesemi.datasets import dataset
from sesemi.datasets.image_folder import load_image
from sesemi.shards import PROGRESS_NAME, parse_size, write_shards
from sesemi.transforms import center_crop_transforms, train_transforms

MAX_SIZE = 10_000  # two 40x48 PNGs (~6 kB each) per shard: several shards per subset
TO_TENSOR = center_crop_transforms(input_h=8, input_w=8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """train: 2 classes x 5 images, val: 2 x 2, unlabeled: 3 loose images."""
    root = make_image_folder(tmp_path / "data", {"train": 5, "val": 2})
    write_images(root / "unlabeled", 3, seed=7)
    return root


@pytest.fixture
def shards(folder: Path, tmp_path: Path) -> Path:
    write_shards(str(folder), str(tmp_path / "shards"), max_size=MAX_SIZE)
    return tmp_path / "shards"


def read_tars(root: Path, subset: str) -> list[list[dict]]:
    """The raw samples of each shard of a subset, as index.json lists them."""
    index = json.loads((root / "index.json").read_text())
    return [
        list(wds.tarfile_samples([{"url": str(root / name)}]))
        for name in index["subsets"][subset]["shards"]
    ]


def ids_and_targets(batches) -> tuple[list[int], list[int]]:
    ids = [int(i) for batch in batches for i in batch[2]]
    return ids, [int(t) for batch in batches for t in batch[1]]


def set_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> None:
    # What WebDataset (wds.utils.pytorch_worker_info) reads when torch.distributed is not set up.
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GB", 10**9), ("500MB", 500 * 10**6), ("1.5kB", 1500), ("2GiB", 2 * 2**30), ("4096", 4096)],
)
def test_sizes_are_parsed(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "1 parsec", "-1GB", "0"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="500MB"):
        parse_size(text)


def test_shards_hold_each_images_bytes_label_and_id(folder: Path, shards: Path) -> None:
    index = json.loads((shards / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"]
    assert list(index["subsets"]) == ["train", "unlabeled", "val"]
    for subset, expected in (("train", 10), ("unlabeled", 3), ("val", 4)):
        files = dataset("image_folder", str(folder), subset=subset).samples
        part = index["subsets"][subset]
        assert part["count"] == len(files) == expected
        assert part["labeled"] == (subset != "unlabeled")
        assert part["shards"][0] == f"{subset}/{subset}-000000.tar"
        tars = read_tars(shards, subset)
        assert [len(t) for t in tars] == part["shard_counts"]
        seen = []
        for sample in (s for t in tars for s in t):
            id_ = int(sample["__key__"])
            path, target = files[id_]
            assert sample["png"] == Path(path).read_bytes()
            assert int(sample["cls"]) == target
            seen.append(id_)
        assert sorted(seen) == list(range(expected))
    assert len(index["subsets"]["train"]["shards"]) >= 4  # max_size splits the subsets
    written = [int(s["__key__"]) for s in read_tars(shards, "train")[0]]
    assert written != sorted(written) or written[0] != 0  # shuffled: shards mix classes
    assert not (shards / PROGRESS_NAME).exists()


def test_a_finished_output_is_refused_and_replaced_only_with_overwrite(folder, shards) -> None:
    first = (shards / "train" / "train-000000.tar").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="index.json.*--overwrite"):
        write_shards(str(folder), str(shards), max_size=10**9)
    assert (shards / "train" / "train-000000.tar").stat().st_mtime_ns == first
    with pytest.raises(ValueError, match="inside the image folder"):  # it would be a subset
        write_shards(str(folder), str(folder / "shards"))
    index = write_shards(str(folder), str(shards), max_size=10**9, overwrite=True)
    assert index["subsets"]["train"]["shards"] == ["train/train-000000.tar"]
    assert sorted(os.listdir(shards / "train")) == ["train-000000.tar"]  # old shards removed


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    real = wds.ShardWriter.write
    count = {"n": 0}

    def write(self, sample):
        count["n"] += 1
        if count["n"] > writes:
            raise KeyboardInterrupt
        real(self, sample)

    monkeypatch.setattr(wds.ShardWriter, "write", write)


def test_an_interrupted_write_continues_with_the_shard_it_stopped_at(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 5)  # a shard or two finished, the next one begun
        with pytest.raises(KeyboardInterrupt):
            write_shards(str(folder), str(out), max_size=MAX_SIZE)
    assert not (out / "index.json").exists()
    done = json.loads((out / PROGRESS_NAME).read_text())["shards"]["train"]
    assert 1 <= len(done) and sum(count for _, count in done) < 5
    kept = {name: (out / name).stat().st_mtime_ns for name, _ in done}
    lines = []
    write_shards(str(folder), str(out), max_size=MAX_SIZE, report=lines.append)
    assert lines[0] == "continuing an interrupted write"
    assert lines[1].startswith(f"train/train-{len(done):06d}.tar")
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    whole = tmp_path / "whole"
    write_shards(str(folder), str(whole), max_size=MAX_SIZE)
    assert json.loads((out / "index.json").read_text()) == json.loads(
        (whole / "index.json").read_text()
    )
    for tar in sorted(whole.glob("*/*.tar")):
        assert (out / tar.relative_to(whole)).read_bytes() == tar.read_bytes()


def test_an_interrupted_write_of_images_that_changed_starts_over(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            write_shards(str(folder), str(out), max_size=MAX_SIZE)
    write_images(folder / "train" / "bird", 2, seed=11)
    make_image_folder(folder, {"val": 1}, classes=("bird",))
    lines = []
    index = write_shards(str(folder), str(out), max_size=MAX_SIZE, report=lines.append)
    assert lines[0].endswith("starting over")
    assert index["classes"] == ["bird", "cat", "dog"] and index["subsets"]["train"]["count"] == 12
    assert sum(len(t) for t in read_tars(out, "train")) == 12


def test_the_shards_command_writes_and_refuses_to_overwrite_in_one_line(folder, tmp_path) -> None:
    args = ("shards", str(folder), "-o", str(tmp_path / "out"), "--max-size", "12kB")
    done = open_sesemi(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "10 train, 3 unlabeled, 4 val images" in done.stdout
    assert "dataset name: webdataset" in done.stdout
    again = open_sesemi(*args, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and "Traceback" not in again.stderr
    assert "index.json' already exists" in again.stderr and "--overwrite" in again.stderr


# ---------------------------------------------------------------- reading


def test_the_dataset_gives_every_sample_once_with_its_image_label_and_index(
    folder: Path, shards: Path
) -> None:
    ds = dataset("webdataset", str(shards), subset=["train", "unlabeled"])
    files = dataset("image_folder", str(folder), subset=["train", "unlabeled"])
    paths = [path for part in files.datasets for path, _ in part.samples]
    assert len(ds) == 13 and ds.classes == ["cat", "dog"]
    samples = list(ds.stream(indexed=True))
    assert sorted(index for _, _, index in samples) == list(range(13))
    for image, target, index in samples:  # indices continue over subsets, as image_folder's do
        assert target == files.targets[index]
        assert np.array_equal(np.asarray(image), np.asarray(load_image(paths[index])))
    assert [t for _, t in dataset("webdataset", str(shards), subset="unlabeled")] == [-1] * 3


def test_a_shuffled_loader_gives_every_sample_once_per_epoch_in_whole_batches(shards) -> None:
    stream = dataset("webdataset", str(shards), "train", TO_TENSOR, shuffle_buffer=4).stream(
        batch_size=3, shuffle=True, indexed=True, seed=0
    )
    loader = DataLoader(stream, batch_size=3, num_workers=2)
    assert len(loader) == 4
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        batches = list(loader)
        assert [len(b[2]) for b in batches] == [3, 3, 3, 1]  # the DataLoader's length is exact
        ids, targets = ids_and_targets(batches)
        assert sorted(ids) == list(range(10))
        assert all(t == (i >= 5) for i, t in zip(ids, targets, strict=True))  # cat 0-4, dog 5-9
        orders.append(ids)
    assert orders[0] != orders[1]  # reshuffled every epoch
    stream.set_epoch(0)
    assert ids_and_targets(list(loader))[0] == orders[0]  # the same seed and epoch: the same


@pytest.mark.parametrize(("subsets", "size"), [("train", 10), (["train", "unlabeled"], 13)])
def test_two_ranks_read_disjoint_shares_that_cover_every_sample(
    shards: Path, monkeypatch: pytest.MonkeyPatch, subsets, size: int
) -> None:
    ds = dataset("webdataset", str(shards), subsets, TO_TENSOR, shuffle_buffer=3)
    shares = []
    for rank in (0, 1):
        set_rank(monkeypatch, rank, 2)
        stream = ds.stream(batch_size=2, processes=2, shuffle=True, indexed=True, seed=5)
        stream.set_epoch(3)
        ids = ids_and_targets(DataLoader(stream, batch_size=2, num_workers=2))[0]
        assert len(ids) == len(stream) == -(-size // 2)  # each rank as many (DDP needs it)
        shares.append(ids)
    assert set(shares[0]) | set(shares[1]) == set(range(size))
    # Disjoint but for the padding of an odd count (one sample read twice, as DistributedSampler).
    assert len(shares[0]) + len(shares[1]) - len(set(shares[0]) | set(shares[1])) == size % 2
    set_rank(monkeypatch, 0, 3)
    with pytest.raises(RuntimeError, match="sized for 2 process"):
        next(iter(ds.stream(processes=2)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumes_mid_epoch_with_the_same_batches(shards: Path, workers: int) -> None:
    transform = train_transforms(16, 16, scale=(0.3, 1.0))  # random crops and flips

    def loader() -> StatefulDataLoader:
        ds = dataset("webdataset", str(shards), ["train", "unlabeled"], transform, shuffle_buffer=4)
        stream = ds.stream(batch_size=2, shuffle=True, indexed=True, seed=1)
        stream.set_epoch(2)
        return StatefulDataLoader(stream, batch_size=2, num_workers=workers)

    whole = loader()
    batches = iter(whole)
    for _ in range(3):
        next(batches)
    state = whole.state_dict()
    rest = list(batches)
    resumed = loader()
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(again) == len(rest) == 4
    for a, b in zip(again, rest, strict=True):
        assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0])  # same samples, same crops


def test_shards_elsewhere_are_read_through_a_url_template(shards: Path) -> None:
    local = [i for _, _, i in dataset("webdataset", str(shards), "val").stream(indexed=True)]
    piped = dataset("webdataset", str(shards), "val", urls=f"pipe:cat {shards}/{{shard}}")
    assert [i for _, _, i in piped.stream(indexed=True)] == local
    braces = f"pipe:cat {shards}/val/val-{{000000..000001}}.tar"
    assert len(list(dataset("webdataset", str(shards), "val", urls=braces))) == 4
    with pytest.raises(ValueError, match="index.json lists 2"):
        dataset("webdataset", str(shards), "val", urls=f"{shards}/val/val-000000.tar")


def test_missing_shards_and_subsets_are_named(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="open_sesemi shards"):
        dataset("webdataset", str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match="subsets: train, unlabeled, val"):
        dataset("webdataset", str(shards), "test")
    assert len(dataset("webdataset", str(shards), ["val", "test?"])) == 4
    (shards / "val" / "val-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="val-000001.tar"):
        dataset("webdataset", str(shards), "val")


# ---------------------------------------------------------------- training


def fit_from_shards(shards: Path, runs: Path, *overrides: str):
    """Trains `base` on the shards (labeled and val loaders), the test model, on the CPU."""
    loaders = ("train.supervised", "val")
    common = [
        f"run.data_root={shards}",
        f"run.dir={runs}",
        "run.gpus=0",
        "run.seed=0",
        "run.batch_size_per_gpu=4",
        "data.image_size=32",
        *[f"data.{loader}.dataset.name=webdataset" for loader in loaders],
        "learner.hparams.model.backbone.name=test_resnet",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
    ]
    return sesemi.fit(sesemi.compose("base", [*common, *overrides]))


def test_flexmatch_trains_from_shards_with_their_indices(
    shards, tmp_path, one_thread, caplog
) -> None:
    # FlexMatch asks for full labeled batches, which a stream cannot give: it says so and trains.
    result = fit_from_shards(
        shards,
        tmp_path / "runs",
        "method=flexmatch",
        "run.num_epochs=1",
        "data.train.unlabeled.dataset.name=webdataset",
        "data.train.unlabeled.batch_size=5",
        "learner.hparams.lr_scheduler.scheduler.warmup_epochs=0",
        "learner.hparams.model.regularization_loss_heads.fixmatch.head.threshold.threshold=0",
    )
    assert 0.0 <= result.metrics["val/top1"] <= 1.0
    assert "data.train.supervised: full_batches has no effect on a stream" in caplog.text
    checkpoint = torch.load(result.last_checkpoint, weights_only=True)
    assert checkpoint["global_step"] == 2  # 10 labeled images // 4, 13 unlabeled // 5
    (selected,) = [v for k, v in checkpoint["state_dict"].items() if k.endswith("selected_label")]
    assert selected.shape == (13,)  # the unlabeled shards' size (train + unlabeled)
    assert int((selected >= 0).sum()) == 10  # 2 batches of 5 distinct indices, all confident


def test_a_run_resumed_between_epochs_ends_with_the_same_weights(shards, tmp_path, one_thread):
    # Shuffled shards, buffer, random crops and dropout: all drawn from the seed and the epoch.
    plain = (  # rotation prediction (the default) on the shards too; a constant learning rate
        "data.train.rotation_prediction.dataset.name=webdataset",
        "learner.hparams.lr_scheduler=null",
    )
    whole = fit_from_shards(shards, tmp_path / "whole", *plain, "run.num_epochs=2")
    first = fit_from_shards(shards, tmp_path / "parts", *plain, "run.num_epochs=1")
    resume = f"run.resume_from_checkpoint={first.last_checkpoint}"
    second = fit_from_shards(shards, tmp_path / "rest", *plain, "run.num_epochs=2", resume)
    a, b, c = (torch.load(r.last_checkpoint, weights_only=True) for r in (whole, first, second))
    assert c["global_step"] == a["global_step"] == 6  # 13 rotation images // 4, per epoch
    assert a["state_dict"].keys() == c["state_dict"].keys()
    assert all(torch.equal(v, c["state_dict"][k]) for k, v in a["state_dict"].items())
    assert not all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


DDP_PROBE = '''
import json
import pytorch_lightning as pl


class Probe(pl.Callback):
    """Records the supervised batches' sample indices of each epoch on each rank."""

    def __init__(self, out):
        self.out, self.epochs = out, []

    def on_train_epoch_start(self, trainer, module):
        self.epochs.append([])

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.epochs[-1] += batch["supervised"][2].tolist()

    def on_train_end(self, trainer, module):
        with open(f"{self.out}/probe_rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.epochs, f)
'''


def test_two_ddp_processes_train_on_disjoint_shares_of_the_shards(shards, tmp_path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "__init__.py").write_text("")
    (tmp_path / "src" / "probe.py").write_text(DDP_PROBE)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ddp.yaml").write_text(
        "defaults:\n  - base\n  - override method: supervised\n  - _self_\n"
        f"run:\n  seed: 0\n  gpus: 0\n  accelerator: ddp\n  num_epochs: 2\n  id: ddp\n"
        f"  data_root: {shards}\n  dir: {tmp_path / 'runs'}\n  batch_size_per_gpu: 5\n"
        "data:\n  image_size: 32\n  train:\n    supervised:\n      dataset:\n"
        "        name: webdataset\n  val:\n    dataset:\n      name: webdataset\n"
        "learner:\n  hparams:\n    model:\n      backbone:\n        name: test_resnet\n"
        "    lr_scheduler:\n      scheduler:\n        warmup_epochs: 0\n"
        "trainer:\n  devices: 2\n  enable_progress_bar: false\n  callbacks:\n"
        "    - _target_: pytorch_lightning.callbacks.ModelCheckpoint\n"
        f"    - _target_: src.probe.Probe\n      out: {tmp_path}\n"
    )
    out = open_sesemi("-cd", "configs", "-cn", "ddp", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):  # 10 labeled images: 5 on each process, one batch each
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first) == len(second) == 5
        assert sorted(first + second) == list(range(10))
    (last,) = (tmp_path / "runs" / "ddp").glob("*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=False)["global_step"] == 2


def test_the_demo_learns_as_well_from_shards_as_from_the_folder(digits_root, tmp_path, one_thread):
    # Supervised on the demo's 50 labeled digits, the test model, 150 steps. The shards give
    # another sample order (a shard shuffle + buffer), so it is not the same run: seeds 0-2 from
    # the folder reach 85-90 %; the shards must land within that spread.
    write_shards(str(digits_root), str(tmp_path / "shards"), max_size=MAX_SIZE)
    common = [
        "method=supervised",
        "data.prepare=null",
        "run.seed=0",
        "run.num_iterations=150",
        "run.batch_size_per_gpu=25",  # 2 batches per epoch
        "trainer.val_check_interval=150",
        "learner.hparams.model.backbone.name=test_resnet",
        "learner.hparams.model.backbone.drop_rate=0.0",  # steadier at this size
        "learner.hparams.optimizer.lr=0.02",
        "learner.hparams.lr_scheduler.scheduler.warmup_iters=5",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
    ]
    shards = [f"data.{loader}.dataset.name=webdataset" for loader in ("train.supervised", "val")]
    top1 = {}
    for source, root, extra in (
        ("folder", digits_root, []),
        ("shards", tmp_path / "shards", shards),
    ):
        overrides = [*common, *extra, f"run.data_root={root}", f"run.dir={tmp_path / source}"]
        top1[source] = sesemi.fit(sesemi.compose("demo", overrides)).metrics["val/top1"]
    assert top1["folder"] > 0.75 and top1["shards"] > 0.75, top1  # chance is 0.1
    assert abs(top1["folder"] - top1["shards"]) <= 0.08, top1
