"""``ivpt pretrain-backbone``: train the demo ViT from scratch on a *different* synthetic task.

The demo adapts a frozen backbone to a new fine-grained task, as the paper adapts DINOv2 to birds. The
backbone must therefore know images of this kind without knowing the task: it is trained on the
``"pretrain"`` family of the synthetic generator, whose classes are defined by the breast pattern, tail
shape and tail colour, while the demo's classes are defined by head colour, wing pattern and beak shape.

Recipe (everything derives from ``seed``, so the same command writes the same file on the same
software and thread count): 100 classes x 50 images of 64 px, the training half (2500 images), random
horizontal flips; 50 epochs of AdamW (lr 1e-3, weight decay 0.05), batch 64, 2 warm-up epochs then cosine
decay, label smoothing 0.1.

Three supervised signals train together, all from the pretraining family's own annotations:

- the class's three *attributes* (5 breast patterns, 4 tail shapes, 5 tail colours), one softmax each,
  from the CLS token (keeps the CLS token meaningful for the CLS-head baselines);
- the same attributes from the mean of the patch tokens (every patch token carries evidence about its
  own region, which is what the prototypes of IVPT read);
- per patch token, the share of each part (and of the background) under that patch, from the
  generator's part masks (soft-target cross-entropy).

The dense part signal stands in for what makes DINOv2's patch features part-aware at scale: classification
alone, from scratch on 2500 cluttered images, stays at chance for hundreds of steps. It uses part masks of
the *pretraining* images only; the demo task's part annotations are never seen, and the part metrics of
the demo measure whether prototypes trained without any part label find the parts in these features.
The reported accuracy is the class accuracy of the CLS attribute classifiers (all three attributes
right) on the held-out half. Only the backbone is saved (safetensors, no classifier), with the recipe and
that accuracy in the file's metadata.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ivpt.config import Config
from ivpt.data.annotations import Annotations
from ivpt.demo.backbone import DEMO_ARCH, DEMO_VIT_ARGS
from ivpt.demo.data import ensure_synthetic
from ivpt.errors import IVPTError

PRETRAIN_CLASSES = 100
PRETRAIN_PER_CLASS = 50
PRETRAIN_EPOCHS = 50
PRETRAIN_BATCH = 64
PRETRAIN_LR = 1e-3
PRETRAIN_WEIGHT_DECAY = 0.05
PRETRAIN_WARMUP_EPOCHS = 2.0
LABEL_SMOOTHING = 0.1
# Keeps the pretraining images apart from every demo image even when both use seed 0.
_DATA_SEED_OFFSET = 1000


def attribute_targets(family: str, num_classes: int) -> tuple[Tensor, tuple[int, ...]]:
    """Attribute value of every class of a synthetic family.

    Returns:
        ``(targets, sizes)``: ``targets (C, A)`` the index of class ``c``'s value on attribute axis ``a``
        (axes and values in the order of :data:`ivpt.data.synthetic.FAMILIES`), and the number of values
        of each axis.
    """
    from ivpt.data.synthetic import FAMILIES, class_definitions

    axes = FAMILIES[family].axes
    value_index = {axis: {name: i for i, name in enumerate(values)} for axis, values in axes.items()}
    rows = [[value_index[axis][chosen[axis]] for axis in axes] for _, chosen in class_definitions(family, num_classes)]
    return torch.tensor(rows, dtype=torch.long), tuple(len(values) for values in axes.values())


class _PretrainSamples(Dataset):
    """Images of one split with the part share under every patch, randomly flipped when training.

    ``dataset[i]`` is a dict: ``image (3, S, S)`` normalised, ``label`` int, ``parts (h*w, P + 1)`` the
    fraction of the patch's pixels showing each part (column 0: background), rows in raster order like
    the ViT's patch tokens. The flip draws from torch's global generator, which
    :class:`ivpt.engine.rng.SeededSamples` seeds per sample.
    """

    def __init__(self, annotations: Annotations, indices: np.ndarray, patch_size: int, flip: bool) -> None:
        self.annotations = annotations
        self.indices = indices
        self.patch_size = patch_size
        self.flip = flip
        self.num_parts = len(annotations.part_names)
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from ivpt.data.images import open_image

        position = int(self.indices[index])
        image_path = self.annotations.image_paths[position]
        relative = image_path.relative_to(self.annotations.root / "images").with_suffix(".png")
        part_path = self.annotations.root / "part_masks" / relative
        image = torch.from_numpy(np.asarray(open_image(image_path), dtype=np.float32) / 255.0).permute(2, 0, 1)
        part_ids = torch.from_numpy(np.asarray(open_image(part_path, "L", "part mask"), dtype=np.int64))
        if self.flip and bool(torch.rand(()) < 0.5):
            image, part_ids = image.flip(-1), part_ids.flip(-1)
        shares = F.one_hot(part_ids, self.num_parts + 1).permute(2, 0, 1).float()  # (P + 1, S, S)
        shares = F.avg_pool2d(shares, self.patch_size)  # (P + 1, h, w)
        return {
            "image": (image - self.mean) / self.std,
            "label": int(self.annotations.labels[position]),
            "parts": shares.flatten(1).transpose(0, 1),
        }


class _PretrainModel(nn.Module):
    """The demo ViT with the three pretraining heads (see the module docstring).

    ``forward(images (B, 3, S, S))`` returns ``(cls_logits, patch_logits, part_logits)``: two lists of
    ``(B, V_a)`` attribute logits, one per attribute axis ``a`` with ``V_a`` values, and the per-patch
    part logits ``(B, h*w, P + 1)``.
    """

    def __init__(self, backbone: nn.Module, sizes: tuple[int, ...], num_parts: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.sizes = sizes
        self.cls_head = nn.Linear(backbone.embed_dim, sum(sizes))
        self.patch_head = nn.Linear(backbone.embed_dim, sum(sizes))
        self.part_head = nn.Linear(backbone.embed_dim, num_parts + 1)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        tokens = self.backbone.forward_features(images)  # (B, P + h*w, D), final norm applied
        patches = tokens[:, self.backbone.num_prefix_tokens :]
        cls_logits = self.cls_head(tokens[:, 0]).split(self.sizes, dim=1)
        patch_logits = self.patch_head(patches.mean(dim=1)).split(self.sizes, dim=1)
        return list(cls_logits), list(patch_logits), self.part_head(patches)


def _loss(model: _PretrainModel, batch: dict[str, Tensor], targets: Tensor) -> Tensor:
    cls_logits, patch_logits, part_logits = model(batch["image"])
    wanted = targets[batch["label"]]  # (B, A)
    attribute_loss = sum(
        F.cross_entropy(logits, wanted[:, axis], label_smoothing=LABEL_SMOOTHING)
        for head in (cls_logits, patch_logits)
        for axis, logits in enumerate(head)
    )
    part_loss = F.cross_entropy(part_logits.flatten(0, 1), batch["parts"].flatten(0, 1))
    return attribute_loss + part_loss


@torch.no_grad()
def _test_accuracy(model: _PretrainModel, loader: DataLoader, targets: Tensor) -> float:
    """Class accuracy (%) of the CLS classifiers: every attribute of the image's class predicted."""
    model.eval()
    correct = total = 0
    for batch in loader:
        cls_logits, _, _ = model(batch["image"])
        predicted = torch.stack([logits.argmax(dim=1) for logits in cls_logits], dim=1)  # (B, A)
        correct += int((predicted == targets[batch["label"]]).all(dim=1).sum())
        total += int(batch["label"].numel())
    return 100.0 * correct / max(total, 1)


