"""ivpt report: streaming concept statistics with known answers, and the HTML page end to end."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ivpt.engine.report import build_report
from ivpt.errors import IVPTError
from ivpt.model.output import IVPTOutput
from ivpt.viz.concept_stats import ConceptStatisticsMeter, claimed_fractions, crop_box, typicality_scores
from ivpt.viz.palette import concept_palette, to_hex
from ivpt.viz.report import training_curves_figure

CHROMIUM = "/usr/bin/chromium"
CONSOLE_ERRORS = ("Uncaught", "Failed to load resource", "ERROR:CONSOLE")


def _maps(*owners: tuple[int, float] | list[tuple[int, float]], num_concepts: int = 3) -> torch.Tensor:
    """``(B, K, 2, 2)`` maps; per image a (concept, probability) owning all 4 cells, or 4 such pairs."""
    batch = []
    for owner in owners:
        cells = owner if isinstance(owner, list) else [owner] * 4
        image = torch.zeros(num_concepts, 4)
        for cell, (concept, probability) in enumerate(cells):
            image[:, cell] = (1.0 - probability) / (num_concepts - 1)
            image[concept, cell] = probability
        batch.append(image.view(num_concepts, 2, 2))
    return torch.stack(batch)


def _known_batches() -> list[tuple[IVPTOutput, torch.Tensor, torch.Tensor]]:
    """Three images in two batches; stage 0 groups its 2 concepts into the 2 final parts (stage 1)."""
    top_row_0 = [(0, 0.7), (0, 0.7), (2, 0.8), (2, 0.8)]  # concept 0 on top, background below
    stage0 = _maps((0, 0.9), (1, 0.8), top_row_0)
    stage1 = _maps((1, 0.6), (0, 0.9), (0, 0.5))
    groupings = torch.tensor(
        [[[0.9, 0.1], [0.5, 0.5]], [[0.5, 0.5], [0.2, 0.8]], [[0.7, 0.3], [0.5, 0.5]]]
    )  # (B, 2 concepts, 2 parts); rows of absent concepts are uniform
    part_logits = torch.tensor([[[2.0, 0.0], [4.0, 1.0]], [[1.0, 3.0], [0.0, 5.0]], [[6.0, 0.0], [2.0, 2.0]]])
    labels = torch.tensor([0, 1, 0])
    indices = torch.tensor([10, 11, 12])

    def output(rows: slice) -> IVPTOutput:
        return IVPTOutput(
            logits=part_logits[rows].mean(1),
            part_logits=part_logits[rows],
            concept_maps=[stage0[rows], stage1[rows]],
            groupings=[groupings[rows]],
            fusion_targets=[1],
        )

    return [(output(slice(0, 2)), labels[:2], indices[:2]), (output(slice(2, 3)), labels[2:], indices[2:])]


def test_claimed_fractions_and_typicality() -> None:
    maps = _maps((0, 0.9), [(0, 0.7), (0, 0.7), (2, 0.8), (2, 0.8)])
    torch.testing.assert_close(claimed_fractions(maps), torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]))
    scores, cells = typicality_scores(maps)
    # on a 2x2 grid every 3x3 neighbourhood is the whole grid: the score is the map's mean
    torch.testing.assert_close(scores, maps.mean(dim=(2, 3)))
    assert cells.shape == (2, 3)


def test_meter_known_answers_across_batches() -> None:
    meter = ConceptStatisticsMeter(num_classes=2, top_k=2)
    for output, labels, indices in _known_batches():
        meter.update(output, labels, indices)
    stats = meter.compute()
    assert stats.num_images == 3 and stats.num_concepts == [3, 3] and stats.grid_size == (2, 2)
    np.testing.assert_allclose(stats.mean_area[0], [1.5 / 3, 1 / 3, 0.5 / 3])
    np.testing.assert_allclose(stats.presence[0], [2 / 3, 1 / 3, 1 / 3])
    # concept 0 is present in images 0 and 2, concept 1 only in image 1
    np.testing.assert_allclose(stats.mean_grouping[0], [[0.8, 0.2], [0.2, 0.8]])
    # concept 0's map means: image 10 -> 0.9, image 11 -> 0.1, image 12 -> (0.7 + 0.7 + 0.1 + 0.1) / 4
    np.testing.assert_array_equal(stats.top_images[0][0], [10, 12])
    np.testing.assert_allclose(stats.top_scores[0][0], [0.9, 0.4], atol=1e-6)
    # concept 1: image 11 -> 0.8, image 12 -> (0.15 + 0.15 + 0.1 + 0.1) / 4 = 0.125, image 10 -> 0.05
    np.testing.assert_array_equal(stats.top_images[0][1], [11, 12])
    np.testing.assert_allclose(stats.top_scores[0][1], [0.8, 0.125], atol=1e-6)
    # class 0 = images 0 and 2: part shares of logit 0 are (2/2, 4/2) and (6/2, 2/2)
    np.testing.assert_allclose(stats.class_part_usage, [[2.0, 1.5], [1.5, 2.5]])
    np.testing.assert_array_equal(stats.class_counts, [2, 1])


def test_meter_pads_when_fewer_images_than_top_k() -> None:
    meter = ConceptStatisticsMeter(num_classes=2, top_k=5)
    output, labels, indices = _known_batches()[1]
    meter.update(output, labels, indices)
    stats = meter.compute()
    assert stats.top_images[0].shape == (3, 5)
    np.testing.assert_array_equal(stats.top_images[0][:, 1:], -1)
    # an absent concept (1 in image 12) keeps a uniform grouping row
    np.testing.assert_allclose(stats.mean_grouping[0][1], [0.5, 0.5])


def test_meter_errors() -> None:
    with pytest.raises(IVPTError, match="top_k must be at least 1, got 0"):
        ConceptStatisticsMeter(num_classes=2, top_k=0)
    with pytest.raises(IVPTError, match="no images were seen"):
        ConceptStatisticsMeter(num_classes=2, top_k=1).compute()


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        (5, (4, 4, 20, 20)),  # row 1, col 1 of a 4x4 grid on 32 px: centre (12, 12)
        (0, (0, 0, 16, 16)),  # top-left corner: shifted inside
        (15, (16, 16, 32, 32)),  # bottom-right corner
    ],
)
def test_crop_box(cell: int, expected: tuple[int, int, int, int]) -> None:
    assert crop_box(cell, (4, 4), (32, 32), 16) == expected


def test_crop_box_larger_than_the_image_is_the_image() -> None:
    assert crop_box(3, (2, 2), (20, 30), 50) == (0, 0, 20, 30)


def test_save_image_writes_the_exact_pixels(tmp_path: Path) -> None:
    from ivpt.viz.drawing import save_image

    pixels = np.random.default_rng(0).integers(0, 256, size=(13, 29, 3), dtype=np.uint8)
    path = save_image(pixels, tmp_path / "sub" / "strip.png")
    with Image.open(path) as written:
        assert written.format == "PNG" and written.mode == "RGB"
        assert np.array_equal(np.asarray(written), pixels)


def test_training_curves_figure_panels() -> None:
    records = [
        {"event": "start", "step": 0},
        {"event": "train", "step": 1, "epoch": 0, "loss": {"total": 2.0, "presence": 0.5}, "lr": {"head": 0.01}},
        {"event": "train", "step": 2, "epoch": 0, "loss": {"total": 1.0, "presence": 0.4}, "lr": {"head": 0.005}},
        {"event": "val", "step": 2, "epoch": 1, "accuracy": 50.0, "top5": None, "best": 50.0},
    ]
    figure = training_curves_figure(records)
    assert figure is not None
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["training loss terms", "validation metrics (%)", "learning rates"]
    labels = [sorted(line.get_label() for line in ax.get_lines()) for ax in figure.axes]
    assert labels == [["presence", "total"], ["accuracy"], ["head"]]
    assert training_curves_figure([{"event": "start", "step": 0}]) is None


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def _links(index: Path) -> list[str]:
    parser = _Links()
    parser.feed(index.read_text())
    return parser.links


def _chromium_dump_dom(page: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    """Load ``page`` in headless Chromium, offline; stdout is the DOM, stderr the console log."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _assert_links_exist(index: Path) -> list[str]:
    links = _links(index)
    for link in links:
        assert not re.match(r"^(https?:)?//", link), f"external link {link}"
        if link.startswith("data:"):
            continue
        assert (index.parent / link).is_file(), f"{link} does not exist"
    return links


