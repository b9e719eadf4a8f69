"""The one configuration source: typed dataclasses filled from defaults <- YAML <- ``key=value``.

>>> cfg = load_config("synthetic_tiny", ["train.epochs=3", "model.n_pro=[6,5]"])  # a preset by name, or a path
>>> cfg.train.epochs
3

Every field is typed; values coming from YAML or the command line are checked against the type and,
for ``Literal`` fields, against the allowed values. Unknown keys are errors that list the known ones.
The resolved config is written beside each run's outputs (``config.yaml``) and stored in checkpoints
(``Config.to_dict()``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ivpt.errors import ConfigError
from ivpt.outputs import write_text

# The choices of the model options: the config fields below, ``ivpt.create_model``'s keywords and the
# command line's ``choices`` all read them from here.
Method = Literal["ivpt", "vpt_shallow", "vpt_deep", "vpt_deep_proto", "last_layer_proto", "linear_probe"]
FreezeMode = Literal["tokens", "frozen", "full"]
Pooling = Literal["ifa", "soft"]
FusionTarget = Literal["final", "chain"]
Augment = Literal["paper", "flip", "none"]
Dataset = Literal["cub", "nabirds", "folder"]
Precision = Literal["fp32", "bf16", "fp16"]
PrototypeInit = Literal["random", "data"]
METHODS: tuple[str, ...] = get_args(Method)
FREEZE_MODES: tuple[str, ...] = get_args(FreezeMode)
POOLINGS: tuple[str, ...] = get_args(Pooling)
FUSION_TARGETS: tuple[str, ...] = get_args(FusionTarget)
AUGMENTS: tuple[str, ...] = get_args(Augment)
DATASETS: tuple[str, ...] = get_args(Dataset)
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Methods built as IVPT itself, whose model has concept-prototype stages (``last_layer_proto``: only the last).
IVPT_METHODS: tuple[str, ...] = ("ivpt", "last_layer_proto")


@dataclass
class ModelConfig:
    """What network is built. See ``ivpt.create_model`` for the meaning of each switch."""

    method: Method = "ivpt"
    arch: str = "vit_base_patch14_reg4_dinov2.lvd142m"
    # Input side in pixels; unset (null): the backbone's timm pretrained_cfg input size.
    img_size: int | None = None
    # Prototypes per stage, shallow to deep; the last count of each stage includes the background.
    n_pro: tuple[int, ...] = (17, 14, 11, 8, 5)
    pretrained: bool = True
    # Local weight file for timm's loader (passed as pretrained_cfg_overlay=dict(file=...)).
    pretrained_file: str = ""
    # Extra keyword arguments for timm.create_model (e.g. {depth: 4, embed_dim: 64} for tiny test nets).
    backbone_args: dict[str, Any] = field(default_factory=dict)
    spatial_bias: bool = True
    pooling: Pooling = "ifa"
    cross_layer: bool = True
    fusion: bool = True
    fusion_target: FusionTarget = "final"
    gumbel_tau: float = 1.0
    freeze: FreezeMode = "tokens"
    # Learned prompt tokens per layer for the VPT baselines.
    vpt_prompts: int = 10
    grad_checkpointing: bool = False
    # linear_probe only: compute the frozen backbone's feature of each distinct input image once and reuse
    # it (exact with data.augment flip or none, whose few views repeat every epoch).
    cache_features: bool = False


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    dataset: Dataset = "cub"
    root: str = "data/CUB_200_2011"
    # Fraction of the official train split held out for model selection (never the test split).
    val_fraction: float = 0.1
    val_seed: int = 0
    # Image folders with a single tree (no train/ and test/): fraction of each class used for training.
    folder_train_ratio: float = 0.8
    folder_split_seed: int = 0
    augment: Augment = "paper"
    # Decode a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling) when the resize to img_size
    # shrinks it by at least that factor: faster, with exactly the same geometry (docs/performance.md).
    jpeg_draft: bool = True
    num_workers: int = 4
    # Per-channel normalisation (RGB); unset (null): the backbone's timm pretrained_cfg mean / std.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass
class LossConfig:
    """Weights of the eight loss terms of docs/method.md section 8; a weight of 0 switches a term off."""

    classification: float = 1.0
    consistency: float = 1.0
    presence: float = 1.0
    bg_presence: float = 1.0
    equivariance: float = 1.0
    orthogonality: float = 1.0
    total_variation: float = 1.0
    entropy: float = 1.0
    label_smoothing: float = 0.0
    # Ignore pixels the random affine pushed out of the frame in the equivariance loss (the authors'
    # code compares them too, which penalises perfectly equivariant maps).
    equivariance_mask_outside: bool = True


@dataclass
class OptimConfig:
    """Adam with the per-group learning rates of the official recipe (docs/method.md section 7)."""

    lr_head: float = 1e-2
    lr_prototypes: float = 2e-4
    lr_tokens: float = 2e-4
    lr_backbone: float = 1e-5
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    scheduler: Literal["step", "cosine", "constant"] = "step"
    step_epochs: int = 4
    step_gamma: float = 0.5
    warmup_epochs: float = 0.0
    # Scale every learning rate by sqrt(global_batch / lr_ref_batch); 0 disables scaling.
    lr_ref_batch: int = 0


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 25
    # Stop after this many optimizer steps (0: no limit). For smoke runs.
    max_steps: int = 0
    # Per-process batch size.
    batch_size: int = 16
    grad_accum: int = 1
    precision: Precision = "fp32"
    device: str = "auto"
    out_dir: str = "runs/ivpt"
    seed: int = 42
    # Also write last.pt every N optimizer steps (0: only at the end of each epoch).
    save_every_steps: int = 0
    log_every_steps: int = 10
    eval_every_epochs: int = 1
    tensorboard: bool = False
    # Progress bars of ``ivpt train`` and of the passes of ``ivpt eval`` (the latter on a terminal only).
    progress: bool = True
    compile: bool = False
    # Score best.pt's top-1 on the test split when training ends (false: leave it to ``ivpt eval``).
    test_at_end: bool = True
    # How a fresh IVPT run starts its prototypes: "random" (N(0, 0.05^2), the paper) or "data" (the
    # stage's tokens of prototype_init_images training images split from the border's, then k-means;
    # ivpt.model.prototype_init). A resumed run keeps its checkpoint's.
    prototype_init: PrototypeInit = "random"
    prototype_init_images: int = 128


@dataclass
class EvalConfig:
    """The evaluation protocols of docs/method.md section 9."""

    # Stage scored by the headline part metrics, Python-indexed over stages (-3 is stage S-2).
    stage: int = -3
    batch_size: int = 32
    map_size: int = 224
    box_half_size: int = 36
    consistency_threshold: float = 0.8
    noise_std: float = 0.2
    noise_clip: float = 0.25
    # What KPR divides by: "annotated", the protocol's annotated box width and height; "clipped", the box
    # clipped to the centre crop (ivpt's reading before issue 25, kept for comparisons).
    kpr_box: Literal["annotated", "clipped"] = "annotated"
    # Gaussian blur used to erase a region for the faithfulness metric (0: 3% of the image side).
    faithfulness_sigma: float = 0.0
    seed: int = 0
    metrics: tuple[str, ...] = (
        "accuracy",
        "consistency",
        "stability",
        "part_discovery",
        "kpr",
        "fg_iou",
        "faithfulness",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists) that YAML and ``torch.save`` store safely."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "dict") -> Config:
        cfg = cls()
        merge_dict(cfg, values, source)
        return cfg

    def save(self, path: str | Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# What a YAML file or an override may write for "unset" in an optional field.
_NULL_WORDS = ("null", "none", "~", "")


def _optional_inner(tp: Any) -> Any | None:
    """``X`` for an annotation ``X | None``, else ``None``."""
    if get_origin(tp) in (Union, types.UnionType):
        inner = [arg for arg in get_args(tp) if arg is not type(None)]
        if len(inner) == 1 and len(get_args(tp)) == 2:
            return inner[0]
    return None


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or null"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; return it converted (lists to tuples...)."""
    origin = get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS):
            return None
        try:
            return coerce(value, inner, key)
        except ConfigError:
            raise bad from None
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item_tp, *_rest) = get_args(tp)
        try:
            return tuple(coerce(v, item_tp, key) for v in value)
        except ConfigError:
            raise bad from None
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        for name, item in value.items():
            # YAML reads `{patch_size:8}` (no space after the colon) as the key 'patch_size:8' with no value.
            if isinstance(name, str) and ":" in name and item is None:
                field, written = name.split(":", 1)
                raise ConfigError(
                    f"config key '{key}': '{name}' reads as a key with no value; YAML needs a space after the "
                    f"colon: {{{field.strip()}: {written.strip()}}}"
                )
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp!r} for '{key}'")


