"""The config schema, the built-in configs and groups, and the ${sesemi:...} resolvers."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

import sesemi
from sesemi.cli import builtin_configs
from sesemi.config.resolvers import SESEMIConfigAttributes, resolve, use_attributes
from sesemi.config.structs import RunMode
from sesemi.errors import USER_ERRORS, one_line

BUILT_IN = ["sesemi_config", "base", "imagewoof", "demo"]
METHODS = builtin_configs("method")
ATTRIBUTES = SESEMIConfigAttributes(
    iterations_per_epoch=7, max_iterations=70, num_gpus=0, num_nodes=1, num_classes=4
)


def test_the_built_in_groups_are_the_documented_ones():
    assert builtin_configs() == sorted(BUILT_IN)
    assert builtin_configs("data") == ["digits", "folder", "imagewoof"]
    assert set(METHODS) >= {
        "supervised",
        "rotation",
        "entropy_minimization",
        "pi_model",
        "mean_teacher",
        "fixmatch",
        "flexmatch",
        "jigsaw",
        "rotation_entropy",
        "noisy_student_teacher",
        "noisy_student",
    }


def test_the_bare_config_has_the_spec_defaults_and_required_fields_missing():
    # The composed `sesemi_config` (what `open_sesemi -h` prints), not the dataclass alone.
    cfg = sesemi.compose("sesemi_config")
    run = cfg.run
    assert (run.gpus, run.num_nodes, run.data_root, run.id, run.dir, run.mode) == (
        -1,
        1,
        "./data",
        "default",
        "./runs",
        RunMode.FIT,
    )
    assert run.seed is None and run.accelerator is None and run.resume_from_checkpoint is None
    assert cfg.learner._target_ == "sesemi.Classifier"
    assert cfg.learner.hparams.model.supervised_loss.reduction == "mean"
    assert cfg.trainer is None and cfg.data.train is None and cfg.data.val is None
    with pytest.raises(MissingMandatoryValue):
        _ = cfg.learner.hparams.num_classes


def test_plain_hydra_compose_of_a_built_in_config_needs_no_set_up():
    # Importing `sesemi.conf` (which Hydra does) registers the schema the configs build on.
    with initialize_config_module(config_module="sesemi.conf", version_base=None):
        cfg = compose(config_name="base")
    assert cfg.learner.hparams.model.backbone.name == "resnet50d"


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_config_composes(name):
    assert sesemi.compose(name).learner._target_ == "sesemi.Classifier"


def test_base_is_the_spec_example():
    cfg = sesemi.compose("base")
    assert set(cfg.data.train) == {"supervised", "rotation_prediction"}
    rotation = cfg.data.train.rotation_prediction
    assert rotation.collate_fn._target_ == "sesemi.collation.RotationTransformer"
    assert (cfg.run.accelerator, cfg.run.num_epochs, cfg.run.batch_size_per_gpu) == ("dp", 50, 16)
    resolved = resolve(cfg, ATTRIBUTES)
    hp = resolved["learner"]["hparams"]
    assert hp["model"]["backbone"]["name"] == "resnet50d"
    assert hp["model"]["backbone"]["drop_rate"] == 0.5
    assert hp["optimizer"]["nesterov"] is True and hp["optimizer"]["lr"] == 0.1
    sched = hp["lr_scheduler"]["scheduler"]
    assert (sched["iters_per_epoch"], sched["max_iters"]) == (7, 70)  # through ${sesemi:...}
    assert hp["num_classes"] == 4  # ${data.num_classes} -> ${sesemi:num_classes}
    heads = hp["model"]["regularization_loss_heads"]
    assert heads["rotation_prediction"]["head"]["input_data"] == "rotation_prediction"
    train = resolved["data"]["train"]["supervised"]["dataset"]["image_transform"]
    assert train["_target_"] == "sesemi.transforms.train_transforms" and train["input_h"] == 224
    assert resolved["trainer"]["callbacks"][0]["monitor"] == "val/top1"


def test_imagewoof_extends_base_with_the_spec_run_options():
    cfg = sesemi.compose("imagewoof")
    assert (cfg.run.seed, cfg.run.num_epochs, cfg.run.id, cfg.run.gpus) == (42, 80, "imagewoof", -1)
    assert cfg.run.data_root == "./data/imagewoof2"
    assert cfg.data.num_classes == 10
    assert "rotation_prediction" in cfg.learner.hparams.model.regularization_loss_heads
    assert cfg.learner.hparams.model.backbone.name == "resnet50d"


def test_imagewoof_without_its_folder_says_how_to_download_it(tmp_path):
    cfg = sesemi.compose("imagewoof", [f"run.data_root={tmp_path / 'imagewoof2'}"])
    with pytest.raises(USER_ERRORS) as error:
        sesemi.fit(cfg)
    message = one_line(error.value)  # what the command line prints
    assert f"'{tmp_path / 'imagewoof2'}' does not exist" in message
    assert "curl https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2.tgz" in message


@pytest.mark.parametrize("data", ["digits", "folder", "imagewoof"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_and_resolves_on_every_data(data, method):
    overrides = [f"data={data}", f"method={method}"]
    if method == "noisy_student":
        overrides.append("data.train.pseudo.dataset.root=/pseudo")
    cfg = sesemi.compose("base", overrides)
    resolved = resolve(cfg, ATTRIBUTES)  # every interpolation resolves
    size = resolved["data"]["image_size"]
    for name, loader in resolved["data"]["train"].items():
        transform = loader["dataset"]["image_transform"]
        views = transform.get("views") or [transform]
        assert all(v["input_h"] == size for v in views), (name, views)
    heads = resolved["learner"]["hparams"]["model"]["regularization_loss_heads"] or {}
    for name, node in heads.items():
        if node is not None:  # each head reads a configured loader
            assert node["head"]["input_data"] in resolved["data"]["train"], name


def test_a_method_reads_the_data_facts_it_needs():
    cfg = resolve(sesemi.compose("demo", ["method=fixmatch"]), ATTRIBUTES)
    unlabeled = cfg["data"]["train"]["unlabeled"]
    assert unlabeled["dataset"]["subset"] == ["train", "unlabeled"]
    weak, strong = unlabeled["dataset"]["image_transform"]["views"]
    assert weak == cfg["data"]["transforms"]["train"] and weak["p_hflip"] == 0.0
    assert strong["_target_"] == "sesemi.transforms.strong_transforms"
    assert strong["input_h"] == 32 and strong["norm_mean"] == [0.5, 0.5, 0.5]
    assert unlabeled["batch_size"] == 7 * cfg["run"]["batch_size_per_gpu"]  # mu = 7
    folder = resolve(sesemi.compose("base", ["method=fixmatch"]), ATTRIBUTES)
    assert folder["data"]["train"]["unlabeled"]["dataset"]["subset"] == ["train", "unlabeled?"]


def test_flexmatch_is_fixmatch_with_another_threshold_policy_and_no_dataset_facts_copied():
    cfg = resolve(sesemi.compose("demo", ["method=flexmatch"]), ATTRIBUTES)
    fixmatch = resolve(sesemi.compose("demo", ["method=fixmatch"]), ATTRIBUTES)
    head = cfg["learner"]["hparams"]["model"]["regularization_loss_heads"]["fixmatch"]["head"]
    plain = fixmatch["learner"]["hparams"]["model"]["regularization_loss_heads"]["fixmatch"]
    assert (
        head["_target_"]
        == plain["head"]["_target_"]
        == ("sesemi.models.heads.fixmatch.FixMatchLossHead")
    )
    policy = head.pop("threshold")
    assert policy["_target_"] == "sesemi.models.heads.thresholds.FlexMatchThreshold"
    assert policy["threshold"] == plain["head"].pop("threshold") == 0.95
    assert head == plain["head"]  # everything else is FixMatch's
    assert "num_classes" not in policy and "unlabeled_size" not in policy  # from the run


def test_a_user_config_overrides_the_method_of_base(tmp_path):
    (tmp_path / "custom.yaml").write_text(
        "defaults:\n  - base\n  - override method: mean_teacher\nrun:\n  seed: 42\n"
    )
    cfg = sesemi.compose("custom", config_dir=tmp_path)
    heads = cfg.learner.hparams.model.regularization_loss_heads
    assert [k for k, v in heads.items() if v is not None] == ["mean_teacher"]
    assert cfg.learner.hparams.model.ema.decay == 0.99 and cfg.run.seed == 42
    assert "rotation_prediction" not in cfg.data.train


def test_overrides_are_type_checked():
    assert sesemi.compose("base", ["run.num_epochs=3"]).run.num_epochs == 3
    assert sesemi.compose("base", ["run.mode=TEST"]).run.mode == RunMode.TEST
    with pytest.raises(ConfigCompositionException, match="num_epochs"):
        sesemi.compose("base", ["run.num_epochs=abc"])
    with pytest.raises(ConfigCompositionException):
        sesemi.compose("base", ["run.num_epoch=3"])  # misspelled key
    with pytest.raises(ConfigCompositionException):
        sesemi.compose("base", ["run.mode=TRAIN"])  # not a RunMode
    with pytest.raises(ConfigCompositionException):
        sesemi.compose("base", ["data.image_size=big"])  # a data fact is typed too


def test_the_resolver_outside_a_run_is_a_clear_error():
    cfg = sesemi.compose("base")
    with pytest.raises(Exception, match="not known yet"):
        _ = cfg.learner.hparams.lr_scheduler.scheduler.max_iters
    with use_attributes(ATTRIBUTES):  # the runner resolves inside such a scope
        assert cfg.learner.hparams.lr_scheduler.scheduler.max_iters == 70
    with pytest.raises(Exception, match="not known yet"):  # and nothing leaks out of it
        _ = cfg.learner.hparams.lr_scheduler.scheduler.max_iters


def test_resolver_unknown_attribute():
    cfg = OmegaConf.create({"x": "${sesemi:nope}"})
    with pytest.raises(Exception, match="unknown attribute"):
        _ = cfg.x


def test_the_product_resolver_multiplies_and_names_a_missing_factor():
    cfg = OmegaConf.create({"b": 16, "mu": "${sesemi.mul:${b},7}", "none": "${sesemi.mul:${c},2}"})
    cfg.c = None
    assert cfg.mu == 112
    with pytest.raises(Exception, match="batch_size_per_gpu"):
        _ = cfg.none


def test_null_loader_entry_is_switched_off(image_root):
    from sesemi.data import SESEMIDataModule

    cfg = sesemi.compose(
        "base", ["data.train.rotation_prediction=null", f"run.data_root={image_root}"]
    )
    data = SESEMIDataModule(cfg.data, cfg.run.data_root, cfg.run.batch_size_per_gpu)
    assert list(data.train) == ["supervised"]
