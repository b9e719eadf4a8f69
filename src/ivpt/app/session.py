"""What ``ivpt app`` shows, without the web page: a loaded model, its test images, explanations under an
intervention, and each concept's most typical crops over the test set.

Nothing here imports gradio; :mod:`ivpt.app.ui` draws these results in the browser.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ivpt.config import Config
from ivpt.errors import IVPTError
from ivpt.viz.concept_stats import ConceptStatistics, concept_feeds
from ivpt.viz.drawing import concept_label
from ivpt.viz.explain import ImageInput, default_device, explain
from ivpt.viz.palette import concept_palette


@dataclass
class LoadedModel:
    """A trained model ready to explain.

    Attributes:
        model: in eval mode, on its device.
        cfg: its resolved config.
        class_names: one name per class.
        source: the checkpoint file, exported folder or Hub id it came from.
        device: where it runs.
    """

    model: nn.Module
    cfg: Config
    class_names: list[str]
    source: str
    device: str


def load_model(path: str | Path, overrides: Sequence[str] = (), device: str | None = None) -> LoadedModel:
    """Load a model from a checkpoint file (``ivpt train``), an exported model folder (``ivpt export``) or
    an ``hf-hub:`` id (:func:`ivpt.model.pretrained.load_checkpoint` tells them apart).

    Raises:
        CheckpointError: the path does not exist, or is not a model ivpt can read; the message names it.
    """
    from ivpt.model.pretrained import load_checkpoint

    device = device or default_device()
    model, cfg, info = load_checkpoint(path, overrides, device)
    return LoadedModel(model, cfg, list(info["class_names"]), str(path), str(device))


def concept_names(n_pro: Sequence[int]) -> list[list[str]]:
    """Per stage, the label of each concept as every figure writes it (``s1:c5``, ``part 2``, ``bg``)."""
    return [
        [concept_label(stage, k, len(n_pro)) for k in range(count - 1)] + ["background"]
        for stage, count in enumerate(n_pro)
    ]


class ExplorerSession:
    """One model and (optionally) its test split, as the app explores them.

    Args:
        loaded: the model (:func:`load_model`).
        data_root: the data set's folder; ``None``: the one stored in the model's config, when it exists
            (otherwise the app works on uploaded images only).
        top_k: typical crops kept per concept for the galleries.
        progress: show a progress bar while the gallery statistics are gathered.

    Raises:
        IVPTError: ``data_root`` is not a data set that fits the model (wrong class count, unreadable).
    """

    def __init__(
        self, loaded: LoadedModel, data_root: str | Path | None = None, *, top_k: int = 6, progress: bool = True
    ) -> None:
        from ivpt.data import build_dataset

        if top_k < 1:
            raise IVPTError(f"app: --top-k must be at least 1, got {top_k}")
        self.loaded = loaded
        self.top_k = top_k
        self.progress = progress
        # The session's own copy: pointing it at another data folder leaves the loaded model's config alone.
        self.cfg = copy.deepcopy(loaded.cfg)
        self.n_pro: tuple[int, ...] = tuple(getattr(loaded.model, "n_pro", ()))
        self.concept_names = concept_names(self.n_pro)
        self.palette = concept_palette(list(self.n_pro)) if self.n_pro else []
        self.dataset: Any = None
        self.data_note = ""
        stored_root = self.cfg.data.root
        if data_root is None and not (stored_root and Path(stored_root).is_dir()):
            self.data_note = (
                f"the model's data set folder '{stored_root}' is not here (pass --data ROOT): upload images instead"
            )
        else:
            if data_root is not None:
                self.cfg.data.root = str(data_root)
            self.dataset = build_dataset(self.cfg, "test", train_transform=False)
            if self.dataset.num_classes != len(loaded.class_names):
                raise IVPTError(
                    f"app: the model classifies {len(loaded.class_names)} classes but the data set at "
                    f"'{self.cfg.data.root}' has {self.dataset.num_classes}; pass the model's own data with --data"
                )
        self._statistics: ConceptStatistics | None = None
        self._strips: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def num_test_images(self) -> int:
        return 0 if self.dataset is None else len(self.dataset)

    def test_image_choices(self) -> list[tuple[str, int]]:
        """``(label, position)`` of every test image: ``"12: 003.Blue_head (img_0042.png)"``."""
        if self.dataset is None:
            return []
        labels = self.dataset.labels
        return [
            (f"{i}: {self.dataset.class_names[labels[i]]} ({self.dataset.image_path(i).name})", i)
            for i in range(len(self.dataset))
        ]

    def test_image(self, position: int) -> torch.Tensor:
        """The test image at ``position``, through the test transform: ``(3, S, S)`` ``uint8`` (not normalised)."""
        if self.dataset is None:
            raise IVPTError(f"app: no test set is loaded ({self.data_note})")
        if not 0 <= position < len(self.dataset):
            raise IVPTError(f"app: test image {position} does not exist; there are {len(self.dataset)}")
        return self.dataset[position]["image"]

    def explain(self, image: ImageInput, disable: Mapping[str, Iterable[int]] | None = None) -> dict[str, Any]:
        """:func:`ivpt.viz.explain.explain` of one image with this model, its classes and config."""
        loaded = self.loaded
        return explain(
            loaded.model, image, cfg=self.cfg, class_names=loaded.class_names, device=loaded.device, disable=disable
        )

    def statistics(self) -> ConceptStatistics:
        """The report's concept statistics over the test split, gathered on first use (one pass)."""
        from ivpt.viz.report import collect_statistics

        with self._lock:
            if self._statistics is None:
                if self.dataset is None:
                    raise IVPTError(f"app: concept galleries need the test set ({self.data_note})")
                loader = DataLoader(self.dataset, batch_size=self.cfg.eval.batch_size, shuffle=False, num_workers=0)
                self._statistics = collect_statistics(
                    self.loaded.model,
                    loader,
                    len(self.loaded.class_names),
                    self.top_k,
                    self.loaded.device,
                    progress=self.progress,
                )
            return self._statistics

    def gallery(self, stage: int, concept: int) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The most typical test crops of one concept (as in ``ivpt report``) and what is known of it.

        Args:
            stage: 0-based stage.
            concept: 0-based concept of that stage (the last one is the background).

        Returns:
            ``(strip, facts)``: a ``(T, width, 3)`` uint8 row of crops (``None`` when the concept never
            has a candidate image) and ``{"label", "mean_area", "presence", "feeds": [(label, weight)]}``
            (``feeds``: the concepts it groups into with mean weight >= 0.1, strongest first).
        """
        from ivpt.viz.report import gallery_strips

        if not 0 <= stage < len(self.n_pro) or not 0 <= concept < self.n_pro[stage]:
            raise IVPTError(f"app: concept {concept} of stage {stage + 1} does not exist (prototypes {self.n_pro})")
        stats = self.statistics()
        with self._lock:
            if not self._strips:
                self._strips = gallery_strips(stats, self.dataset, self.cfg, self.palette)
        targets = self.concept_names[stats.fusion_targets[stage]] if stage < len(stats.fusion_targets) else []
        feeds = [(targets[t], weight) for t, weight in concept_feeds(stats, stage, concept)]
        facts = {
            "label": self.concept_names[stage][concept],
            "mean_area": float(stats.mean_area[stage][concept]),
            "presence": float(stats.presence[stage][concept]),
            "feeds": feeds,
        }
        return self._strips.get((stage, concept)), facts


__all__ = ["ExplorerSession", "LoadedModel", "concept_names", "load_model"]
