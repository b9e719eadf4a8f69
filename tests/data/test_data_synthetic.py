"""The synthetic part data set: deterministic, in the CUB layout, and geometrically consistent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivpt.config import Config
from ivpt.data import build_dataset, check_dataset, load_annotations, make_synthetic
from ivpt.data.synthetic import FAMILIES, PART_NAMES, class_definitions, render_synthetic
from ivpt.errors import DataError

SMALL = {"num_classes": 3, "per_class": 4, "size": 48}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "set"
    make_synthetic(root, num_classes=4, per_class=6, size=64, seed=5)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "a", seed=3, **SMALL)
    make_synthetic(tmp_path / "b", seed=3, **SMALL)
    make_synthetic(tmp_path / "c", seed=4, **SMALL)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert len(a) == 7 + 1 + 3 * 12  # seven annotation files, synthetic.json, image + two masks per image
    assert a == b
    assert a.keys() == c.keys() and a["images.txt"] == c["images.txt"] and a != c


def test_output_passes_the_cub_loader_and_check(synthetic_root: Path, make_cfg: Callable[..., Config]) -> None:
    report = check_dataset("cub", synthetic_root)
    assert report["problems"] == []
    assert (report["train"], report["test"], report["classes"]) == (12, 12, 4)
    assert report["parts"] == list(PART_NAMES)
    dataset = build_dataset(make_cfg("cub", synthetic_root, img_size=32), "test", with_masks=True)
    assert len(dataset) == 12 and dataset.has_masks and dataset.num_classes == 4
    sample = dataset[0]
    assert sample["image"].shape == (3, 32, 32) and sample["keypoints"].shape == (8, 3)
    record = json.loads((synthetic_root / "synthetic.json").read_text())
    assert record["family"] == "default" and len(record["class_attributes"]) == 4


def test_keypoints_lie_on_their_parts(synthetic_root: Path, make_cfg: Callable[..., Config]) -> None:
    notes = load_annotations(make_cfg("cub", synthetic_root).data)
    assert notes.keypoints[:, :, 2].mean() > 0.5  # most parts are in view
    checked = 0
    for path, keypoints, box in zip(notes.image_paths, notes.keypoints, notes.boxes, strict=True):
        relative = path.relative_to(synthetic_root / "images").with_suffix(".png")
        part_map = np.asarray(Image.open(synthetic_root / "part_masks" / relative))
        foreground = np.asarray(Image.open(synthetic_root / "segmentations" / relative))
        assert set(np.unique(part_map)) <= set(range(len(PART_NAMES) + 1))
        # The soft foreground (averaged from a finer drawing) agrees with the part map up to edge pixels.
        parts, covered = part_map > 0, foreground >= 128
        assert (parts & covered).sum() / (parts | covered).sum() > 0.85
        assert np.any((foreground > 0) & (foreground < 255))
        ys, xs = np.nonzero(part_map)
        assert box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        # The eye is drawn last, on the head: their keypoints (part centres) fall on their own pixels (at
        # this small size the head centre may touch the eye).
        for name, allowed in (("eye", {"eye"}), ("head", {"head", "eye"})):
            x, y, visible = keypoints[PART_NAMES.index(name)]
            if visible:
                assert PART_NAMES[part_map[round(float(y)), round(float(x))] - 1] in allowed
                checked += 1
    assert checked >= 30


def test_families_define_different_classes(tmp_path: Path) -> None:
    default, pretrain = class_definitions("default", 8), class_definitions("pretrain", 8)
    assert len({name for name, _ in default}) == 8
    assert not {name for name, _ in default} & {name for name, _ in pretrain}
    assert set(default[0][1]) == {"head_colour", "wing_pattern", "beak_shape"}
    assert set(pretrain[0][1]) == {"breast_pattern", "tail_shape", "tail_colour"}
    summary = make_synthetic(tmp_path / "p", family="pretrain", **SMALL)
    assert summary["family"] == "pretrain" and summary["classes"][0] == f"001.{pretrain[0][0]}"
    assert (summary["images"], summary["train"], summary["test"]) == (12, 6, 6)


def test_bad_arguments_and_occupied_output(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown synthetic family 'zoo': expected one of default, pretrain, generic"):
        make_synthetic(tmp_path / "x", family="zoo")
    limit = FAMILIES["default"].max_classes
    with pytest.raises(DataError, match=f"num_classes must be between 2 and {limit} for family 'default', got 1"):
        make_synthetic(tmp_path / "x", num_classes=1)
    with pytest.raises(DataError, match="per_class must be at least 2"):
        make_synthetic(tmp_path / "x", per_class=1)
    with pytest.raises(DataError, match="size must be at least 32 pixels, got 16"):
        make_synthetic(tmp_path / "x", size=16)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.tex").write_text("keep me")
    with pytest.raises(DataError, match="is not empty and holds no earlier synthetic data set"):
        make_synthetic(occupied, **SMALL)
    assert (occupied / "thesis.tex").read_text() == "keep me"


def test_regenerating_replaces_an_earlier_set(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "s", num_classes=4, per_class=4, size=48)
    make_synthetic(tmp_path / "s", **SMALL)
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3
    assert check_dataset("cub", tmp_path / "s")["problems"] == []


def test_render_synthetic_gives_the_pixels_split_and_labels_of_the_files(
    synthetic_root: Path, make_cfg: Callable[..., Config]
) -> None:
    data = render_synthetic(num_classes=4, per_class=6, size=64, seed=5)
    notes = load_annotations(make_cfg("cub", synthetic_root).data)
    assert data.images.shape == (24, 64, 64, 3) and data.images.dtype == np.uint8
    files = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in notes.image_paths])
    assert np.array_equal(data.images, files)  # the same JPEG round trip as the written images
    masks = [
        np.asarray(
            Image.open(synthetic_root / "part_masks" / path.relative_to(synthetic_root / "images").with_suffix(".png"))
        )
        for path in notes.image_paths
    ]
    assert np.array_equal(data.part_ids, np.stack(masks))
    assert np.array_equal(data.labels, np.asarray(notes.labels))
    assert np.array_equal(data.is_train, np.asarray(notes.is_train))


def test_render_synthetic_does_not_depend_on_workers_and_holds_out_what_it_is_told() -> None:
    one = render_synthetic(num_classes=3, per_class=5, size=32, seed=2, family="pretrain", test_per_class=1)
    two = render_synthetic(num_classes=3, per_class=5, size=32, seed=2, family="pretrain", test_per_class=1, workers=2)
    assert np.array_equal(one.images, two.images) and np.array_equal(one.part_ids, two.part_ids)
    assert np.array_equal(one.is_train, two.is_train)
    assert one.is_train.reshape(3, 5).sum(axis=1).tolist() == [4, 4, 4]
    assert one.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(DataError, match="test_per_class must be between 1 and 4 .* got 5"):
        render_synthetic(num_classes=3, per_class=5, size=32, test_per_class=5)
    with pytest.raises(DataError, match="unknown synthetic family 'zoo'"):
        render_synthetic(family="zoo")


def test_generic_family_has_no_classes_and_covers_the_other_families_values() -> None:
    import colorsys

    from ivpt.data.synthetic import _random_colour

    groups = class_definitions("generic", 3)
    assert groups == [("Group_1", {}), ("Group_2", {}), ("Group_3", {})]
    data = render_synthetic(num_classes=2, per_class=3, size=32, seed=1, family="generic", test_per_class=1)
    assert data.images.shape == (6, 32, 32, 3) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # Every class colour of every family lies in the range the generic family draws from (checked by
    # drawing it), the demo's white and near-black heads included; the narrow range misses both.
    rng = np.random.default_rng(0)
    wide = np.array([colorsys.rgb_to_hsv(*(np.array(_random_colour(rng, True)) / 255)) for _ in range(4000)])
    narrow = np.array([colorsys.rgb_to_hsv(*(np.array(_random_colour(rng)) / 255)) for _ in range(4000)])
    for family in ("default", "pretrain"):
        for values in FAMILIES[family].axes.values():
            for value in values.values():
                if isinstance(value, tuple):
                    _, saturation, brightness = colorsys.rgb_to_hsv(*(np.array(value) / 255))
                    assert wide[:, 1].min() <= saturation <= wide[:, 1].max()
                    assert wide[:, 2].min() <= brightness <= wide[:, 2].max()
    white, black = FAMILIES["default"].axes["head_colour"]["White"], FAMILIES["default"].axes["head_colour"]["Black"]
    assert colorsys.rgb_to_hsv(*(np.array(white) / 255))[1] < narrow[:, 1].min()
    assert colorsys.rgb_to_hsv(*(np.array(black) / 255))[2] < narrow[:, 2].min()
    generic, demo = FAMILIES["generic"], FAMILIES["default"]
    assert generic.scale[0] <= demo.scale[0] and demo.scale[1] <= generic.scale[1]
    assert generic.centre[0] <= demo.centre[0] and demo.centre[1] <= generic.centre[1]


def test_demo_creatures_are_larger_in_the_frame_than_the_pretrain_familys() -> None:
    def box_share(family: str) -> float:
        data = render_synthetic(num_classes=4, per_class=10, size=64, seed=3, family=family)
        foreground = data.part_ids > 0
        widths = foreground.any(axis=1).sum(axis=1)  # columns holding a part, per image
        return float(widths.mean()) / 64

    assert box_share("default") > box_share("pretrain") + 0.08
