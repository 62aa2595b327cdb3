"""The built-in demo: composes, prepares the digits folder, trains a few steps, summarizes."""

from __future__ import annotations

from conftest import open_sesemi


def test_demo_runs_a_few_steps_and_summarizes(tmp_path):
    out = open_sesemi(
        "-cn",
        "demo",
        "run.num_iterations=4",
        "trainer.val_check_interval=4",
        "data.val.batch_size=512",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # The data was prepared as an ordinary image folder under the launch directory.
    digits = tmp_path / "data" / "digits"
    assert (digits / "sesemi_digits.json").is_file()
    assert len(list((digits / "train").glob("*/*.png"))) == 50
    summary = out.stdout[out.stdout.index("sesemi FIT finished") :]
    for part in (
        "val/top1",
        "val/top1_best",
        "best ckpt",
        "last ckpt",
        "next: open_sesemi -cn demo",
    ):
        assert part in summary
