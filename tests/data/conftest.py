"""Fixtures: tiny data sets written per test (see data_layouts.py) and configs pointing at them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from data_layouts import write_folder_layout, write_part_layout

from ivpt.config import Config


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    return write_part_layout(tmp_path / "cub")


@pytest.fixture
def nabirds_root(tmp_path: Path) -> Path:
    return write_part_layout(tmp_path / "nabirds", nabirds=True)


@pytest.fixture
def folder_factory(tmp_path: Path) -> Callable[..., Path]:
    def make(counts: dict[str, int], split: bool = True, name: str = "folder") -> Path:
        return write_folder_layout(tmp_path / name, counts, split)

    return make


@pytest.fixture
def make_cfg() -> Callable[..., Config]:
    def make(dataset: str, root: Path, img_size: int = 24, **data: object) -> Config:
        cfg = Config()
        cfg.data.dataset = dataset  # type: ignore[assignment]
        cfg.data.root = str(root)
        cfg.data.augment = "none"
        cfg.model.img_size = img_size
        for key, value in data.items():
            setattr(cfg.data, key, value)
        return cfg

    return make