def pretrain_backbone(
    out: str | Path,
    seed: int = 0,
    epochs: int | None = None,
    *,
    data_dir: str | Path | None = None,
    num_classes: int = PRETRAIN_CLASSES,
    per_class: int = PRETRAIN_PER_CLASS,
    batch_size: int = PRETRAIN_BATCH,
    progress: bool = True,
) -> Path:
    """Train ``ivpt_demo_vit`` on the ``"pretrain"`` synthetic family and save its backbone weights.

    Args:
        out: output ``.safetensors`` file (the shipped one is ``src/ivpt/assets/ivpt_demo_vit.safetensors``).
        seed: seed of the images, the initialisation, the data order and the augmentation.
        epochs: passes over the training images (default :data:`PRETRAIN_EPOCHS`).
        data_dir: where the pretraining images are generated and kept for reuse (default: a temporary
            folder deleted afterwards).
        num_classes: classes of the pretraining task (at most 100, the family's attribute combinations).
        per_class: images per class, half of them for training.
        batch_size: training batch size.
        progress: show progress bars and per-epoch lines.

    Returns:
        The path of the written file.

    Raises:
        IVPTError: ``out`` does not end in ``.safetensors`` or ``epochs`` is below 1.
    """
    import timm

    from ivpt.data import load_annotations
    from ivpt.engine.rng import EpochSampler, SeededSamples, seed_everything
    from ivpt.engine.schedule import build_scheduler

    out = Path(out)
    if out.suffix != ".safetensors":
        raise IVPTError(f"pretrain-backbone: output '{out}' must be a .safetensors file")
    epochs = PRETRAIN_EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise IVPTError(f"pretrain-backbone: --epochs must be at least 1, got {epochs}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ivpt-pretrain-") as scratch:
        root = Path(data_dir) if data_dir is not None else Path(scratch) / "data"
        if progress:
            print(f"pretrain-backbone: synthetic 'pretrain' family, {num_classes} classes x {per_class} images")
        ensure_synthetic(
            root,
            num_classes=num_classes,
            per_class=per_class,
            size=int(DEMO_VIT_ARGS["img_size"]),
            seed=seed + _DATA_SEED_OFFSET,
            family="pretrain",
        )
        cfg = Config()
        cfg.data.dataset, cfg.data.root = "cub", str(root)
        annotations = load_annotations(cfg.data)
        patch_size = int(DEMO_VIT_ARGS["patch_size"])
        train_set = _PretrainSamples(annotations, np.flatnonzero(annotations.is_train), patch_size, flip=True)
        test_set = _PretrainSamples(annotations, np.flatnonzero(~annotations.is_train), patch_size, flip=False)

        seed_everything(seed)
        backbone = timm.create_model(DEMO_ARCH, pretrained=False, num_classes=0)
        targets, sizes = attribute_targets("pretrain", num_classes)
        model = _PretrainModel(backbone, sizes, len(annotations.part_names))
        optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=PRETRAIN_WEIGHT_DECAY)
        cfg.optim.scheduler = "cosine"
        cfg.optim.warmup_epochs = PRETRAIN_WARMUP_EPOCHS
        steps_per_epoch = len(train_set) // batch_size
        if steps_per_epoch < 1:
            raise IVPTError(
                f"pretrain-backbone: {len(train_set)} training images are fewer than one batch of {batch_size}"
            )
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, epochs)
        sampler = EpochSampler(len(train_set), seed)
        loader = DataLoader(
            SeededSamples(train_set, seed), batch_size=batch_size, sampler=sampler, drop_last=True
        )
        test_loader = DataLoader(test_set, batch_size=256)

        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            model.train()
            total_loss = 0.0
            for batch in tqdm(loader, desc=f"pretrain {epoch + 1}/{epochs}", disable=not progress, leave=False):
                loss = _loss(model, batch, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach())
            if progress:
                mean_loss = total_loss / steps_per_epoch
                print(f"pretrain-backbone: epoch {epoch + 1}/{epochs} loss {mean_loss:.3f}", flush=True)
        accuracy = _test_accuracy(model, test_loader, targets)

    recipe: dict[str, Any] = dict(
        seed=seed,
        epochs=epochs,
        num_classes=num_classes,
        per_class=per_class,
        batch_size=batch_size,
        train_images=len(train_set),
        test_images=len(test_set),
        test_accuracy=round(accuracy, 2),
        minutes=round((time.perf_counter() - started) / 60.0, 1),
        command=f"ivpt pretrain-backbone --out {shlex.quote(str(out))} --seed {seed} --epochs {epochs}",
    )
    _save_backbone(backbone, out, recipe)
    if progress:
        print(f"pretrain-backbone: test accuracy {accuracy:.2f}% on {len(test_set)} held-out images")
    return out


def _save_backbone(backbone: nn.Module, out: Path, recipe: dict[str, Any]) -> None:
    """Write the backbone (no classifier) atomically, with ``recipe`` as JSON in the file's metadata."""
    tensors = {name: value.detach().contiguous() for name, value in backbone.state_dict().items()}
    tensors = {name: value for name, value in tensors.items() if not name.startswith("head.")}
    metadata = {"arch": DEMO_ARCH, "arch_args": json.dumps(DEMO_VIT_ARGS), "recipe": json.dumps(recipe)}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, out)


def weight_file_recipe(path: str | Path) -> dict[str, Any]:
    """The pretraining recipe stored in a weight file written by :func:`pretrain_backbone`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "recipe" not in metadata:
        raise IVPTError(f"weight file '{path}' has no pretraining recipe in its metadata")
    return json.loads(metadata["recipe"])


__all__ = ["PRETRAIN_EPOCHS", "pretrain_backbone", "weight_file_recipe"]
