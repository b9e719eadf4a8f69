"""Oracle ceilings (``ivpt eval --oracle``): what the data and the backbone permit, and what ignoring the image gives.

For a data set with ground-truth part masks (``part_masks/``, as the synthetic generator writes them), three
sets of maps are scored as if they were a model's concept maps, by :func:`ivpt.engine.evaluate.evaluate` with
its own meters and protocols (consistency and stability on the box crops, NMI / ARI and KPR on the full
images):

- ``oracle``: the true part masks, one map per part plus the background (last), each the share of every
  map cell that the part covers, at the resolution of the compared model's scored stage. With
  :func:`true_part_probe_accuracy`, its ``accuracy`` is that of a linear probe on the backbone's final tokens
  pooled over the true parts: what perfect part discovery would hand a part-based classifier.
- ``fixed_parts``: maps that ignore the image: one peak per part at the part's mean keypoint location over
  the training images (in the box crop for consistency and stability, in the full image for the rest).
- ``fixed_grid``: one peak per concept of the compared stage on a fixed grid over the frame.

The maps reach the evaluation through its ``model_input`` hook: each batch's input is replaced by the
batch's part masks, warped exactly as its images (:class:`PartMaskInput`), and the "models" below turn that
into maps. The stability protocol's noise (at most 0.25) cannot change which one-hot channel is largest, so the
oracle's and the fixed maps' stability is 100 by construction; it is scored all the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ivpt.config import Config
from ivpt.errors import DataError
from ivpt.model.output import IVPTOutput

ORACLE_ROWS = ("oracle", "fixed_parts", "fixed_grid")
ORACLE_METRICS = ("consistency", "stability", "part_discovery", "kpr")
# Width of the fixed maps' peaks, as a share of the map side (2 cells of a 16 x 16 map); the background
# wins where every peak has fallen below its value at twice that distance.
PEAK_WIDTH = 1 / 8
BACKGROUND_DISTANCE = 2.0


def part_mask_path(root: Path, image_path: Path) -> Path:
    """``part_masks/<same relative path>.png`` of an image under ``root/images``."""
    return root / "part_masks" / image_path.relative_to(root / "images").with_suffix(".png")


def require_part_masks(annotations: Any) -> None:
    """Raises :class:`DataError` unless every image of the data set has a part mask."""
    folder = annotations.root / "part_masks"
    if not folder.is_dir():
        raise DataError(
            f"the oracle needs ground-truth part masks, but '{annotations.root}' has no part_masks/ folder "
            "(the synthetic generator writes one)"
        )
    for path in annotations.image_paths:
        if not part_mask_path(annotations.root, path).is_file():
            raise DataError(f"part mask '{part_mask_path(annotations.root, path)}' of image '{path}' is missing")


class PartMaskInput:
    """The ``model_input`` of the oracle's evaluation: a batch's part masks in place of its images.

    ``__call__(batch, dataset)`` returns ``(B, P + 2, S, S)``: channels ``0..P-1`` one-hot for parts ``1..P``,
    channel ``P`` the background (last, as in concept maps), channel ``P + 1`` constant, 1 when ``dataset``
    crops the images to their boxes, 0 otherwise. Each mask is warped by its sample's own geometry plan
    (nearest-neighbour resizing), so it lines up with the image and the keypoints the meters see. With
    ``masks=False`` (for maps that ignore the image) no mask is read: ``(B, P + 2, 1, 1)``, zeros but the last.
    """

    def __init__(self, num_parts: int, masks: bool = True) -> None:
        self.num_parts = num_parts
        self.masks = masks

    def warped_ids(self, dataset: Any, index: int) -> Tensor:
        """``(S, S)`` long part ids (0 background) of sample ``index`` of ``dataset``, in its output frame."""
        from ivpt.data.transforms import warp_image

        notes = dataset.annotations
        source = int(dataset.indices[index])
        image_path = notes.image_paths[source]
        mask = Image.open(part_mask_path(notes.root, image_path))
        with Image.open(image_path) as image:
            size = image.size
        if mask.size != size:
            raise DataError(f"part mask of '{image_path}' is {mask.width}x{mask.height}, its image {size[0]}x{size[1]}")
        if notes.boxes is None:
            box = np.array([0.0, 0.0, size[0] - 1.0, size[1] - 1.0], dtype=np.float32)
        else:
            box = notes.boxes[source]
        plan = dataset.transform.plan(size[0], size[1], crop_box=box if dataset.bbox_crop else None)
        ids = np.asarray(warp_image(mask.convert("L"), plan, Image.Resampling.NEAREST), dtype=np.int64)
        if ids.max(initial=0) > self.num_parts:
            raise DataError(f"part mask of '{image_path}' holds id {ids.max()}, above the {self.num_parts} parts")
        return torch.from_numpy(ids)

    def __call__(self, batch: dict[str, Any], dataset: Any) -> Tensor:
        if not self.masks:
            inputs = torch.zeros(len(batch["index"]), self.num_parts + 2, 1, 1)
            inputs[:, -1] = float(dataset.bbox_crop)
            return inputs
        ids = torch.stack([self.warped_ids(dataset, int(index)) for index in batch["index"]])
        one_hot = F.one_hot(ids, self.num_parts + 1).permute(0, 3, 1, 2).float()  # background first
        crop = torch.full_like(one_hot[:, :1], float(dataset.bbox_crop))
        return torch.cat([one_hot[:, 1:], one_hot[:, :1], crop], dim=1)


class OracleMaps(nn.Module):
    """Concept maps ``(B, P + 1, h, w)`` (background last) from :class:`PartMaskInput`'s one-hot masks: the share
    of each map cell that each part covers. Any other input (the evaluation's probe with a blank image) gets
    uniform maps."""

    def __init__(self, num_parts: int, map_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_parts = num_parts
        self.map_size = map_size

    def forward(self, inputs: Tensor) -> IVPTOutput:
        batch, channels = inputs.shape[:2]
        if channels != self.num_parts + 2:
            maps = inputs.new_full((batch, self.num_parts + 1, *self.map_size), 1.0 / (self.num_parts + 1))
        else:
            # The stability noise moves a one-hot value by at most 0.25: the argmax is the clean part.
            ids = inputs[:, : self.num_parts + 1].argmax(dim=1)
            one_hot = F.one_hot(ids, self.num_parts + 1).permute(0, 3, 1, 2).float()
            maps = F.adaptive_avg_pool2d(one_hot, self.map_size)
        return IVPTOutput(logits=inputs.new_zeros(batch, 1), concept_maps=[maps])


def peak_maps(centres: Tensor, map_size: tuple[int, int]) -> Tensor:
    """Maps with one Gaussian peak per concept, and a background: concept ``k``'s map is ``exp(-d_k^2 / 2)``
    with ``d_k`` each cell's distance to its centre in units of :data:`PEAK_WIDTH` times the map side, the
    background the constant ``exp(-BACKGROUND_DISTANCE^2 / 2)``. Not normalised over channels, so that every
    map's peak stays at its centre however close the centres lie.

    Args:
        centres: ``(K, 2)`` ``(x, y)`` in map-cell coordinates (cell centres at integers).
        map_size: ``(h, w)``.

    Returns:
        ``(K + 1, h, w)``, background last.
    """
    height, width = map_size
    width_cells = PEAK_WIDTH * max(height, width)
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    distance2 = (xs[None] - centres[:, 0, None, None]) ** 2 + (ys[None] - centres[:, 1, None, None]) ** 2
    peaks = (-distance2 / (2 * width_cells**2)).exp()
    background = torch.full((1, height, width), math.exp(-(BACKGROUND_DISTANCE**2) / 2))
    return torch.cat([peaks, background])


def grid_centres(count: int, map_size: tuple[int, int]) -> Tensor:
    """``(count, 2)`` map-cell ``(x, y)`` of ``count`` points on a fixed grid: ``ceil(sqrt(count))`` columns,
    as many rows as needed, each point at the centre of its grid cell, filled row by row."""
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    height, width = map_size
    points = [
        ((column + 0.5) * width / columns - 0.5, (row + 0.5) * height / rows - 0.5)
        for row in range(rows)
        for column in range(columns)
    ]
    return torch.tensor(points[:count])


class FixedMaps(nn.Module):
    """Maps that ignore the image: ``full (K + 1, h, w)`` for full images, ``crop`` for box crops (told apart by
    :class:`PartMaskInput`'s last channel; the probe's blank image counts as a full image)."""

    def __init__(self, full: Tensor, crop: Tensor, num_parts: int) -> None:
        super().__init__()
        self.register_buffer("full", full)
        self.register_buffer("crop", crop)
        self.num_parts = num_parts

    def forward(self, inputs: Tensor) -> IVPTOutput:
        batch = inputs.shape[0]
        is_crop = torch.zeros(batch, dtype=torch.bool, device=inputs.device)
        if inputs.shape[1] == self.num_parts + 2:
            is_crop = inputs[:, -1].mean(dim=(1, 2)) > 0.5
        maps = torch.where(is_crop[:, None, None, None], self.crop, self.full)
        return IVPTOutput(logits=inputs.new_zeros(batch, 1), concept_maps=[maps])


def mean_keypoints(cfg: Config, annotations: Any, bbox_crop: bool) -> Tensor:
    """``(P, 2)`` mean ``(x, y)`` of each keypoint over the training images where it is visible, in the
    model-input frame of the full images or of the box crops. A keypoint never visible sits at the centre."""
    from ivpt.data import build_dataset
    from ivpt.data.transforms import transform_keypoints

    dataset = build_dataset(cfg, "train_full", train_transform=False, bbox_crop=bbox_crop, annotations=annotations)
    size = cfg.model.img_size
    total = np.zeros((len(annotations.part_names), 2))
    count = np.zeros(len(annotations.part_names))
    for source in dataset.indices:
        with Image.open(annotations.image_paths[source]) as image:
            width, height = image.size
        box = annotations.boxes[source] if annotations.boxes is not None else None
        plan = dataset.transform.plan(width, height, crop_box=box if bbox_crop else None)
        points = transform_keypoints(annotations.keypoints[source], plan.matrix, size)
        visible = points[:, 2] > 0.5
        total[visible] += points[visible, :2]
        count[visible] += 1
    centre = (size - 1) / 2.0
    means = np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], centre)
    return torch.from_numpy(means).float()


def to_map_cells(points: Tensor, input_size: int, map_size: tuple[int, int]) -> Tensor:
    """``(..., 2)`` input-pixel ``(x, y)`` -> map-cell coordinates, pixel centres at integers in both."""
    scale = torch.tensor([map_size[1] / input_size, map_size[0] / input_size])
    return (points + 0.5) * scale - 0.5


def oracle_models(
    cfg: Config, annotations: Any, num_concepts: int, map_size: tuple[int, int]
) -> dict[str, nn.Module]:
    """The "models" of :data:`ORACLE_ROWS` for a data set (``num_concepts``: foreground concepts of the compared
    stage, the fixed grid's peaks)."""
    num_parts = len(annotations.part_names)
    size = cfg.model.img_size
    fixed = {
        crop: peak_maps(to_map_cells(mean_keypoints(cfg, annotations, crop), size, map_size), map_size)
        for crop in (False, True)
    }
    grid = peak_maps(grid_centres(num_concepts, map_size), map_size)
    return {
        "oracle": OracleMaps(num_parts, map_size),
        "fixed_parts": FixedMaps(fixed[False], fixed[True], num_parts),
        "fixed_grid": FixedMaps(grid, grid, num_parts),
    }


@torch.no_grad()
def true_part_probe_accuracy(backbone: nn.Module, cfg: Config, annotations: Any, device: torch.device) -> float:
    """Test accuracy (%) of a linear probe on the backbone's final patch tokens pooled over each true part.

    Every image of the training and the test split (the test transform, full images) goes through
    ``backbone.forward_features``; each part's tokens are averaged weighted by the share of their cell the part
    covers, the P averages concatenated, standardised and fed to a logistic regression fit on the training split.
    """
    from ivpt.data import build_dataset

    num_parts = len(annotations.part_names)
    masks = PartMaskInput(num_parts)
    was_training = backbone.training
    backbone.eval()
    features, labels = {}, {}
    for split in ("train_full", "test"):
        dataset = build_dataset(cfg, split, train_transform=False, annotations=annotations)
        rows, classes = [], []
        for first in range(0, len(dataset), cfg.eval.batch_size):
            samples = [dataset[i] for i in range(first, min(first + cfg.eval.batch_size, len(dataset)))]
            images = dataset.transform.normalize(torch.stack([sample["image"] for sample in samples]).to(device))
            tokens = backbone.forward_features(images)[:, backbone.num_prefix_tokens :].float().cpu()
            grid = int(round(math.sqrt(tokens.shape[1])))
            ids = torch.stack([masks.warped_ids(dataset, sample["index"]) for sample in samples])
            one_hot = F.one_hot(ids, num_parts + 1).permute(0, 3, 1, 2).float()
            shares = F.adaptive_avg_pool2d(one_hot, grid).flatten(2).transpose(1, 2)  # (B, n, P + 1), bg first
            rows.append(part_pooled_features(tokens, shares))
            classes += [sample["label"] for sample in samples]
        features[split], labels[split] = torch.cat(rows), torch.tensor(classes)
    backbone.train(was_training)
    points = torch.cat([features["train_full"], features["test"]])
    is_train = torch.cat([torch.ones(len(labels["train_full"])), torch.zeros(len(labels["test"]))]).bool()
    return probe_accuracy(points, torch.cat([labels["train_full"], labels["test"]]), is_train)


def part_pooled_features(tokens: Tensor, shares: Tensor) -> Tensor:
    """Tokens averaged over each true part, weighted by the part's share of each token.

    Args:
        tokens: ``(N, n, D)``.
        shares: ``(N, n, P + 1)`` part shares under each token (column 0: background).

    Returns:
        ``(N, P * D)``: the P foreground parts' mean tokens side by side (zeros for a part not in the image).
    """
    weights = shares[..., 1:] / shares[..., 1:].sum(dim=1, keepdim=True).clamp_min(1e-6)
    return torch.einsum("bnp,bnd->bpd", weights, tokens).flatten(1)


def probe_accuracy(features: Tensor, labels: Tensor, is_train: Tensor) -> float:
    """Test accuracy (%) of a logistic-regression probe fit on the training rows of ``features (N, D)``.

    Features are standardised with the training rows' statistics first.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, test = is_train.numpy().astype(bool), ~is_train.numpy().astype(bool)
    points, classes = features.double().numpy(), labels.numpy()
    scaler = StandardScaler().fit(points[train])
    probe = LogisticRegression(max_iter=3000).fit(scaler.transform(points[train]), classes[train])
    return 100.0 * float(probe.score(scaler.transform(points[test]), classes[test]))


def evaluate_oracles(
    cfg: Config,
    *,
    num_concepts: int,
    map_size: tuple[int, int],
    device: torch.device | str = "cpu",
    backbone: nn.Module | None = None,
) -> dict[str, dict[str, Any]]:
    """Score the :data:`ORACLE_ROWS` on the test split of ``cfg``'s data set (see the module docstring).

    Args:
        cfg: the compared run's config (its data set, input size and ``eval`` protocol settings).
        num_concepts: foreground concepts of the compared model's scored stage (the fixed grid's peaks).
        map_size: ``(h, w)`` of the compared model's maps.
        device: where the evaluation runs.
        backbone: a timm ViT; when given, the oracle row's ``accuracy`` is :func:`true_part_probe_accuracy`.

    Returns:
        Row name -> the results of :func:`ivpt.engine.evaluate.evaluate` (``accuracy`` ``None`` except the
        oracle's with a backbone).

    Raises:
        DataError: the data set has no part masks, or a mask does not match its image.
    """
    from ivpt.data import load_annotations
    from ivpt.engine.evaluate import evaluate

    device = torch.device(device)
    annotations = load_annotations(cfg.data)
    require_part_masks(annotations)
    # One stage of maps: score it without a clamping note.
    single_stage = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, stage=-1))
    rows: dict[str, dict[str, Any]] = {}
    for name, model in oracle_models(single_stage, annotations, num_concepts, map_size).items():
        # The fixed maps read nothing but which frame they are in.
        source = PartMaskInput(len(annotations.part_names), masks=name == "oracle")
        rows[name] = evaluate(model.to(device), single_stage, ORACLE_METRICS, device, model_input=source)
    if backbone is not None:
        rows["oracle"]["accuracy"] = true_part_probe_accuracy(backbone, single_stage, annotations, device)
    return rows


def scored_stage_shape(model: nn.Module, cfg: Config, device: torch.device) -> tuple[int, tuple[int, int]]:
    """``(foreground concepts, (h, w))`` of the stage a model's headline part metrics score (``eval.stage``).

    Raises:
        IVPTError: the model has no concept maps.
    """
    from ivpt.engine.evaluate import headline_stage
    from ivpt.errors import IVPTError

    size = cfg.model.img_size
    was_training = model.training
    model.eval()
    with torch.no_grad():
        maps = model(torch.zeros(1, 3, size, size, device=device)).concept_maps
    model.train(was_training)
    if not maps:
        raise IVPTError(f"oracle: method '{cfg.model.method}' has no concept maps to compare the oracle rows with")
    stage, _ = headline_stage(cfg.eval.stage, len(maps))
    return maps[stage].shape[1] - 1, (int(maps[stage].shape[-2]), int(maps[stage].shape[-1]))


ORACLE_COLUMNS = ("accuracy", "consistency", "stability", "nmi", "ari", "kpr")


def text_table(rows: dict[str, dict[str, Any]], columns: Sequence[str], label: str, width: int) -> list[str]:
    """Rows of numbers as fixed-width text lines (header, rule, one line a row), ``-`` where a value is missing."""
    header = f"{label:<14}" + "".join(f"{key:>{width}}" for key in columns)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        cells = "".join(f"{'-' if row.get(k) is None else format(row[k], '.1f'):>{width}}" for k in columns)
        lines.append(f"{name:<14}{cells}")
    return lines


def format_oracle_table(rows: dict[str, dict[str, Any]]) -> str:
    """The oracle rows as text, ``-`` where a value does not apply."""
    return "\n".join(text_table(rows, ORACLE_COLUMNS, "row", 13))


def checkpoint_oracle_rows(checkpoint: str | Path, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The :data:`ORACLE_ROWS` for a checkpoint: its data set and protocol settings, the shape of its scored stage,
    the oracle's accuracy from its backbone (:func:`evaluate_oracles`, on the CPU).

    Args:
        checkpoint: a checkpoint of a method with concept maps.
        overrides: ``key=value`` changes to its stored config (``data.root=...``, ``eval.stage=...``).
    """
    from ivpt.model.pretrained import load_checkpoint

    model, cfg, _ = load_checkpoint(checkpoint, overrides, device="cpu")
    device = torch.device("cpu")
    num_concepts, map_size = scored_stage_shape(model, cfg, device)
    return evaluate_oracles(cfg, num_concepts=num_concepts, map_size=map_size, device=device, backbone=model.backbone)


def evaluate_checkpoint_oracles(
    checkpoint: str | Path, overrides: Sequence[str] = (), out_dir: str | Path | None = None
) -> dict[str, dict[str, Any]]:
    """``ivpt eval --oracle``: :func:`checkpoint_oracle_rows`, printed as a table and written to ``oracle.json``
    in ``out_dir`` (default: the checkpoint's folder, or the exported folder)."""
    import json

    from ivpt.errors import ConfigError
    from ivpt.model.pretrained import checkpoint_home
    from ivpt.outputs import prepare_output_dir, write_text

    home = checkpoint_home(checkpoint)
    if out_dir is None and home is None:
        raise ConfigError(f"eval --oracle: '{checkpoint}' has no folder of its own for oracle.json; give --out DIR")
    # The folder is checked before the work, and the table printed before the file is written: a bad --out
    # loses nothing.
    target = prepare_output_dir(out_dir if out_dir is not None else home)
    rows = checkpoint_oracle_rows(checkpoint, overrides)
    print(format_oracle_table(rows))
    write_text(target / "oracle.json", json.dumps(rows, indent=2) + "\n")
    print(f"wrote {target / 'oracle.json'}")
    return rows


__all__ = [
    "ORACLE_COLUMNS",
    "ORACLE_METRICS",
    "ORACLE_ROWS",
    "FixedMaps",
    "OracleMaps",
    "PartMaskInput",
    "checkpoint_oracle_rows",
    "evaluate_checkpoint_oracles",
    "evaluate_oracles",
    "format_oracle_table",
    "grid_centres",
    "mean_keypoints",
    "oracle_models",
    "part_mask_path",
    "part_pooled_features",
    "peak_maps",
    "probe_accuracy",
    "scored_stage_shape",
    "true_part_probe_accuracy",
]