def _section_fields(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def merge_dict(cfg: Config, values: dict[str, Any], source: str) -> None:
    """Merge a nested mapping (from YAML or a checkpoint) into ``cfg`` with full type checks."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    sections = _section_fields(cfg)
    for name, section_values in values.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown config section '{name}'; known sections: {', '.join(sections)}")
        if section_values is None:
            continue
        if not isinstance(section_values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping of keys to values")
        for key, value in section_values.items():
            set_value(cfg, f"{name}.{key}", value, source)


def set_value(cfg: Config, dotted_key: str, value: Any, source: str = "override") -> None:
    """Set ``section.key`` to ``value`` after type checking."""
    parts = dotted_key.split(".")
    sections = _section_fields(cfg)
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(
            f"{source}: unknown config key '{dotted_key}'; keys look like 'section.key' with section "
            f"one of {', '.join(sections)}"
        )
    section = getattr(cfg, parts[0])
    hints = _section_fields(section)
    if parts[1] not in hints:
        raise ConfigError(
            f"{source}: unknown config key '{dotted_key}'; known keys in '{parts[0]}': {', '.join(hints)}"
        )
    try:
        setattr(section, parts[1], coerce(value, hints[parts[1]], dotted_key))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.epochs=3'`` -> ``('train.epochs', 3)``; the value is read as YAML (lists, bools...)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory, expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    return values


def preset_names() -> list[str]:
    """Names of the YAML presets installed with the package (``ivpt/configs/<name>.yaml``)."""
    folder = resources.files("ivpt") / "configs"
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def resolve_config_file(name_or_path: str | Path) -> Path:
    """The YAML file that ``-c`` means: an existing path as given, else an installed preset by name.

    ``cub_dinov2_b`` and ``cub_dinov2_b.yaml`` both name the preset; a path that exists always wins, so
    a local file can shadow a preset. Anything else is an error listing the presets.
    """
    path = Path(name_or_path)
    if path.exists() or path.parent != Path("."):
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if name in preset_names():
        with resources.as_file(resources.files("ivpt") / "configs" / f"{name}.yaml") as preset:
            return Path(preset)
    raise ConfigError(
        f"config file '{name_or_path}' does not exist and is not a preset; presets: {', '.join(preset_names())}"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file or preset name (optional) <- ``key=value`` overrides, all type checked."""
    cfg = Config()
    if path is not None:
        merge_dict(cfg, load_yaml(resolve_config_file(path)), str(path))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value, f"override '{text}'")
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that single types cannot express."""
    if not cfg.model.n_pro or any(k < 2 for k in cfg.model.n_pro):
        raise ConfigError(
            f"config key 'model.n_pro': every stage needs at least 2 prototypes (>= 1 foreground + "
            f"background), got {list(cfg.model.n_pro)}"
        )
    if cfg.model.img_size is not None and cfg.model.img_size <= 0:
        raise ConfigError(f"config key 'model.img_size': must be positive, got {cfg.model.img_size}")
    if cfg.model.cache_features and cfg.data.augment == "paper":
        raise ConfigError(
            "config key 'model.cache_features': data.augment=paper draws a new random crop of every image "
            "each epoch, so no feature would be reused; use data.augment=flip or none"
        )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction': must be in [0, 1), got {cfg.data.val_fraction}")
    if not 0.0 < cfg.data.folder_train_ratio < 1.0:
        raise ConfigError(f"config key 'data.folder_train_ratio': must be in (0, 1), got {cfg.data.folder_train_ratio}")
    for key in (
        "train.batch_size",
        "train.grad_accum",
        "train.epochs",
        "train.prototype_init_images",
        "eval.batch_size",
    ):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"config key '{key}': must be >= 1, got {getattr(getattr(cfg, section), name)}")
    if cfg.train.prototype_init == "data" and cfg.model.method not in IVPT_METHODS:
        raise ConfigError(
            f"config key 'train.prototype_init': 'data' initialises IVPT's concept prototypes; model.method "
            f"{cfg.model.method!r} has no prototype stages (use 'random')"
        )
    for key in ("mean", "std"):
        values = getattr(cfg.data, key)
        if values is not None and len(values) != 3:
            raise ConfigError(f"config key 'data.{key}': expected three values (R, G, B) or null, got {list(values)}")
    check_ranges(cfg)
    check_patch_size(cfg.model)


# Values outside these ranges cannot work: a negative learning rate climbs the loss, a negative loss
# weight rewards what the term penalises, a zero std divides by zero.
_NON_NEGATIVE = (
    "optim.lr_head",
    "optim.lr_prototypes",
    "optim.lr_tokens",
    "optim.lr_backbone",
    "optim.weight_decay",
    "optim.grad_clip",
    "optim.warmup_epochs",
    "optim.lr_ref_batch",
    "loss.classification",
    "loss.consistency",
    "loss.presence",
    "loss.bg_presence",
    "loss.equivariance",
    "loss.orthogonality",
    "loss.total_variation",
    "loss.entropy",
    "train.max_steps",
    "train.save_every_steps",
    "data.num_workers",
    "model.vpt_prompts",
    "eval.box_half_size",
    "eval.noise_std",
    "eval.noise_clip",
    "eval.faithfulness_sigma",
)
_POSITIVE = ("model.gumbel_tau", "optim.step_gamma", "optim.step_epochs", "eval.map_size")
_FRACTIONS = {"loss.label_smoothing": (0.0, 1.0, "[0, 1)"), "eval.consistency_threshold": (0.0, 1.0, "[0, 1]")}


def check_ranges(cfg: Config) -> None:
    """Numbers that cannot work (see :data:`_NON_NEGATIVE`, :data:`_POSITIVE`, :data:`_FRACTIONS`)."""

    def value(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key in _NON_NEGATIVE:
        if not (math.isfinite(value(key)) and value(key) >= 0):
            raise ConfigError(f"config key '{key}': expected a finite number >= 0, got {value(key)}")
    for key in _POSITIVE:
        if not (math.isfinite(value(key)) and value(key) > 0):
            raise ConfigError(f"config key '{key}': expected a finite number > 0, got {value(key)}")
    for key, (low, high, shown) in _FRACTIONS.items():
        number = value(key)
        inside = low <= number < high if shown.endswith(")") else low <= number <= high
        if not inside:
            raise ConfigError(f"config key '{key}': expected a number in {shown}, got {number}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ConfigError(f"config key 'optim.betas': expected two numbers in [0, 1), got {list(betas)}")
    if cfg.data.std is not None and not all(math.isfinite(std) and std > 0 for std in cfg.data.std):
        raise ConfigError(f"config key 'data.std': expected three numbers > 0, got {list(cfg.data.std)}")


def patch_size(model: ModelConfig) -> int | None:
    """The backbone's patch side: ``backbone_args.patch_size``, else the ``patch<N>`` in a timm name."""
    size = model.backbone_args.get("patch_size")
    if size is None and (match := re.search(r"patch(\d+)", model.arch)):
        size = int(match.group(1))
    if isinstance(size, (list, tuple)) and size:
        size = max(size)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_patch_size(model: ModelConfig) -> None:
    """An image smaller than one patch gives the backbone nothing to embed."""
    patch = patch_size(model)
    if patch is not None and model.img_size is not None and model.img_size < patch:
        raise ConfigError(
            f"config key 'model.img_size': {model.img_size} px is smaller than one {patch} x {patch} patch of "
            f"'{model.arch}'; expected at least {patch}"
        )
