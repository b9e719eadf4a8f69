"""IVPT and its baselines on unmodified timm Vision Transformers.

- :func:`create_model` / :func:`build_model`: IVPT or a baseline, from arguments or ``cfg.model``;
- :func:`param_groups` / :func:`parameter_counts`: optimizer groups with the official learning rates;
- :func:`load_official_checkpoint` / :func:`convert_official`: the authors' snapshots;
- :func:`save_pretrained` / :func:`from_pretrained` / :func:`load_checkpoint`: trained models, in exported
  folders (``config.json`` + ``model.safetensors``), training checkpoints or on the Hugging Face Hub;
- :class:`Preprocessing`: the inputs a model expects (``model.preprocessing``);
- :class:`IVPTOutput`: what every model returns;
- :class:`Intervention`: concepts a forward pass runs without (``model(images, intervention=...)``);
- :func:`initialise_prototypes`: IVPT's prototypes from training images (``train.prototype_init=data``).
"""

from __future__ import annotations

from ivpt.config import METHODS
from ivpt.model.factory import build_model, create_model
from ivpt.model.intervention import Intervention
from ivpt.model.official import convert_official, load_official_checkpoint
from ivpt.model.output import IVPTOutput
from ivpt.model.params import GROUP_NAMES, param_groups, parameter_counts
from ivpt.model.preprocessing import Preprocessing
from ivpt.model.pretrained import from_pretrained, load_checkpoint, save_pretrained
from ivpt.model.prototype_init import initialise_prototypes

__all__ = [
    "GROUP_NAMES",
    "METHODS",
    "IVPTOutput",
    "Intervention",
    "Preprocessing",
    "build_model",
    "convert_official",
    "create_model",
    "from_pretrained",
    "initialise_prototypes",
    "load_checkpoint",
    "load_official_checkpoint",
    "param_groups",
    "parameter_counts",
    "save_pretrained",
]
