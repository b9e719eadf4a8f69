"""The command line: help texts and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ivpt.cli import build_parser, main

SUBCOMMANDS = [
    "train", "eval", "explain", "report", "demo", "bench", "make-synthetic", "data-check", "convert-official",
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_listing_options(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: ivpt {command}" in text
    assert "options:" in text
    # the description is the same sentence as in the top-level listing
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    assert sub.description.split(":")[0] in text


def test_top_level_help_lists_all_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in text


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    code = main(["train", "-c", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "nope.yaml' does not exist" in err and "Traceback" not in err
    code = main(["train", "train.epochz=3"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key 'train.epochz'" in err


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ivpt.cli", "--debug", "train", "-c", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_the_package_lists_its_lazy_exports_and_imports_without_unix_modules():
    import builtins

    import ivpt

    assert {"create_model", "load_checkpoint", "explain", "load_config", "IVPTOutput"} <= set(dir(ivpt))
    assert set(ivpt.__all__) <= set(dir(ivpt))
    # ivpt.bench must import where the Unix-only resource module does not exist (Windows).
    real_import = builtins.__import__

    def no_resource(name, *args, **kwargs):
        if name == "resource":
            raise ImportError("No module named 'resource'")
        return real_import(name, *args, **kwargs)

    import importlib

    import ivpt.bench

    builtins.__import__ = no_resource
    try:
        reloaded = importlib.reload(ivpt.bench)
        assert reloaded._process_peak_rss_gb() is None
    finally:
        builtins.__import__ = real_import
        importlib.reload(ivpt.bench)


def test_python_dash_m_ivpt_runs_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "ivpt", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "data-check" in proc.stdout and "export" in proc.stdout
