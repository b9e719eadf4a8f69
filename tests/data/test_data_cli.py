"""``ivpt data-check`` and ``ivpt make-synthetic`` through the command-line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ivpt.cli import main


def test_make_synthetic_then_data_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "synthetic"
    argv = ["make-synthetic", str(root), "--classes", "3", "--per-class", "3", "--size", "40", "--seed", "2"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["train"], summary["test"], len(summary["classes"])) == (9, 6, 3, 3)

    assert main(["data-check", "--dataset", "cub", "--root", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["train"], report["test"], report["classes"], report["problems"]) == (6, 3, 3, [])
    assert report["parts"][:3] == ["beak", "head", "eye"]

    # Damage the copy: one image cut short after its header (it opens but does not decode) and one label
    # line gone.
    images = sorted((root / "images").rglob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[: images[0].stat().st_size // 2])
    labels = root / "image_class_labels.txt"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[1:]))
    assert main(["data-check", "--dataset", "cub", "--root", str(root)]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert len(problems) == 2
    assert "images.txt:1: image id '1' has no line in image_class_labels.txt" in problems[0]
    assert problems[1].startswith(f"cannot decode image '{images[0]}'")
    # Without decoding (headers are still read), only the label problem remains.
    assert main(["data-check", "--dataset", "cub", "--root", str(root), "--no-images"]) == 1
    assert len(json.loads(capsys.readouterr().out)["problems"]) == 1


def test_make_synthetic_bad_option_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-synthetic", str(tmp_path / "s"), "--size", "8"]) == 2
    assert capsys.readouterr().err.strip() == "ivpt make-synthetic: error: size must be at least 32 pixels, got 8"
