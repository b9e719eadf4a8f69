"""The losses on a CUDA device: same values as on the CPU, fp32 under autocast, no host synchronisation.

Skipped where no CUDA device exists (CI); run on a GPU machine to check the device-side properties.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ivpt.config import LossConfig
from ivpt.losses import TERM_NAMES, IVPTCriterion, sample_affine, warp_images
from ivpt.model.output import IVPTOutput

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _output(device: torch.device) -> IVPTOutput:
    generator = torch.Generator().manual_seed(0)

    def maps(channels: int) -> torch.Tensor:
        return torch.softmax(2 * torch.randn(4, channels, 16, 16, generator=generator), dim=1)

    stages = [maps(k) for k in (9, 7, 5)]
    output = IVPTOutput(
        logits=torch.randn(4, 10, generator=generator),
        concept_maps=stages,
        fused_maps=[maps(5), maps(5)],
        fusion_targets=[2, 2],
        part_features=torch.randn(4, 32, 5, generator=generator),
    )
    return dataclasses.replace(
        output,
        logits=output.logits.to(device).requires_grad_(),
        concept_maps=[m.to(device).requires_grad_() for m in output.concept_maps],
        fused_maps=[m.to(device).requires_grad_() for m in output.fused_maps],
        part_features=output.part_features.to(device).requires_grad_(),
    )


def _inputs(device: torch.device, theta: torch.Tensor) -> tuple[IVPTOutput, IVPTOutput, torch.Tensor]:
    output = _output(device)
    transformed = dataclasses.replace(
        output, concept_maps=[warp_images(m.detach(), theta) * 0.9 + 0.1 / m.shape[1] for m in output.concept_maps]
    )
    return output, transformed, torch.tensor([0, 3, 5, 9]).to(device)


def _step(
    inputs: tuple[IVPTOutput, IVPTOutput, torch.Tensor], theta: torch.Tensor, autocast: bool
) -> dict[str, torch.Tensor]:
    output, transformed, labels = inputs
    with torch.autocast(output.logits.device.type, dtype=torch.bfloat16, enabled=autocast):
        result = IVPTCriterion(LossConfig())(output, labels, transformed=transformed, affine=theta)
    result["total"].backward()
    return result


@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype feature")
def test_criterion_on_cuda_matches_cpu_without_host_syncs() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    theta_cpu = sample_affine(torch.Generator().manual_seed(0))
    reference = _step(_inputs(cpu, theta_cpu), theta_cpu, autocast=False)

    theta_cuda = theta_cpu.to(cuda)
    _step(_inputs(cuda, theta_cuda), theta_cuda, autocast=True)  # warm-up: caches, lazy CUDA initialisation
    inputs = _inputs(cuda, theta_cuda)
    images = torch.randn(4, 3, 32, 32, device=cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        theta = sample_affine(torch.Generator(device=cuda).manual_seed(0), cuda)
        sample_affine(torch.Generator().manual_seed(0), cuda)  # CPU generator, CUDA result
        warp_images(images, theta)
        result = _step(inputs, theta_cuda, autocast=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert theta.device.type == "cuda" and theta.shape == (2, 3)
    for name in [*TERM_NAMES, "total"]:
        assert result[name].dtype == torch.float32, name
        torch.testing.assert_close(result[name].cpu(), reference[name].detach(), atol=1e-4, rtol=1e-4, msg=name)
    # Gradients reach the maps on the device too.
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in inputs[0].concept_maps)
