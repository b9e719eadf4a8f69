"""Self-distillation, compute-based lengths and snapshots of ``ivpt pretrain-backbone``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ivpt.demo.distill import (
    CENTRE_MOMENTUM,
    MASK_RATIO,
    STUDENT_TEMPERATURE,
    TEACHER_MOMENTUM,
    TEACHER_TEMPERATURE,
    SelfDistillation,
    random_token_mask,
    random_views,
)
from ivpt.demo.pretrain import (
    REFERENCE_PASSES,
    _rate_multiplier,
    compute_multiple,
    pretrain_backbone,
    snapshot_path,
    training_steps,
    weight_file_recipe,
)
from ivpt.demo.recipe import PretrainRecipe
from ivpt.engine.schedule import StepSchedule
from ivpt.errors import IVPTError

# 3 groups x 8 generic images, 2 held out: 18 training images, batches of 4.
GENERIC = PretrainRecipe(
    seed=5,
    num_classes=3,
    per_class=8,
    test_per_class=2,
    batch_size=4,
    distill_weight=0.0,
    part_appearance_weight=0.0,
    compute=None,
    snapshots=(),
)
# Compute that buys 6 dense steps of batch 4 (3 passes per image).
SIX_DENSE_STEPS = 6 * 4 * 3 / REFERENCE_PASSES


def test_views_warp_pixels_and_part_ids_alike() -> None:
    size = 32
    ramp = torch.arange(size, dtype=torch.float32).expand(size, size)  # value = x coordinate
    images = torch.stack([torch.stack([ramp, ramp.t(), torch.zeros(size, size)])] * 6)
    part_ids = ramp.long().expand(6, size, size)  # id = x coordinate, so nearest sampling reads the ramp
    views, view_ids = random_views(images, part_ids, torch.Generator().manual_seed(0))
    assert views.shape == images.shape and view_ids.shape == part_ids.shape and view_ids.dtype == torch.long
    # Bilinear sampling of a linear ramp is exact: the view's pixels and part ids come from the same places.
    assert torch.all((views[:, 0] - view_ids.float()).abs() <= 0.5 + 1e-4)
    assert views[:, :2].min() >= 0 and views[:, :2].max() <= size - 1  # the crop stays inside the image
    widths = views[:, 0, :, -1] - views[:, 0, :, 0]  # signed: negative where the view is mirrored
    assert (widths > 0).any() and (widths < 0).any()
    spans = widths.abs().mean(dim=1) / (size - 1)
    assert torch.all(spans < 1.0 + 1e-4) and torch.all(spans > math.sqrt(0.4 * 3 / 4) - 0.1)


def test_token_masks_hide_the_drawn_share() -> None:
    masks = random_token_mask(200, 256, torch.Generator().manual_seed(1), torch.device("cpu"))
    counts = masks.sum(dim=1)
    assert masks.dtype == torch.bool and masks.shape == (200, 256)
    assert counts.min() >= math.ceil(MASK_RATIO[0] * 256) and counts.max() <= math.ceil(MASK_RATIO[1] * 256)
    assert counts.float().std() > 10  # the share is drawn per image


class _Backbone(nn.Linear):
    """A stand-in with what SelfDistillation reads from a ViT: ``embed_dim`` and parameters."""

    embed_dim = 4
    num_prefix_tokens = 1

    def __init__(self) -> None:
        super().__init__(4, 4)


def test_teacher_is_an_exponential_moving_average_of_the_student() -> None:
    torch.manual_seed(0)
    student = _Backbone()
    distillation = SelfDistillation(student)
    teacher, teacher_head = distillation._teacher
    assert torch.equal(teacher.weight, student.weight) and not teacher.weight.requires_grad
    assert not any(parameter is teacher.weight for parameter in distillation.parameters())  # not trained
    start = teacher.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    distillation.update_teacher(student, progress=0.0)
    assert torch.allclose(teacher.weight, TEACHER_MOMENTUM * start + (1 - TEACHER_MOMENTUM) * student.weight)
    moved = teacher.weight.clone()
    distillation.update_teacher(student, progress=1.0)  # the momentum reaches 1 at the end of training
    assert torch.equal(teacher.weight, moved)


def test_distillation_terms_pair_the_views_and_the_masked_tokens() -> None:
    torch.manual_seed(0)
    distillation = SelfDistillation(_Backbone())
    cls = (torch.randn(3, 4), torch.randn(3, 4))
    patches = (torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    masks = (torch.rand(3, 5) < 0.5, torch.rand(3, 5) < 0.5)
    teacher_cls = (torch.randn(3, 512), torch.randn(3, 512))
    teacher_patches = (torch.randn(3, 5, 512), torch.randn(3, 5, 512))
    terms = distillation.losses(cls, patches, masks, teacher_cls, teacher_patches)

    def cross_entropy(teacher: torch.Tensor, student_tokens: torch.Tensor) -> torch.Tensor:
        target = (teacher / TEACHER_TEMPERATURE).softmax(-1)  # the centres start at 0
        log_student = (distillation.head(student_tokens) / STUDENT_TEMPERATURE).log_softmax(-1)
        return -(target * log_student).sum(-1).mean()

    # The CLS term compares each view's student with the OTHER view's teacher; the patch term the masked
    # tokens of one view with the teacher's tokens at the same places of the same view.
    expected_cls = (cross_entropy(teacher_cls[1], cls[0]) + cross_entropy(teacher_cls[0], cls[1])) / 2
    expected_patch = sum(cross_entropy(teacher_patches[v][masks[v]], patches[v][masks[v]]) for v in range(2)) / 2
    assert torch.allclose(terms["distill_cls"], expected_cls)
    assert torch.allclose(terms["distill_patch"], expected_patch)
    assert torch.allclose(distillation.centre_cls, (1 - CENTRE_MOMENTUM) * torch.cat(teacher_cls).mean(0))


def test_rate_multiplier_is_the_engines_cosine_without_snapshots() -> None:
    schedule = StepSchedule("cosine", total_steps=40, warmup_steps=4)
    assert [_rate_multiplier(step, 40, 4, 4) for step in range(40)] == pytest.approx([schedule(s) for s in range(40)])
    # Warm-up, stable, decay: constant between the warm-up and the decay's start.
    assert [_rate_multiplier(step, 40, 4, 32) for step in (3, 10, 31, 32)] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert _rate_multiplier(36, 40, 4, 32) == pytest.approx(0.5)


def test_compute_sets_the_steps_and_is_recorded(tmp_path: Path) -> None:
    dense = PretrainRecipe(compute=SIX_DENSE_STEPS, batch_size=4, distill_weight=0.0, snapshots=())
    distilled = PretrainRecipe(compute=SIX_DENSE_STEPS, batch_size=4, distill_weight=1.0, snapshots=())
    assert training_steps(dense, steps_per_epoch=4) == 6
    assert training_steps(distilled, steps_per_epoch=4) == round(6 * 3 / 8)  # two views, student and teacher
    assert training_steps(PretrainRecipe(epochs=3, compute=None, snapshots=()), steps_per_epoch=4) == 12
    reference = PretrainRecipe(distill_weight=0.0)  # one view, no teacher, as the earlier shipped recipe
    assert compute_multiple(reference, 12 * (5000 // 32)) == pytest.approx(1.0)

    recipe = PretrainRecipe(**{**GENERIC.__dict__, "compute": SIX_DENSE_STEPS})
    path = pretrain_backbone(tmp_path / "w.safetensors", recipe, device="cpu", diagnose=False, progress=False)
    written = weight_file_recipe(path)
    assert written["steps"] == 6 and written["epochs_completed"] == 1  # 4 steps per epoch: one and a half
    assert written["compute"] == pytest.approx(SIX_DENSE_STEPS, abs=1e-3) and written["test_accuracy"] is None
    assert "--family" not in written["command"] and f"--compute {SIX_DENSE_STEPS}" in written["command"]


def test_a_snapshot_does_not_depend_on_how_far_the_run_goes(tmp_path: Path) -> None:
    options = dict(device="cpu", diagnose=False, progress=False)
    snapshot = SIX_DENSE_STEPS / 2
    files = {}
    for total in (SIX_DENSE_STEPS, 2 * SIX_DENSE_STEPS):
        recipe = PretrainRecipe(**{**GENERIC.__dict__, "compute": total, "snapshots": (snapshot,)})
        out = pretrain_backbone(tmp_path / f"run{total:.6f}.safetensors", recipe, **options)
        files[total] = (out, snapshot_path(out, snapshot))
    (first, first_snapshot), (second, second_snapshot) = files.values()
    assert first_snapshot.name == f"{first.stem}_c{snapshot:g}.safetensors"
    assert weight_file_recipe(first_snapshot)["steps"] == 3 and weight_file_recipe(second)["steps"] == 12
    a, b = load_file(str(first_snapshot)), load_file(str(second_snapshot))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(load_file(str(first))["pos_embed"], a["pos_embed"])


def test_distilled_runs_are_reproducible(tmp_path: Path) -> None:
    recipe = PretrainRecipe(**{**GENERIC.__dict__, "compute": SIX_DENSE_STEPS, "distill_weight": 1.0})
    options = dict(device="cpu", diagnose=False, progress=False)
    first = load_file(str(pretrain_backbone(tmp_path / "a.safetensors", recipe, **options)))
    second = load_file(str(pretrain_backbone(tmp_path / "b.safetensors", recipe, **options)))
    assert all(torch.equal(first[name], second[name]) for name in first)
    written = weight_file_recipe(tmp_path / "a.safetensors")
    assert written["steps"] == 2 and written["compute"] == pytest.approx(2 * 4 * 8 / REFERENCE_PASSES, abs=1e-3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"family": "generic", "attribute_weight": 0.1}, "'generic' family has no classes"),
        ({"compute": None, "snapshots": (0.1,)}, "--snapshots needs --compute"),
        ({"compute": 0.5, "snapshots": (0.5,)}, "between 0 and --compute"),
        ({"compute": -1.0}, "--compute must be a positive number"),
        ({"distill_weight": -1.0}, "--distill-weight must be a finite number >= 0"),
        (
            {"part_weight": 0.0, "appearance_weight": 0.0, "part_appearance_weight": 0.0, "distill_weight": 0.0},
            "every loss weight is 0",
        ),
    ],
)
def test_bad_recipes_are_refused_before_any_work(changes: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(IVPTError, match=message):
        pretrain_backbone(tmp_path / "x.safetensors", PretrainRecipe(**changes), device="cpu", progress=False)
