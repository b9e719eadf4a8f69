"""``ivpt eval --oracle``: true part masks and image-blind maps scored by the evaluation's own meters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score
from test_engine_evaluate import write_checkpoint

from ivpt.cli import main
from ivpt.data import build_dataset, load_annotations
from ivpt.engine.oracle import (
    ORACLE_ROWS,
    OracleMaps,
    PartMaskInput,
    evaluate_oracles,
    grid_centres,
    part_mask_path,
    peak_maps,
)
from ivpt.metrics import add_stability_noise


def test_part_masks_are_warped_like_their_images(tiny_config) -> None:
    cfg = tiny_config()  # 32 px inputs from the 64 px synthetic images
    notes = load_annotations(cfg.data)
    masks = PartMaskInput(len(notes.part_names))
    for crop in (False, True):
        dataset = build_dataset(cfg, "test", train_transform=False, bbox_crop=crop, annotations=notes)
        for index in (0, 5):
            source = int(dataset.indices[index])
            mask = Image.open(part_mask_path(notes.root, notes.image_paths[source]))
            x0, y0, x1, y1 = notes.boxes[source].tolist()
            box = (x0, y0, x1 + 1, y1 + 1) if crop else None  # pixel-centre box -> PIL edges
            expected = np.asarray(mask.resize((32, 32), Image.Resampling.NEAREST, box=box))
            assert np.array_equal(masks.warped_ids(dataset, index).numpy(), expected)
        batch = {"index": torch.tensor([0, 5])}
        inputs = masks(batch, dataset)
        assert inputs.shape == (2, len(notes.part_names) + 2, 32, 32)
        assert torch.equal(inputs[:, :-1].sum(dim=1), torch.ones(2, 32, 32))  # one-hot, background included
        assert torch.all(inputs[:, -1] == float(crop))
        frame_only = PartMaskInput(len(notes.part_names), masks=False)(batch, dataset)
        assert frame_only.shape == (2, len(notes.part_names) + 2, 1, 1) and frame_only.sum() == 2 * float(crop)


def test_oracle_maps_are_cell_shares_and_ignore_the_stability_noise() -> None:
    ids = torch.tensor([[[1, 1, 0, 2], [1, 0, 0, 2], [2, 2, 2, 2], [0, 0, 1, 1]]])  # P = 2
    one_hot = torch.nn.functional.one_hot(ids, 3).permute(0, 3, 1, 2).float()
    inputs = torch.cat([one_hot[:, 1:], one_hot[:, :1], torch.zeros(1, 1, 4, 4)], dim=1)
    maps = OracleMaps(num_parts=2, map_size=(2, 2))(inputs).concept_maps[0]
    # Cells of 2 x 2 pixels: channel 0 = part 1, channel 1 = part 2, channel 2 = background.
    expected = torch.tensor(
        [[[0.75, 0.0], [0.0, 0.5]], [[0.0, 0.5], [0.5, 0.5]], [[0.25, 0.5], [0.5, 0.0]]]
    )
    assert torch.allclose(maps[0], expected)
    noisy = add_stability_noise(inputs, torch.Generator().manual_seed(0))
    assert torch.equal(OracleMaps(2, (2, 2))(noisy).concept_maps[0], maps)
    # The evaluation's probe (a blank RGB image) gets uniform maps with the oracle's channels.
    probe = OracleMaps(2, (2, 2))(torch.zeros(1, 3, 4, 4)).concept_maps[0]
    assert probe.shape == (1, 3, 2, 2) and torch.allclose(probe, torch.full_like(probe, 1 / 3))


def test_fixed_maps_peak_where_they_are_told() -> None:
    centres = grid_centres(10, (16, 16))
    # 4 columns, 3 rows, filled row by row; each point at its grid cell's centre in map-cell coordinates.
    assert centres.shape == (10, 2)
    assert torch.allclose(centres[0], torch.tensor([1.5, 16 / 6 - 0.5]))
    assert torch.allclose(centres[5], torch.tensor([(1.5) * 4 - 0.5, 1.5 * 16 / 3 - 0.5]))
    maps = peak_maps(torch.tensor([[3.0, 4.0], [12.0, 9.0]]), (16, 16))
    assert maps.shape == (3, 16, 16)
    assert [divmod(int(m.argmax()), 16) for m in maps[:2]] == [(4, 3), (9, 12)]  # (row, column)
    assert torch.all(maps[2] == maps[2, 0, 0])  # the background is constant
    assert maps[0, 4, 3] == 1.0 and maps[2, 0, 0] < maps[0, 4, 5]  # two cells (one width) away: still the peak's


def test_oracle_rows_known_answers(tiny_config) -> None:
    cfg = tiny_config()
    notes = load_annotations(cfg.data)
    # Maps at the input resolution: the oracle's argmax at a keypoint is the part drawn at its pixel.
    rows = evaluate_oracles(cfg, num_concepts=4, map_size=(32, 32))
    assert set(rows) == set(ORACLE_ROWS)
    test = build_dataset(cfg, "test", train_transform=False, annotations=notes)
    masks = PartMaskInput(len(notes.part_names))
    parts, keypoint_index = [], []
    for index in range(len(test)):
        ids = masks.warped_ids(test, index)
        for point, (x, y, visible) in enumerate(test[index]["keypoints"].tolist()):
            if visible > 0.5:
                parts.append(int(ids[round(y), round(x)]))
                keypoint_index.append(point)
    expected = 100.0 * normalized_mutual_info_score(keypoint_index, parts)
    assert rows["oracle"]["nmi"] == pytest.approx(expected, abs=1e-9)
    for name in ORACLE_ROWS:
        assert rows[name]["stability"] == 100.0  # the noise cannot move a one-hot argmax or a fixed map
        assert rows[name]["accuracy"] is None  # no backbone given
        assert list(rows[name]["per_stage"]) == [0]
    assert rows["fixed_grid"]["nmi"] < rows["oracle"]["nmi"] and rows["fixed_parts"]["nmi"] < rows["oracle"]["nmi"]


def test_cli_oracle_writes_rows_and_needs_part_masks(tiny_config, tmp_path: Path, capsys) -> None:
    checkpoint = write_checkpoint(tiny_config(), tmp_path / "ckpt" / "model.pt")
    assert main(["eval", "--checkpoint", str(checkpoint), "--oracle", "--out", str(tmp_path / "o")]) == 0
    rows = json.loads((tmp_path / "o" / "oracle.json").read_text())
    assert list(rows) == list(ORACLE_ROWS)
    assert 0.0 <= rows["oracle"]["accuracy"] <= 100.0
    assert rows["oracle"]["consistency"] >= rows["fixed_grid"]["consistency"]
    printed = capsys.readouterr().out
    assert "oracle" in printed and "fixed_parts" in printed and "oracle.json" in printed

    copy = tmp_path / "no_masks"
    shutil.copytree(Path(tiny_config().data.root), copy)
    shutil.rmtree(copy / "part_masks")
    code = main(["eval", "--checkpoint", str(checkpoint), "--oracle", f"data.root={copy}"])
    assert code == 2
    assert "has no part_masks/ folder" in capsys.readouterr().err


def test_cli_oracle_checks_out_before_the_work(tiny_config, tmp_path: Path, monkeypatch, capsys) -> None:
    checkpoint = write_checkpoint(tiny_config(), tmp_path / "ckpt" / "model.pt")
    scored: list[str] = []
    monkeypatch.setattr("ivpt.engine.oracle.checkpoint_oracle_rows", lambda *a, **k: scored.append("rows"))
    (tmp_path / "afile").write_text("hi")
    out = tmp_path / "afile" / "sub"
    code = main(["eval", "--checkpoint", str(checkpoint), "--oracle", "--out", str(out)])
    assert code == 2 and scored == []
    assert capsys.readouterr().err == (
        f"ivpt eval: error: output folder '{out}': '{tmp_path / 'afile'}' is a file, expected a folder\n"
    )
