"""CUB-200-2011 loader and ``check_dataset``: samples, splits and every failure mode on a written copy."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from data_layouts import BOX, CUB_CLASSES, HEIGHT, KEYPOINTS, PARTS, PER_CLASS, image_colour, write_huge_png
from PIL import Image
from torch.utils.data import DataLoader

from ivpt.config import Config
from ivpt.data import build_dataset, check_dataset, load_annotations
from ivpt.errors import DataError
from ivpt.model.preprocessing import preprocessing_of


def test_cub_samples_carry_transformed_annotations(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("cub", cub_root, img_size=24)
    test = build_dataset(cfg, "test", with_masks=True)
    assert len(test) == 6 and test.labels == [0, 0, 1, 1, 2, 2]
    assert test.class_names == list(CUB_CLASSES) and test.part_names == list(PARTS)
    assert test.num_classes == 3 and test.has_parts and test.has_masks

    sample = test[2]  # class 1, third image (k = 2)
    assert sample["label"] == 1 and sample["index"] == 2
    assert sample["image"].shape == (3, 24, 24) and sample["mask"].shape == (24, 24)
    # The image is one flat colour: the sample holds its bytes (uint8), and after normalisation (the
    # backbone's mean / std) every pixel holds that colour.
    assert sample["image"].dtype == torch.uint8
    assert (sample["image"][:, 12, 12].int() - torch.tensor(image_colour(1, 2))).abs().max() <= 13
    prep = preprocessing_of(cfg)
    expected = (torch.tensor(image_colour(1, 2)) / 255.0 - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    assert torch.allclose(test.transform.normalize(sample["image"])[:, 12, 12], expected, atol=0.05)

    # 48 x 36 -> 32 x 24 (scale 2/3), centre crop drops 4 columns on the left.
    scale = 24 / HEIGHT

    def mapped(x: float, y: float) -> list[float]:
        return [(x + 0.5) * scale - 0.5 - 4, (y + 0.5) * scale - 0.5]

    (x0, y0, _), (x1, y1, _), _ = KEYPOINTS
    expected_keypoints = [[*mapped(x0, y0), 1], [*mapped(x1, y1), 1], [0, 0, 0]]
    np.testing.assert_allclose(sample["keypoints"].numpy(), expected_keypoints, atol=1e-5)
    x, y, w, h = BOX
    # The box's left edge falls into the cropped-off columns: it is clipped to the frame.
    expected_box = np.clip([*mapped(x, y), *mapped(x + w - 1, y + h - 1)], 0, 23)
    assert expected_box[0] == 0.0
    assert sample["bbox"].tolist() == pytest.approx(expected_box.tolist())
    # The segmentation is 255 exactly inside the box: the mask is 1 well inside, 0 well outside.
    assert sample["mask"][4, 4].item() == pytest.approx(1.0, abs=0.02)
    assert sample["mask"][20, 20].item() == pytest.approx(0.0, abs=0.02)


def test_default_collate_batches_samples(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    dataset = build_dataset(make_cfg("cub", cub_root, img_size=16), "test", with_masks=True)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 16, 16)
    assert batch["keypoints"].shape == (4, 3, 3) and batch["bbox"].shape == (4, 4)
    assert batch["label"].tolist() == [0, 0, 1, 1] and batch["index"].tolist() == [0, 1, 2, 3]


def test_bbox_crop_fills_the_output_with_the_box(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    dataset = build_dataset(make_cfg("cub", cub_root, img_size=20), "test", bbox_crop=True)
    sample = dataset[0]
    x, y, w, h = BOX

    def mapped(px: float, py: float) -> list[float]:
        # The box's w x h pixels are stretched onto 20 x 20; pixel centres keep their relative place.
        return [(px + 0.5 - x) * 20 / w - 0.5, (py + 0.5 - y) * 20 / h - 0.5]

    # 20 x 10 box: the first / last pixel centres sit half a source pixel inside the output's edges.
    assert sample["bbox"].tolist() == pytest.approx([*mapped(x, y), *mapped(x + w - 1, y + h - 1)])
    assert sample["bbox"].tolist() == pytest.approx([0.0, 0.5, 19.0, 18.5])
    kx, ky, _ = KEYPOINTS[0]
    assert sample["keypoints"][0].tolist() == pytest.approx([*mapped(kx, ky), 1.0])


def test_train_val_test_splits(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("cub", cub_root, val_fraction=0.5, val_seed=3)
    notes = load_annotations(cfg.data)
    sizes = {
        split: len(build_dataset(cfg, split, annotations=notes)) for split in ("train", "val", "test", "train_full")
    }
    # Two training images per class: one goes to validation, one stays.
    assert sizes == {"train": 3, "val": 3, "test": 6, "train_full": 6}
    train, val = build_dataset(cfg, "train", annotations=notes), build_dataset(cfg, "val", annotations=notes)
    assert sorted(train.labels) == [0, 1, 2] and sorted(val.labels) == [0, 1, 2]
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    # Train splits are augmented by default, the others are not.
    cfg.data.augment = "paper"
    assert build_dataset(cfg, "train", annotations=notes).transform.augment == "paper"
    assert build_dataset(cfg, "val", annotations=notes).transform.augment == "none"
    assert build_dataset(cfg, "test", train_transform=True, annotations=notes).transform.augment == "paper"


def test_empty_validation_split_is_an_error(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg("cub", cub_root, val_fraction=0.0)
    assert len(build_dataset(cfg, "train")) == len(build_dataset(cfg, "train_full")) == 6
    with pytest.raises(DataError, match=r"split 'val' is empty \(data.val_fraction=0.0\)"):
        build_dataset(cfg, "val")
    with pytest.raises(DataError, match="unknown split 'dev': expected one of train, val, test, train_full"):
        build_dataset(cfg, "dev")


def test_masks_requested_without_segmentations(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    for png in (cub_root / "segmentations").rglob("*.png"):
        png.unlink()
    for folder in sorted((cub_root / "segmentations").rglob("*"), reverse=True):
        folder.rmdir()
    (cub_root / "segmentations").rmdir()
    dataset = build_dataset(make_cfg("cub", cub_root), "test")
    assert not dataset.has_masks and "mask" not in dataset[0]
    with pytest.raises(
        DataError, match=rf"masks were requested but '{re.escape(str(cub_root))}' has no segmentations/"
    ):
        build_dataset(make_cfg("cub", cub_root), "test", with_masks=True)


def test_clean_copy_has_no_problems(cub_root: Path) -> None:
    report = check_dataset("cub", cub_root)
    assert report == {
        "dataset": "cub",
        "root": str(cub_root),
        "train": 6,
        "test": 6,
        "classes": 3,
        "parts": list(PARTS),
        "problems": [],
        "warnings": [],
    }


def _replace_line(path: Path, number: int, text: str | None) -> None:
    lines = path.read_text().splitlines()
    if text is None:
        del lines[number - 1]
    else:
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text + "\n")


# Each damage: (how to damage the copy, a regular expression the problem / error must match).
DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing file": (
        lambda root: (root / "train_test_split.txt").unlink(),
        r"missing file '.*train_test_split\.txt' \(expected lines '<image_id> <is_train>'\)",
    ),
    "malformed line": (
        lambda root: _replace_line(root / "bounding_boxes.txt", 3, "3 a b c d"),
        r"bounding_boxes\.txt:3: expected '<image_id> <x> <y> <width> <height>', got '3 a b c d'",
    ),
    "bad split flag": (
        lambda root: _replace_line(root / "train_test_split.txt", 2, "2 yes"),
        r"train_test_split\.txt:2: expected '<image_id> <is_train>', got '2 yes'",
    ),
    "image without label": (
        lambda root: _replace_line(root / "image_class_labels.txt", 5, None),
        r"images\.txt:5: image id '5' has no line in image_class_labels\.txt",
    ),
    "unknown image id": (
        lambda root: _append(root / "train_test_split.txt", "99 1"),
        r"train_test_split\.txt:13: image id '99' is not in images\.txt",
    ),
    "duplicate image id": (
        lambda root: _append(root / "images.txt", "4 001.Alpha_bird/img_0.jpg"),
        r"images\.txt:13: duplicate image id '4' \(first on line 4\)",
    ),
    "unknown class": (
        lambda root: _replace_line(root / "image_class_labels.txt", 1, "1 7"),
        r"image_class_labels\.txt:1: class id '7' is not in classes\.txt",
    ),
    "missing image": (
        lambda root: (root / "images" / "002.Beta_bird" / "img_1.jpg").unlink(),
        r"images\.txt:6: image file '.*002\.Beta_bird/img_1\.jpg' does not exist",
    ),
    "empty box": (
        lambda root: _replace_line(root / "bounding_boxes.txt", 2, "2 4.0 3.0 0.0 10.0"),
        r"bounding_boxes\.txt:2: box width and height must be positive, got 0.0 x 10.0",
    ),
    "class without training image": (
        lambda root: [_replace_line(root / "train_test_split.txt", n, f"{n} 0") for n in (9, 10)],
        r"class '003\.Gamma_bird' \(id 3\) has no training image",
    ),
    "keypoint of unknown part": (
        lambda root: _replace_line(root / "parts" / "part_locs.txt", 2, "1 9 30.0 20.0 1"),
        r"part_locs\.txt:2: part id '9' is not in parts/parts\.txt",
    ),
    "keypoint of unknown image": (
        lambda root: _append(root / "parts" / "part_locs.txt", "77 1 3.0 3.0 1"),
        r"part_locs\.txt:37: image id '77' is not in images\.txt",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_each_damage_is_reported_and_stops_the_loader(
    damage: str, cub_root: Path, make_cfg: Callable[..., Config]
) -> None:
    apply, pattern = DAMAGES[damage]
    apply(cub_root)
    report = check_dataset("cub", cub_root, verify_images=False)
    assert any(re.search(pattern, p) for p in report["problems"]), report["problems"]
    with pytest.raises(DataError, match=pattern):
        load_annotations(make_cfg("cub", cub_root).data)


def test_check_collects_all_problems_at_once(cub_root: Path) -> None:
    for name in ("malformed line", "unknown image id", "missing image", "keypoint of unknown part"):
        DAMAGES[name][0](cub_root)
    (cub_root / "images" / "003.Gamma_bird" / "img_3.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    problems = check_dataset("cub", cub_root)["problems"]
    expected = [DAMAGES[name][1] for name in ("malformed line", "unknown image id", "missing image")]
    expected += [
        DAMAGES["keypoint of unknown part"][1],
        # The malformed box line also leaves image 3 without a box.
        r"images\.txt:3: image id '3' has no line in bounding_boxes\.txt",
        r"cannot decode image '.*003\.Gamma_bird/img_3\.jpg'",
    ]
    assert len(problems) == len(expected), problems
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), (pattern, problems)


def test_undecodable_image_raises_when_loaded(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    (cub_root / "images" / "001.Alpha_bird" / "img_2.jpg").write_bytes(b"GIF89a broken")
    dataset = build_dataset(make_cfg("cub", cub_root), "test")
    with pytest.raises(DataError, match=r"cannot decode image '.*001\.Alpha_bird/img_2\.jpg'"):
        dataset[0]
    assert dataset[1]["label"] == 0


def test_missing_root_is_a_problem(tmp_path: Path) -> None:
    report = check_dataset("cub", tmp_path / "nowhere")
    assert report["problems"] == [f"data set folder '{tmp_path / 'nowhere'}' does not exist"]
    assert report["train"] == report["test"] == report["classes"] == 0


def test_unannotated_keypoint_rows_are_invisible(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    locs = cub_root / "parts" / "part_locs.txt"
    lines = locs.read_text().splitlines()
    locs.write_text("\n".join(line for line in lines if not line.startswith("7 ")) + "\n")
    notes = load_annotations(make_cfg("cub", cub_root).data)
    assert np.all(notes.keypoints[6] == 0) and notes.keypoints[5, 0].tolist() == [10.0, 8.0, 1.0]
    assert notes.is_train.tolist() == [k < 2 for _ in range(3) for k in range(PER_CLASS)]


def test_check_reports_geometry_that_evaluation_would_reject(cub_root: Path, make_cfg: Callable[..., Config]) -> None:
    images = cub_root / "images" / "001.Alpha_bird"
    _replace_line(cub_root / "bounding_boxes.txt", 1, "1 40.0 30.0 20.0 10.0")  # to x 59, y 39 in a 48 x 36 image
    _replace_line(cub_root / "bounding_boxes.txt", 4, "4 0.0 0.0 48.0 36.0")  # the whole image: fine
    _replace_line(cub_root / "parts" / "part_locs.txt", 5, "2 2 50.0 20.0 1")  # image 2's left eye, right of it
    mask = cub_root / "segmentations" / "001.Alpha_bird" / "img_2.png"  # image 3's mask, half size
    Image.new("L", (24, 18)).save(mask)
    report = check_dataset("cub", cub_root)
    assert report["problems"] == [
        f"segmentation mask '{mask}' is 24x18 but its image '{images / 'img_2.jpg'}' is 48x36",
        f"bounding box of image '{images / 'img_0.jpg'}' (x 40, y 30, width 20, height 10) reaches outside the "
        "48x36 image",
    ]
    assert report["warnings"] == [
        f"keypoint 'left eye' of image '{images / 'img_1.jpg'}' at (50, 20) lies outside the 48x36 image"
    ]
    # Header sizes are enough: the same without decoding.
    assert check_dataset("cub", cub_root, verify_images=False)["problems"] == report["problems"]
    # What data-check reports is what evaluation stops at (image 3 is the first test image).
    with pytest.raises(DataError, match=re.escape(report["problems"][0])):
        build_dataset(make_cfg("cub", cub_root), "test", with_masks=True)[0]


def test_decompression_bombs_are_named_in_data_check_and_when_loaded(
    cub_root: Path, make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = cub_root / "images" / "001.Alpha_bird" / "img_2.jpg"  # the first test image
    write_huge_png(bomb, 20000, 10000)
    large = cub_root / "images" / "002.Beta_bird" / "img_2.jpg"
    write_huge_png(large, 10000, 10000)
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and limit < 100_000_000 < 2 * limit < 200_000_000  # PIL's default, 89478485
    bomb_message = (
        f"image '{bomb}' is too large to decode safely (Image size (200000000 pixels) exceeds limit of {2 * limit} "
        "pixels, could be decompression bomb DOS attack); shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if the "
        "file is trusted"
    )
    report = check_dataset("cub", cub_root)
    assert bomb_message in report["problems"]
    assert report["warnings"] == [
        f"image '{large}' is 10000x10000 = 100000000 pixels, more than PIL's decompression-bomb limit of {limit} "
        "(PIL.Image.MAX_IMAGE_PIXELS); decoding it takes 0.3 GiB"
    ]
    test = build_dataset(make_cfg("cub", cub_root), "test")
    with pytest.raises(DataError) as info:
        test[0]
    assert str(info.value) == bomb_message
    # Loading warns with the file's name too (a lower limit spares decoding 10^8 pixels here).
    from ivpt.data.images import LargeImageWarning

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(LargeImageWarning, match=r"image '.*001\.Alpha_bird/img_3\.jpg' is 48x36 = 1728 pixels"):
        test[1]


@pytest.mark.parametrize("dataset", ["cub", "folder"])
def test_a_file_as_root_is_named_as_such(dataset: str, tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("hi")
    message = f"data set folder '{afile}' is a file, expected a folder"
    assert check_dataset(dataset, afile)["problems"] == [message]
    with pytest.raises(DataError, match=re.escape(message)):
        load_annotations(make_cfg(dataset, afile).data)


def test_a_bad_image_in_a_worker_process_gives_the_one_line_error(
    cub_root: Path, make_cfg: Callable[..., Config]
) -> None:
    (cub_root / "images" / "001.Alpha_bird" / "img_2.jpg").write_bytes(b"GIF89a broken")
    test = build_dataset(make_cfg("cub", cub_root), "test")
    with pytest.raises(DataError) as direct:
        test[0]
    with pytest.raises(DataError) as from_worker:
        next(iter(DataLoader(test, batch_size=2, num_workers=1)))
    assert str(from_worker.value) == str(direct.value)
    assert str(direct.value).startswith("cannot decode image '") and "\n" not in str(direct.value)
