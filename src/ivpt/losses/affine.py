"""The random affine transform of the equivariance loss (docs/method.md section 8).

One transform ``T`` is drawn per batch. It is stored as ``theta``, a ``(2, 3)`` matrix in the
normalised coordinates of :func:`torch.nn.functional.affine_grid` (``x`` and ``y`` in ``[-1, 1]``
spanning the whole frame, ``align_corners=False``): the transformed image at output location ``p``
shows the original image at ``theta @ [p, 1]``::

    warp_images(x, theta)[..., p] = x[..., theta @ [p, 1]]
    unwarp_maps(m, theta)[..., q] = m[..., theta^-1 @ [q, 1]]

Because the coordinates are normalised to the frame, the same ``theta`` moves a ``518 x 518`` image and
its ``37 x 37`` patch grid by the same geometric amount, so the maps of the transformed image can be
brought back onto the grid of the original with :func:`unwarp_maps`:
``unwarp_maps(warp_images(m, theta), theta) ~= m`` wherever the transformed frame saw the content.

The rotation is a rotation of normalised coordinates: exact for square inputs (every IVPT input is
square), an invertible affine with a slight shear for non-square ones, where the equivariance loss is
still consistent because warping and unwarping share the same matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["affine_matrix", "invert_affine", "sample_affine", "unwarp_maps", "unwarp_validity", "warp_images"]

# Defaults of docs/method.md section 8: rotation U(-90, 90) degrees, translation up to 11% of the size on
# each axis, scale U(0.8, 1.4).
MAX_ROTATION_DEG = 90.0
MAX_TRANSLATION = 0.11
SCALE_RANGE = (0.8, 1.4)


def affine_matrix(angle: Tensor, translation: Tensor, scale: Tensor) -> Tensor:
    """The sampling matrix ``theta`` of the transform that moves image content by ``p -> s R p + t``.

    Args:
        angle: ``()`` rotation in radians (positive turns content from +x towards +y, i.e. clockwise on
            screen, where y points down).
        translation: ``(2,)`` shift ``(t_x, t_y)`` in normalised units (1.0 is half the frame).
        scale: ``()`` zoom factor; above 1 enlarges the content.

    Returns:
        ``(2, 3)`` ``theta = [R^T / s | -R^T t / s]``, the inverse of the content motion, which is what
        ``affine_grid`` expects (it maps output locations to input locations).
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    # R^T / s: the inverse rotation and zoom, applied to output coordinates to find where to sample.
    inv_linear = torch.stack([torch.stack([cos, sin]), torch.stack([-sin, cos])]) / scale
    inv_shift = -(inv_linear @ translation)
    return torch.cat([inv_linear, inv_shift.unsqueeze(1)], dim=1)


def sample_affine(
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    max_rotation_deg: float = MAX_ROTATION_DEG,
    max_translation: float = MAX_TRANSLATION,
    scale_range: tuple[float, float] = SCALE_RANGE,
) -> Tensor:
    """Draw one random affine transform for a batch.

    Rotation ``U(-max_rotation_deg, max_rotation_deg)``, translation ``U(-max_translation,
    max_translation)`` times the frame size on each axis independently, scale ``U(*scale_range)``.

    All four numbers come from a single ``torch.rand`` call on ``generator`` (the global generator when
    ``None``), so a seeded generator gives a reproducible sequence. The draw happens on the generator's
    device and, if ``device`` differs, four numbers are copied over; pass a generator that lives on
    ``device`` to keep the whole computation there. No value is read back to the host.

    Returns:
        ``(2, 3)`` fp32 ``theta`` on ``device`` (the generator's device when ``None``), for
        :func:`warp_images` and :func:`unwarp_maps`.
    """
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    target_device = torch.device(device) if device is not None else draw_device
    uniform = torch.rand(4, generator=generator, device=draw_device, dtype=torch.float32)
    # A host-to-device copy from pageable memory is staged at once, so non_blocking is safe and keeps
    # the host from waiting on the device's queue; a copy back to the host must block.
    uniform = uniform.to(target_device, non_blocking=target_device.type != "cpu")
    signed = 2.0 * uniform - 1.0
    angle = signed[0] * math.radians(max_rotation_deg)
    # The normalised frame is 2 units wide, so a shift of f * size is 2 f units.
    translation = signed[1:3] * (2.0 * max_translation)
    low, high = scale_range
    scale = low + (high - low) * uniform[3]
    return affine_matrix(angle, translation, scale)


def invert_affine(theta: Tensor) -> Tensor:
    """``(2, 3)`` or ``(B, 2, 3)`` -> same shape: the matrix of the inverse map ``q -> A^-1 (q - b)``.

    Closed-form 2 x 2 inverse: no solver, so no singularity check that would read back to the host.
    """
    a, b, c, d = theta[..., 0, 0], theta[..., 0, 1], theta[..., 1, 0], theta[..., 1, 1]
    det = a * d - b * c
    inv_linear = torch.stack([torch.stack([d, -b], dim=-1), torch.stack([-c, a], dim=-1)], dim=-2)
    inv_linear = inv_linear / det[..., None, None]
    inv_shift = -(inv_linear @ theta[..., 2:])
    return torch.cat([inv_linear, inv_shift], dim=-1)


def _resample(x: Tensor, theta: Tensor) -> Tensor:
    """Bilinear resampling of ``x`` ``(B, C, H, W)`` at ``theta @ [p, 1]``, zeros outside the frame."""
    batch_theta = theta.to(dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(batch_theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp_images(x: Tensor, theta: Tensor) -> Tensor:
    """Apply the transform ``T`` to a batch of images.

    Args:
        x: ``(B, C, H, W)`` images, normalised with the data set's mean and std.
        theta: ``(2, 3)`` from :func:`sample_affine`, shared by the whole batch.

    Returns:
        ``(B, C, H, W)`` transformed images. Regions that come from outside the original frame are 0,
        which after mean/std normalisation is the data set's mean colour: a flat, neutral fill rather
        than a black border the network could latch onto.
    """
    return _resample(x, theta)


def unwarp_maps(maps: Tensor, theta: Tensor) -> Tensor:
    """Apply ``T^-1`` to maps computed on the transformed image, aligning them with the original's maps.

    Args:
        maps: ``(B, K, h, w)`` maps of ``warp_images(x, theta)`` (any grid size: coordinates are
            normalised to the frame).
        theta: ``(2, 3)`` the matrix the images were warped with.

    Returns:
        ``(B, K, h, w)`` maps on the original image's grid; 0 where the transformed frame did not see
        the original content (see :func:`unwarp_validity` for the matching weight).
    """
    return _resample(maps, invert_affine(theta))


def unwarp_validity(theta: Tensor, size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """``(1, 1, h, w)`` fraction of each original-grid pixel that :func:`unwarp_maps` fills from inside
    the transformed frame: 1 well inside, 0 where the content left the frame, in between at the edge.
    """
    ones = torch.ones(1, 1, *size, dtype=torch.float32, device=device if device is not None else theta.device)
    return unwarp_maps(ones, theta.float())
