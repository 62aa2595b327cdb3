"""The README's promises: its Python API example runs, and every config it names exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from conftest import FAST

import sesemi
import sesemi.api
from sesemi.cli import builtin_configs

README = Path(__file__).resolve().parents[1] / "README.md"
API_MARKER = "<!-- api-example -->"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def readme() -> str:
    """The README's text."""
    return README.read_text(encoding="utf-8")


def api_example() -> str:
    """The ```python block that follows the api-example marker."""
    text = readme()
    assert text.count(API_MARKER) == 1, f"README.md needs exactly one {API_MARKER} line"
    after = text[text.index(API_MARKER) + len(API_MARKER) :].lstrip("\n")
    assert after.startswith("```python\n"), f"a ```python block must follow {API_MARKER}"
    return after[len("```python\n") : after.index("\n```", len("```python")) + 1]


def code_blocks() -> list[str]:
    """The contents of every fenced code block in the README."""
    return FENCE.findall(readme())


def test_the_api_example_trains_and_predicts(tmp_path, monkeypatch, capsys, one_thread):
    # The example as written, made a few CPU steps long: compose appends the tests' FAST
    # overrides (test model, 2 steps) to whatever the example asks for.
    compose = sesemi.api.compose

    def fast_compose(name="sesemi_config", overrides=(), config_dir=None):
        return compose(name, [*overrides, *FAST], config_dir)

    monkeypatch.setattr(sesemi.api, "compose", fast_compose)
    monkeypatch.setattr(sesemi, "compose", fast_compose)
    monkeypatch.chdir(tmp_path)  # an empty folder: the demo prepares ./data/digits itself
    exec(compile(api_example(), f"{README}:api-example", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out

    top1 = re.search(r"val/top1\s+(\d+\.\d+)", out)
    assert top1 is not None, out
    assert 0.0 <= float(top1[1]) <= 1.0
    images = sorted((tmp_path / "data" / "digits" / "val" / "3").glob("*.png"))
    assert images, "the demo did not prepare data/digits"
    # One line per predicted image: its path, a digit class and a probability.
    predicted = re.findall(r"data/digits/val/3/(\d+\.png)\s+->\s+(\S+)\s+\((\d\.\d+)\)", out)
    assert predicted, out
    assert len({name for name, _, _ in predicted}) == len(predicted)
    for name, label, probability in predicted:
        assert (tmp_path / "data" / "digits" / "val" / "3" / name).is_file()
        assert label in {str(d) for d in range(10)}, label
        assert 0.0 <= float(probability) <= 1.0


def _named(pattern: str, blocks: list[str]) -> set[str]:
    names = set()
    for block in blocks:
        for match in re.finditer(pattern, block):
            names.update(n for n in re.split(r"[,\[\]\s]+", match[1]) if n)
    return names


def test_every_method_the_readme_names_is_a_method_file():
    blocks = code_blocks()
    # method=NAME, method=A,B,C (a sweep), method=[A,B] (several) and `override method: NAME`.
    named = _named(r"(?<![\w.+~/@])method=(\[[\w,]+\]|[\w,]+)", blocks)
    named |= _named(r"override method:\s*(\w+)", blocks)
    assert named, "no method=NAME in the README's code blocks"
    missing = named - set(builtin_configs("method"))
    assert not missing, f"README names methods without a sesemi/conf/method file: {missing}"


def test_every_config_the_readme_names_exists():
    blocks = code_blocks()
    text = readme()
    # Your own configs are those the README shows as configs/<name>.yaml; the rest are built in.
    own = set(re.findall(r"configs/(\w+)\.yaml", text))
    named = _named(r"(?:-cn|--config-name)[ =](\w+)", blocks)
    named |= _named(r"sesemi\.compose\(\s*[\"'](\w+)[\"']", blocks)
    assert "demo" in named
    missing = named - set(builtin_configs()) - own
    assert not missing, f"README names configs that are neither built in nor shown: {missing}"
    data = _named(r"(?<![\w.+~/@])data=(\w+)", blocks) | _named(r"override data:\s*(\w+)", blocks)
    assert not data - set(builtin_configs("data")), data


def test_the_two_set_up_commands_are_there():
    lines = [line for block in code_blocks() for line in block.splitlines()]
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert any(line.startswith(venv + "pip install -e . ") and "-cn demo" in line for line in lines)
    assert venv + 'pip install -e ".[test]" && ruff check . && pytest -q' in lines


def test_the_readme_override_that_wraps_a_policy_composes():
    # The README's '~KEY' '+KEY={...}' pair (a dict node replaced, not merged) composes.
    spans = re.findall(r"`('~[^`]+)`", readme().replace("\n  ", " "))
    assert spans, "the README shows no '~KEY' '+KEY=...' override"
    for span in spans:
        cfg = sesemi.compose("demo", ["method=fixmatch", *shlex.split(span)])
        node = cfg.learner.hparams.model.regularization_loss_heads.fixmatch.head.threshold
        assert node._target_.endswith("DistributionAlignment") and node.policy.threshold == 0.9
