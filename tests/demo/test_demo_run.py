"""``ivpt demo``: its configs, its table, its errors, and one fast end-to-end run."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from ivpt.config import Config
from ivpt.demo.run import (
    FAST_PLAN,
    FULL_PLAN,
    METHODS,
    ORACLE_NOTES,
    TABLE_METRICS,
    demo_config,
    format_results,
    run_demo,
    table_row,
)
from ivpt.engine.oracle import ORACLE_ROWS
from ivpt.errors import IVPTError
from ivpt.losses import TERM_NAMES
from ivpt.model.demo_vit import DEMO_ARCH


@pytest.mark.parametrize("method", METHODS)
def test_demo_configs_share_backbone_data_and_budget(method: str, tmp_path: Path) -> None:
    cfg = demo_config(method, FULL_PLAN, tmp_path / "data", tmp_path / "runs" / method)
    assert isinstance(cfg, Config)
    assert cfg.model.method == method
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.img_size) == (DEMO_ARCH, True, 64)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.max_steps) == (
        FULL_PLAN.epochs,
        FULL_PLAN.batch_size,
        0,
    )
    assert cfg.data.root == str(tmp_path / "data")
    assert cfg.train.out_dir == str(tmp_path / "runs" / method)
    assert cfg.data.val_fraction == 0.0
    # The stored config round-trips: `ivpt train -c OUT/runs/<method>/config.yaml` repeats the run.
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_ivpt_runs_in_the_papers_setting(tmp_path: Path) -> None:
    cfg = demo_config("ivpt", FULL_PLAN, tmp_path, tmp_path)
    assert cfg.model.freeze == "tokens"
    assert cfg.model.n_pro == FULL_PLAN.n_pro
    # The paper's eight loss weights, all 1; the prototypes start from the data (see run.py).
    assert all(getattr(cfg.loss, name) == 1.0 for name in TERM_NAMES)
    assert cfg.train.prototype_init == "data"
    assert cfg.loss.label_smoothing == 0.1
    assert demo_config("vpt_deep", FULL_PLAN, tmp_path, tmp_path).train.prototype_init == "random"
    assert demo_config("vpt_deep", FULL_PLAN, tmp_path, tmp_path).loss.entropy == 1.0
    assert demo_config("vpt_deep", FULL_PLAN, tmp_path, tmp_path).eval.stage == -1
    assert demo_config("ivpt", FAST_PLAN, tmp_path, tmp_path).model.n_pro == FAST_PLAN.n_pro


def test_unknown_method_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(IVPTError, match="demo: unknown method 'protopnet'; expected one of ivpt, vpt_deep"):
        demo_config("protopnet", FULL_PLAN, tmp_path, tmp_path)


def test_table_row_keeps_the_metrics_and_the_notes_behind_them() -> None:
    results = {
        "accuracy": 91.5,
        "top5": 100.0,
        "consistency": None,
        "nmi": None,
        "notes": [
            "not requested: fg_iou",
            "consistency: method 'vpt_deep' has no concept maps",
            "fg_iou: method 'vpt_deep' has no concept maps",
            "part_discovery: method 'vpt_deep' has no concept maps",
        ],
    }
    row = table_row(results)
    assert list(row) == [*TABLE_METRICS, "notes"]
    assert row["accuracy"] == 91.5 and row["consistency"] is None and row["faithfulness"] is None
    assert row["notes"] == [
        "consistency: method 'vpt_deep' has no concept maps",
        "part_discovery: method 'vpt_deep' has no concept maps",
    ]


def test_format_results_prints_numbers_dashes_and_a_note() -> None:
    full = dict.fromkeys(TABLE_METRICS, 12.345) | {"notes": []}
    probe = dict.fromkeys(TABLE_METRICS) | {"accuracy": 80.0, "notes": ["consistency: no maps"]}
    text = format_results({"ivpt": full, "linear_probe": probe})
    lines = text.splitlines()
    assert lines[0].split() == ["method", *TABLE_METRICS]
    assert lines[2].split() == ["ivpt"] + ["12.3"] * len(TABLE_METRICS)
    assert lines[3].split() == ["linear_probe", "80.0"] + ["-"] * (len(TABLE_METRICS) - 1)
    assert "note: linear_probe has no concept maps or part scores, so consistency, stability" in text
    assert "note: ivpt" not in text
    vpt = full | {"faithfulness": None}
    assert "note: vpt_deep has no part scores, so faithfulness does not apply" in format_results({"vpt_deep": vpt})
    # An oracle row says what it is, not what it lacks.
    oracle = table_row(dict.fromkeys(TABLE_METRICS, 50.0) | {"faithfulness": None}, oracle="fixed_grid")
    assert oracle["notes"] == [ORACLE_NOTES["fixed_grid"]]
    text = format_results({"fixed_grid": oracle})
    assert f"note: fixed_grid: {ORACLE_NOTES['fixed_grid']}" in text and "does not apply" not in text


def test_run_demo_rejects_a_file_as_output_and_runs_without_ivpt(tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.write_text("not a folder")
    with pytest.raises(IVPTError, match=r"demo: output '.*results' exists and is not a folder"):
        run_demo(target, fast=True)
    with pytest.raises(IVPTError, match="demo: methods must include 'ivpt'"):
        run_demo(tmp_path / "out", fast=True, methods=("vpt_deep",))
    assert not (tmp_path / "out").exists()


def test_demo_cli_checks_the_backbone_file_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ivpt.cli import main

    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--backbone", str(tmp_path / "none.safetensors")]) == 2
    error = capsys.readouterr().err
    assert re.search(r"demo: backbone file '.*none\.safetensors' does not exist", error)
    assert not out.exists()


@pytest.mark.slow
def test_fast_demo_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], undated_page: Callable[[Path], str]
) -> None:
    out = tmp_path / "demo"
    rows = run_demo(out, fast=True, jobs=2)

    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(rows))
    assert list(results) == [*METHODS, *ORACLE_ROWS]
    for method in METHODS:
        assert set(results[method]) == {*TABLE_METRICS, "notes"}
        assert 0.0 <= results[method]["accuracy"] <= 100.0
    # The oracle rows: the true part masks (a probe on the true parts for accuracy) and the image-blind maps,
    # scored by the same meters; the noise of the stability protocol cannot move them.
    assert 0.0 <= results["oracle"]["accuracy"] <= 100.0
    assert results["fixed_parts"]["accuracy"] is None and results["fixed_grid"]["faithfulness"] is None
    for name in ORACLE_ROWS:
        assert results[name]["stability"] == 100.0 and results[name]["notes"] == [ORACLE_NOTES[name]]
    assert results["oracle"]["nmi"] > results["fixed_grid"]["nmi"]
    for key in ("consistency", "stability", "nmi", "ari", "kpr", "faithfulness"):
        assert isinstance(results["ivpt"][key], float), key
        assert results["linear_probe"][key] is None
        # VPT-Deep's prompt attention maps are scored like concept maps; it has no part scores.
        assert isinstance(results["vpt_deep"][key], float) == (key != "faithfulness"), key
    assert any("has no concept maps" in note for note in results["linear_probe"]["notes"])
    assert any(note.startswith("faithfulness:") for note in results["vpt_deep"]["notes"])

    figures = sorted((out / "explain").glob("*.png"))
    assert len(figures) == FAST_PLAN.explain_images
    with Image.open(figures[0]) as figure:
        assert figure.size == (1600, 900)
    assert (out / "report" / "index.html").read_text().lstrip().lower().startswith("<!doctype html")
    # The report's statistics came from IVPT's scoring pass: the same page as `ivpt report` makes alone.
    from ivpt.engine.report import build_report

    alone = build_report(out / "runs" / "ivpt" / "best.pt", out_dir=tmp_path / "alone", top_k=FAST_PLAN.top_k)
    assert undated_page(out / "report" / "index.html") == undated_page(alone)
    strips = sorted((out / "report" / "img" / "gallery").iterdir())
    assert strips and [p.name for p in strips] == sorted(p.name for p in (alone.parent / "img" / "gallery").iterdir())
    for strip in strips:
        assert strip.read_bytes() == (alone.parent / "img" / "gallery" / strip.name).read_bytes()
    for method in METHODS:
        assert (out / "runs" / method / "best.pt").is_file()
        assert (out / "runs" / method / "metrics.json").is_file()
    printed = capsys.readouterr().out
    # Data, the three methods side by side (the baselines scored in their process), IVPT's scoring
    # with every core, explain, report.
    assert printed.count("[demo 6/6] done") == 1
    assert "generated" in printed
    assert "  ivpt: trained in" in printed
    for method in METHODS:
        assert (out / "runs" / method / "demo.log").is_file()
        if method != "ivpt":
            assert f"  {method}: done: trained in" in printed
    timings = json.loads((out / "timings.json").read_text())
    steps = {k: v for k, v in timings.items() if k not in ("total", "methods")}
    assert len(steps) == 6
    assert any(k.startswith("oracle rows") for k in steps)
    assert any(k.startswith("evaluate ivpt") for k in steps)
    assert timings["total"] >= sum(steps.values()) - 1.0
    side_by_side = next(v for k, v in steps.items() if "side by side" in k)
    assert set(timings["methods"]) == set(METHODS)
    assert set(timings["methods"]["ivpt"]) == {"train"}
    for method in METHODS:
        assert 0 < timings["methods"][method]["train"] < side_by_side


@pytest.mark.slow
def test_fast_demo_one_method_after_the_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    rows = run_demo(out, fast=True, methods=("ivpt", "linear_probe"), jobs=1)

    assert list(rows) == ["ivpt", "linear_probe", *ORACLE_ROWS]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
    printed = capsys.readouterr().out
    # Data, train x 2, evaluate x 2, explain, report, each a step of its own; no worker processes.
    assert printed.count("[demo 8/8] done") == 1
    assert not list((out / "runs").glob("*/demo.log"))
    timings = json.loads((out / "timings.json").read_text())
    assert "methods" not in timings
    assert timings["total"] >= sum(v for k, v in timings.items() if k != "total") - 1.0
