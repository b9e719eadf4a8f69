"""Meters fed with accelerator tensors (and keeping their counts there) agree with the CPU."""

from __future__ import annotations

import pytest
import torch

from ivpt.metrics import (
    AccuracyMeter,
    ConsistencyMeter,
    FaithfulnessMeter,
    ForegroundIoUMeter,
    KeypointRegressionMeter,
    PartDiscoveryMeter,
    StabilityMeter,
    add_stability_noise,
    blur_images,
    keypoint_regression_error,
    part_region_masks,
    random_region_like,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = 16
    cells = torch.stack([torch.randperm(16, generator=generator)[:3] for _ in range(batch)])
    logits = torch.randn(batch, 4, 4, 4, generator=generator)
    for k in range(3):
        logits[torch.arange(batch), k, cells[:, k] // 4, cells[:, k] % 4] += 6.0
    xy = torch.stack([cells % 4, cells // 4], dim=-1) * 8 + 3.5
    return {
        "maps": logits.softmax(dim=1),
        "keypoints": torch.cat([xy, (torch.rand(batch, 3, 1, generator=generator) > 0.2).float()], dim=-1),
        "labels": torch.randint(0, 3, (batch,), generator=generator),
        "logits": torch.randn(batch, 6, generator=generator),
        "bbox": torch.tensor([[2.0, 3.0, 30.0, 28.0]]).expand(batch, 4),
        "masks": torch.rand(batch, 32, 32, generator=generator),
        "probs": torch.rand(3, batch, generator=generator),
    }


def _run_all(device: str) -> dict[str, float]:
    data = {name: tensor.to(device) for name, tensor in _inputs().items()}
    maps, keypoints = data["maps"], data["keypoints"]
    accuracy = AccuracyMeter(6, device=device)
    consistency = ConsistencyMeter(3, 3, 3, device=device)
    stability = StabilityMeter(3, 3, 3, device=device)
    parts = PartDiscoveryMeter()
    regression = KeypointRegressionMeter(3, 3)
    iou = ForegroundIoUMeter(device=device)
    faithfulness = FaithfulnessMeter(device=device)
    for rows in (slice(0, 7), slice(7, 16)):
        accuracy.update(data["logits"][rows], data["labels"][rows])
        consistency.update(maps[rows], keypoints[rows], data["labels"][rows], 32)
        stability.update(maps[rows], maps[rows].roll(1, dims=-1), keypoints[rows], data["labels"][rows], 32)
        parts.update(maps[rows], keypoints[rows], 32)
        regression.update(maps[rows], keypoints[rows], data["bbox"][rows], 32)
        iou.update(maps[rows], data["masks"][rows])
        faithfulness.update(*data["probs"][:, rows])
    results: dict[str, float] = {}
    for meter in (accuracy, consistency, stability, parts, iou, faithfulness):
        results.update(meter.compute())
    results["kpr"] = keypoint_regression_error(regression, regression)
    return results


def test_meters_on_cuda_match_the_cpu() -> None:
    on_cpu, on_cuda = _run_all("cpu"), _run_all("cuda")
    assert on_cuda.keys() == on_cpu.keys()
    for key, value in on_cpu.items():
        assert on_cuda[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key
    assert 0 < on_cpu["consistency"] <= 100 and on_cpu["stability"] < 100


def test_random_pieces_accept_a_cpu_generator_for_cuda_tensors() -> None:
    images = torch.zeros(2, 3, 16, 16, device="cuda")
    noisy = add_stability_noise(images, torch.Generator().manual_seed(0))
    assert noisy.device.type == "cuda"
    assert torch.equal(noisy.cpu(), add_stability_noise(images.cpu(), torch.Generator().manual_seed(0)))
    mask = part_region_masks(torch.rand(2, 3, 4, 4, device="cuda"), torch.tensor([0, 2], device="cuda"), 16)
    region = random_region_like(mask, torch.Generator().manual_seed(1))
    assert region.device.type == "cuda"
    assert torch.equal(region.sum(dim=(1, 2)), mask.sum(dim=(1, 2)))
    texture = torch.rand(2, 3, 16, 16)
    assert torch.allclose(blur_images(texture.cuda(), 1.5).cpu(), blur_images(texture, 1.5), atol=1e-5)