def test_report_end_to_end(make_checkpoint: Callable, tmp_path: Path) -> None:
    from ivpt.engine.evaluate import evaluate

    checkpoint = make_checkpoint()
    out = tmp_path / "report"
    index = build_report(checkpoint, out_dir=out, top_k=3, metrics=["accuracy"], device="cpu", progress=False)
    assert index == out / "index.html"
    links = _assert_links_exist(index)
    assert {"img/training_curves.png", "img/hierarchy.png", "img/part_usage.png"} <= set(links)
    galleries = sorted(link for link in links if link.startswith("img/gallery/"))
    assert len(galleries) == 6 + 5 + 4  # every concept of every stage, background included
    with Image.open(out / galleries[0]) as strip:
        assert strip.height == 96 + 8 and strip.width == 3 * (96 + 8) + 2 * 4  # three framed crops

    page = index.read_text()
    palette = concept_palette([6, 5, 4])
    assert to_hex(palette[0][0]) in page and to_hex(palette[2][3]) in page
    assert "s1:c0" in page and "part 2" in page
    # the metrics are those of the evaluation function behind `ivpt eval`
    from ivpt.model.pretrained import load_checkpoint

    model, cfg, _ = load_checkpoint(checkpoint)
    expected = evaluate(model, cfg, ["accuracy"], "cpu")
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["accuracy"] == pytest.approx(expected["accuracy"])
    assert f"<td class='num'>{expected['accuracy']:.2f}</td>" in page


