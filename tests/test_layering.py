"""The package's dependency order (docs/ARCHITECTURE.md): each part imports only the parts below it.

Every import statement of every module under ``src/ivpt`` counts, including the lazy ones inside
functions and those under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ivpt"

# Bottom to top; a part may import the parts of lower levels, never one of its own level or above.
LEVELS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("outputs",),
    ("config",),
    ("checkpoint",),
    ("model",),
    ("data",),
    ("losses", "metrics"),
    ("viz",),
    ("engine",),
    ("demo", "bench", "app"),
    ("cli",),
    ("__main__",),
)
LEVEL_OF = {part: level for level, parts in enumerate(LEVELS) for part in parts}
# The package root only re-exports lazily (and holds __version__): importing it pulls in nothing.
ROOT = "ivpt"


def part_of(module: Path) -> str:
    """``src/ivpt/model/ivpt.py`` -> ``model``; ``src/ivpt/config.py`` -> ``config``."""
    relative = module.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(source: str, own: str) -> set[str]:
    """The parts of ivpt that a module's source imports anywhere in it (``own``: its part, for relative imports)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.append(f"ivpt.{own}")
            elif node.module == ROOT:
                names += [f"ivpt.{alias.name}" for alias in node.names]
            elif node.module:
                names.append(node.module)
    return {name.split(".")[1] for name in names if name.startswith("ivpt.")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_part_has_a_level() -> None:
    assert {part_of(m) for m in MODULES} <= set(LEVEL_OF), "add the new part to LEVELS and docs/ARCHITECTURE.md"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_levels(module: Path) -> None:
    own = part_of(module)
    found = imported_parts(module.read_text(), own) - {own, "__version__"}
    wrong = sorted(part for part in found if LEVEL_OF.get(part, len(LEVELS)) >= LEVEL_OF[own])
    assert not wrong, f"{module.relative_to(PACKAGE)} ({own}) imports {wrong}, which are not below it"


def test_the_check_sees_lazy_and_type_checking_imports() -> None:
    source = (
        "import torch\n"
        "from typing import TYPE_CHECKING\n"
        "from ivpt.config import Config\n"
        "if TYPE_CHECKING:\n    from ivpt.engine.trainer import Trainer\n"
        "def f():\n    import ivpt.viz.report\n    from ivpt import demo, __version__\n"
        "    from .state import x\n"
    )
    assert imported_parts(source, "model") == {"config", "engine", "viz", "demo", "__version__", "model"}


# --- one source for the options ------------------------------------------------------------------------


def test_choices_and_keywords_come_from_the_config_dataclasses() -> None:
    import dataclasses
    import typing

    from ivpt.cli import build_parser
    from ivpt.config import DATASETS, METHODS, PRECISIONS, DataConfig, ModelConfig, TrainConfig
    from ivpt.errors import ConfigError
    from ivpt.model import create_model
    from ivpt.model.factory import OPTION_NAMES

    hints = {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(DataConfig)}
    assert typing.get_args(hints["method"]) == METHODS
    assert typing.get_args(hints["dataset"]) == DATASETS
    assert typing.get_args(typing.get_type_hints(TrainConfig)["precision"]) == PRECISIONS
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    bench = {a.dest: a.choices for a in subcommands["bench"]._actions}
    assert tuple(bench["method"]) == METHODS and tuple(bench["precision"]) == PRECISIONS
    assert tuple(next(a for a in subcommands["data-check"]._actions if a.dest == "dataset").choices) == DATASETS

    positional = ("arch", "img_size", "n_pro", "pretrained")
    assert set(OPTION_NAMES) | set(positional) == {f.name for f in dataclasses.fields(ModelConfig)}
    tiny = dict(patch_size=8, depth=3, embed_dim=32, num_heads=2)
    model = create_model("vit_tiny_patch16_224", 3, 32, (4, 3), backbone_args=tiny, pooling="soft")
    assert model.model_config == ModelConfig(
        arch="vit_tiny_patch16_224", img_size=32, n_pro=(4, 3), pretrained=False, backbone_args=tiny, pooling="soft"
    )
    with pytest.raises(ConfigError, match="create_model: unknown option.* pools; the options are the fields"):
        create_model("vit_tiny_patch16_224", 3, 32, (4, 3), pools="soft")
    with pytest.raises(ConfigError, match="config key 'model.spatial_bias': expected bool, got 'yes'"):
        create_model("vit_tiny_patch16_224", 3, 32, (4, 3), backbone_args=tiny, spatial_bias="yes")
