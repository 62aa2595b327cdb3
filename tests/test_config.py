"""The config schema, its validation, the built-in configs and the ${sesemi:...} resolver."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

import sesemi.config  # noqa: F401  (registers the schema)
from sesemi.config.resolvers import SESEMIConfigAttributes, get_attributes, set_attributes
from sesemi.config.structs import RunMode, SESEMIConfig

BUILT_IN = ["sesemi_config", "base", "imagewoof", "demo"]


def _compose(name: str, overrides: list[str] | None = None):
    with initialize_config_module(config_module="sesemi.conf", version_base=None):
        return compose(config_name=name, overrides=overrides or [])


@pytest.fixture
def attributes():
    previous = get_attributes()
    set_attributes(
        SESEMIConfigAttributes(iterations_per_epoch=7, max_iterations=70, num_gpus=0, num_nodes=1)
    )
    yield
    set_attributes(previous)


def test_schema_defaults_match_spec():
    cfg = OmegaConf.structured(SESEMIConfig)
    run = cfg.run
    assert (run.gpus, run.num_nodes, run.data_root, run.id, run.dir) == (
        -1,
        1,
        "./data",
        "default",
        "./runs",
    )
    assert run.mode == RunMode.FIT and run.seed is None and run.accelerator is None
    assert cfg.learner._target_ == "sesemi.Classifier"
    assert OmegaConf.is_missing(cfg.learner.hparams, "num_classes")
    assert cfg.learner.hparams.model.supervised_loss.reduction == "mean"
    assert cfg.trainer is None and cfg.data.train is None


def test_bare_config_has_required_fields_missing():
    cfg = _compose("sesemi_config")
    with pytest.raises(MissingMandatoryValue):
        _ = cfg.learner.hparams.num_classes


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_config_composes(name):
    cfg = _compose(name)
    assert cfg.learner._target_ == "sesemi.Classifier"


def test_base_is_the_spec_example(attributes):
    cfg = _compose("base")
    assert set(cfg.data.train) == {"supervised", "rotation_prediction"}
    assert (
        cfg.data.train.rotation_prediction.collate_fn._target_
        == "sesemi.collation.RotationTransformer"
    )
    assert cfg.learner.hparams.model.backbone.name == "resnet50d"
    assert cfg.learner.hparams.optimizer.nesterov is True
    sched = cfg.learner.hparams.lr_scheduler.scheduler
    assert (sched.iters_per_epoch, sched.max_iters) == (7, 70)  # through ${sesemi:...}
    assert cfg.trainer.callbacks[0].monitor == "val/top1"


def test_imagewoof_extends_base():
    cfg = _compose("imagewoof")
    assert (cfg.run.seed, cfg.run.num_epochs, cfg.run.id) == (42, 80, "imagewoof")
    assert cfg.run.data_root == "./data/imagewoof2"
    assert cfg.learner.hparams.model.backbone.name == "resnet50d"


def test_overrides_are_type_checked():
    assert _compose("base", ["run.num_epochs=3"]).run.num_epochs == 3
    assert _compose("base", ["run.mode=TEST"]).run.mode == RunMode.TEST
    with pytest.raises(ConfigCompositionException, match="num_epochs"):
        _compose("base", ["run.num_epochs=abc"])
    with pytest.raises(ConfigCompositionException):
        _compose("base", ["run.num_epoch=3"])  # misspelled key
    with pytest.raises(ConfigCompositionException):
        _compose("base", ["run.mode=TRAIN"])  # not a RunMode


def test_resolver_before_run_is_a_clear_error():
    previous = get_attributes()
    set_attributes(SESEMIConfigAttributes())
    try:
        cfg = _compose("base")
        with pytest.raises(Exception, match="not known yet"):
            _ = cfg.learner.hparams.lr_scheduler.scheduler.max_iters
    finally:
        set_attributes(previous)


def test_resolver_unknown_attribute():
    cfg = OmegaConf.create({"x": "${sesemi:nope}"})
    with pytest.raises(Exception, match="unknown attribute"):
        _ = cfg.x


def test_null_loader_entry_is_switched_off(image_root):
    from sesemi.data import SESEMIDataModule

    cfg = _compose(
        "base",
        ["data.train.rotation_prediction=null", f"run.data_root={image_root}"],
    )
    data = SESEMIDataModule(cfg.data, cfg.run.data_root, cfg.run.batch_size_per_gpu)
    assert list(data.train) == ["supervised"]