def test_report_gathers_its_statistics_in_the_metrics_pass(
    make_checkpoint: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, undated_page: Callable[[Path], str]
) -> None:
    """Metrics computed now: one pass over the test split gives both; stored metrics: a pass of its own;
    statistics handed in: no pass at all. The three pages are the same."""
    import ivpt.engine.report as report
    from ivpt.engine.evaluate import evaluate
    from ivpt.model.pretrained import load_checkpoint

    checkpoint = make_checkpoint()
    own_passes: list[int] = []
    collect = report.collect_statistics

    def counted(*args: object, **kwargs: object) -> object:
        own_passes.append(1)
        return collect(*args, **kwargs)

    monkeypatch.setattr(report, "collect_statistics", counted)
    computed = build_report(checkpoint, out_dir=tmp_path / "now", top_k=2, device="cpu", progress=False)
    assert own_passes == [] and "computed now" in computed.read_text()

    # what `ivpt eval` writes beside the checkpoint: the report reads it and streams the split itself
    model, cfg, info = load_checkpoint(checkpoint)
    stored = evaluate(model, cfg, None, "cpu")
    stored["checkpoint"] = str(checkpoint)
    (checkpoint.parent / "metrics.json").write_text(json.dumps(stored))
    read = build_report(checkpoint, out_dir=tmp_path / "read", top_k=2, device="cpu", progress=False)
    assert own_passes == [1] and "read from" in read.read_text()

    meter = ConceptStatisticsMeter(len(info["class_names"]), 2, device=None)
    evaluate(model, cfg, ["accuracy"], "cpu", observe=meter.observe)
    given = build_report(
        checkpoint, out_dir=tmp_path / "given", top_k=2, device="cpu", progress=False, statistics=meter.compute()
    )
    assert own_passes == [1]
    indexes = (computed, read, given)
    galleries = [sorted(p.name for p in (index.parent / "img" / "gallery").iterdir()) for index in indexes]
    assert galleries[0] and galleries[0] == galleries[1] == galleries[2]
    for name in galleries[0]:
        strips = [np.asarray(Image.open(index.parent / "img" / "gallery" / name)) for index in indexes]
        assert np.array_equal(strips[0], strips[1]) and np.array_equal(strips[0], strips[2])
    # apart from the date and where the metrics came from, the pages say the same
    pages = [re.sub(r"scores in percent; [^<]*</p>", "", undated_page(index)) for index in indexes]
    assert pages[0] == pages[1] == pages[2]

    with pytest.raises(IVPTError, match="statistics given cover .* top_k \\[2\\].* top_k 3"):
        build_report(checkpoint, out_dir=tmp_path / "bad", top_k=3, device="cpu", statistics=meter.compute())


def test_report_without_log_and_concepts(make_checkpoint: Callable, tmp_path: Path) -> None:
    checkpoint = make_checkpoint("model.method=linear_probe", log=False)
    index = build_report(
        checkpoint, out_dir=tmp_path / "r", top_k=2, metrics=["accuracy"], device="cpu", progress=False
    )
    page = index.read_text()
    assert "log.jsonl was not found" in page
    assert "has no concept maps" in page
    assert _assert_links_exist(index) == ["data:,"]


def test_report_rejects_bad_top_k(make_checkpoint: Callable, tmp_path: Path) -> None:
    with pytest.raises(IVPTError, match="--top-k must be at least 1, got 0"):
        build_report(make_checkpoint(log=False), out_dir=tmp_path, top_k=0)


def test_cli_report_into_a_path_under_a_file_is_one_line(
    make_checkpoint: Callable, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ivpt.cli import main

    (tmp_path / "afile").write_text("hi")
    out = tmp_path / "afile" / "report"
    assert main(["report", "--checkpoint", str(make_checkpoint(log=False)), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"ivpt report: error: output folder '{out}': '{tmp_path / 'afile'}' is a file, expected a folder\n"
    )


@pytest.mark.slow
def test_cli_report_reuses_eval_numbers_and_loads_in_chromium(
    make_checkpoint: Callable, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ivpt.cli import main

    checkpoint = make_checkpoint()
    assert main(["eval", "--checkpoint", str(checkpoint)]) == 0
    evaluated = json.loads((checkpoint.parent / "metrics.json").read_text())
    out = tmp_path / "report"
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(out), "--top-k", "2"]) == 0
    assert f"report written to {out / 'index.html'}" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert f"read from {checkpoint.parent / 'metrics.json'}" in page
    for key in ("accuracy", "consistency", "nmi"):
        if evaluated[key] is not None:
            assert f"<tr><th>{key}</th><td class='num'>{evaluated[key]:.2f}</td></tr>" in page
    _assert_links_exist(out / "index.html")

    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    run = _chromium_dump_dom(out / "index.html", tmp_path / "chromium-profile")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "<h2>Concept galleries</h2>" in run.stdout
    problems = [line for line in run.stderr.splitlines() if any(error in line for error in CONSOLE_ERRORS)]
    assert not problems, problems


def test_chromium_detects_console_errors(tmp_path: Path) -> None:
    """The console check above can fail: a page with a script error is caught."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>notDefinedAnywhere()</script></body></html>")
    run = _chromium_dump_dom(page, tmp_path / "chromium-profile")
    assert any("Uncaught" in line for line in run.stderr.splitlines())
