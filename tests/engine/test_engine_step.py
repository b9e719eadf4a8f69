"""The training step: accumulation, unscale-then-clip, schedule stepping, the 2B pass, mixed precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ivpt.config import Config, apply_overrides
from ivpt.engine.schedule import StepSchedule
from ivpt.engine.step import TrainStep, build_train_step
from ivpt.model.output import IVPTOutput


class LinearModel(nn.Module):
    """Logits from a linear layer on the mean colour; records the batch sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.batch_sizes: list[int] = []

    def forward(self, images: Tensor) -> IVPTOutput:
        self.batch_sizes.append(images.shape[0])
        return IVPTOutput(logits=self.fc(images.mean(dim=(2, 3))))


def cross_entropy(out: IVPTOutput, labels: Tensor, transformed=None, affine=None) -> dict[str, Tensor]:
    loss = F.cross_entropy(out.logits.float(), labels)
    return {"classification": loss, "total": loss}


def batch(n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=generator) * 3, torch.randint(0, 4, (n,), generator=generator)


def linear_step(model: nn.Module, **options) -> TrainStep:
    optimizer = torch.optim.SGD(model.parameters(), lr=options.pop("lr", 0.1))
    return TrainStep(model, cross_entropy, optimizer, **options)


def test_accumulated_micro_batches_equal_one_full_batch() -> None:
    images, labels = batch()
    torch.manual_seed(0)
    whole, halves = LinearModel(), LinearModel()
    halves.load_state_dict(whole.state_dict())
    linear_step(whole)(images, labels)
    step = linear_step(halves, grad_accum=2)
    before = halves.fc.weight.detach().clone()
    step(images[:4], labels[:4])
    assert torch.equal(halves.fc.weight, before) and step.micro_step == 1 and step.optimizer_steps == 0
    step(images[4:], labels[4:])
    assert step.micro_step == 0 and step.optimizer_steps == 1
    torch.testing.assert_close(halves.fc.weight, whole.fc.weight)
    torch.testing.assert_close(halves.fc.bias, whole.fc.bias)


@pytest.mark.parametrize("scaled", [False, True])
def test_gradients_are_unscaled_before_clipping(scaled: bool) -> None:
    images, labels = batch()
    torch.manual_seed(0)
    model, reference = LinearModel(), LinearModel()
    reference.load_state_dict(model.state_dict())
    cross_entropy(reference(images), labels)["total"].backward()
    true_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
    clip = float(true_norm) / 4
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
    step = linear_step(model, lr=1.0, grad_clip=clip, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    step(images, labels)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]).norm()
    # SGD with lr 1 moves the parameters by exactly the clipped gradient.
    assert float(moved) == pytest.approx(clip, rel=1e-4)
    assert float(step.last_grad_norm) == pytest.approx(float(true_norm), rel=1e-4)


def test_scheduler_steps_once_per_optimizer_step() -> None:
    images, labels = batch()
    model = LinearModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, StepSchedule("step", 10, step_size=1, gamma=0.5))
    step = TrainStep(model, cross_entropy, optimizer, scheduler, grad_accum=2)
    for _ in range(4):
        step(images[:4], labels[:4])
    assert step.optimizer_steps == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_affine_generator_doubles_the_forward_batch() -> None:
    images, labels = batch(n=6)
    model = LinearModel()
    linear_step(model)(images, labels)
    generator = torch.Generator().manual_seed(0)
    linear_step(model, affine_generator=generator)(images, labels)
    assert model.batch_sizes == [6, 12]


def test_returned_terms_are_detached_scalars() -> None:
    terms = linear_step(LinearModel())(*batch())
    assert set(terms) == {"classification", "total"}
    assert all(t.shape == () and not t.requires_grad for t in terms.values())


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        linear_step(LinearModel(), precision="fp8")
    with pytest.raises(ValueError, match="grad_accum must be >= 1, got 0"):
        linear_step(LinearModel(), grad_accum=0)


def tiny_ivpt_step(model_overrides: list[str], precision: str, seed: int = 0) -> tuple[nn.Module, TrainStep]:
    from ivpt.model import build_model

    cfg = apply_overrides(Config(), [*model_overrides, f"train.precision={precision}", f"train.seed={seed}"])
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes=4)
    return model, build_train_step(model, cfg, steps_per_epoch=4)


def _train_tiny(model_overrides: list[str], precision: str) -> None:
    model, step = tiny_ivpt_step(model_overrides, precision)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        terms = step(images, labels)
        assert all(torch.isfinite(v) for v in terms.values()), terms
        assert all(v.dtype == torch.float32 for v in terms.values())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_trains_on_cpu_without_nan(tiny_model_overrides: list[str]) -> None:
    _train_tiny(tiny_model_overrides, "bf16")


def _cpu_fp16_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.randn(2, 2) @ torch.randn(2, 2)
        torch.amp.GradScaler("cpu")
    except (RuntimeError, AssertionError):
        return False
    return out.dtype == torch.float16


@pytest.mark.skipif(not _cpu_fp16_supported(), reason="this torch has no fp16 autocast / GradScaler on the CPU")
def test_fp16_autocast_with_grad_scaler_trains_on_cpu(tiny_model_overrides: list[str]) -> None:
    _train_tiny(tiny_model_overrides, "fp16")


def test_same_seed_gives_the_same_step(tiny_model_overrides: list[str]) -> None:
    results = []
    for _ in range(2):
        model, step = tiny_ivpt_step(tiny_model_overrides, "fp32", seed=3)
        torch.manual_seed(5)  # the Gumbel noise of the grouping comes from the global generator
        step(torch.ones(2, 3, 32, 32), torch.tensor([0, 1]))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs a CUDA device")
def test_step_does_not_synchronise_with_the_host(tiny_model_overrides: list[str]) -> None:
    from ivpt.model import build_model

    cfg = apply_overrides(Config(), [*tiny_model_overrides, "train.precision=bf16"])
    model = build_model(cfg, num_classes=4).cuda()
    step = build_train_step(model, cfg, steps_per_epoch=4)
    images = torch.randn(4, 3, 32, 32, device="cuda")
    labels = torch.arange(4, device="cuda")
    step(images, labels)  # first call: lazy initialisations may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class RecordingModel(LinearModel):
    """:class:`LinearModel` that keeps a copy of every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, images: Tensor) -> IVPTOutput:
        self.inputs.append(images.detach().clone())
        return super().forward(images)


def test_the_step_normalises_uint8_batches_after_the_copy_to_the_device() -> None:
    from ivpt.data.transforms import Normalize

    normalize = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    model = RecordingModel()
    linear_step(model, normalize=normalize)(images, labels)
    (seen,) = model.inputs
    assert seen.dtype == torch.float32
    torch.testing.assert_close(seen, normalize(images), rtol=0, atol=0)
    # (x / 255 - mean) / std: what the samples held before they became uint8.
    mean, std = torch.tensor(normalize.mean)[:, None, None], torch.tensor(normalize.std)[:, None, None]
    torch.testing.assert_close(seen, (images.float() / 255 - mean) / std, rtol=0, atol=1e-6)
    # Without normalize (the default) the images reach the model as they come.
    plain = RecordingModel()
    floats = images.float()
    linear_step(plain)(floats, labels)
    assert torch.equal(plain.inputs[0], floats)
