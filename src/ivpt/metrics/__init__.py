"""Accuracy and interpretability metrics (docs/method.md section 9) as pure functions and streaming meters.

Every meter follows one pattern, meant for a loop over a data loader::

    meter = ConsistencyMeter(num_classes, num_concepts=K - 1, num_keypoints=P, device=device)
    for batch in loader:                       # the bbox-crop loader for consistency / stability
        out = model(loader.dataset.transform.normalize(batch["image"].to(device)))  # uint8 -> model input
        meter.update(out.concept_maps[stage], batch["keypoints"], batch["label"], input_size=img_size)
    meter = sync_meter(meter)                  # in a distributed run: the data of all ranks
    results = meter.compute()                  # {"consistency": 73.5}

- Inputs may live on any device; meters keep only small per-image summaries, never the maps.
- ``device`` (count meters) is where the counts live: pass the model's device to avoid a copy per
  batch. Collecting meters (:class:`PartDiscoveryMeter`, :class:`KeypointRegressionMeter`) keep their
  rows on the CPU.
- ``state_tensors()`` / ``load_state_tensors()`` expose the whole state; ``merge(other)`` folds in a like
  meter (count meters add, collecting meters concatenate); ``empty_like()`` and ``reset()`` start over;
  :func:`sync_meter` does the gather-and-merge over ``torch.distributed``.
- ``compute()`` returns a ``dict[str, float]`` of scores in percent; it raises :class:`MetricError`
  (an :class:`ivpt.errors.IVPTError`) when nothing was added, as do all shape and label checks and maps
  that hold NaN or infinite values (``ivpt eval`` adds the pass, batch and stage to the message).

Maps are ``(B, K, h, w)`` concept maps with the background as the LAST channel; keypoints are
``(B, P, 3)`` ``(x, y, visible)`` in the model-input pixel frame (pixel centres at integers); bounding
boxes ``(B, 4)`` ``(x_min, y_min, x_max, y_max)`` in the same frame; ``input_size`` is ``S`` or ``(H, W)``.

Meters (constructor -> ``update`` arguments -> keys of ``compute()``):

- :class:`AccuracyMeter` ``(num_classes, topk=5)`` -> ``logits (B, C), labels (B,)`` ->
  ``accuracy_top1``, ``accuracy_top5``, ``accuracy_macro``.
- :class:`ConsistencyMeter` ``(num_classes, num_concepts, num_keypoints, map_size=224, box_half_size=36,
  threshold=0.8)`` -> ``maps, keypoints, labels, input_size`` -> ``consistency``.
- :class:`StabilityMeter` ``(num_classes, num_concepts, num_keypoints, map_size=224, box_half_size=36)`` ->
  ``clean_maps, noisy_maps, keypoints, labels, input_size`` -> ``stability`` (per class, then over the
  (class, concept) pairs).
- :class:`PartDiscoveryMeter` ``()`` -> ``maps, keypoints, input_size`` -> ``part_nmi``, ``part_ari``.
- :class:`KeypointRegressionMeter` ``(num_parts, num_keypoints)`` -> ``maps, keypoints, bbox, input_size``
  (``bbox``: the protocol's :func:`kpr_box` of the data set's ``bbox_edges``); one meter per split, then
  ``keypoint_regression_error(train_meter, test_meter) -> float`` (KPR, %).
- :class:`ForegroundIoUMeter` ``()`` -> ``maps, masks (B, H, W)`` -> ``fg_iou``, ``fg_missed``.
- :class:`FaithfulnessMeter` ``()`` -> ``prob_orig, prob_part_removed, prob_random_removed`` (the three
  outputs of :func:`faithfulness_batch`) -> ``faithfulness``, ``faithfulness_part_drop``,
  ``faithfulness_random_drop``, ``faithfulness_ratio``.

``num_concepts`` / ``num_parts`` count FOREGROUND channels; the meters drop the background channel
themselves (``background=False`` for maps without one). Stability noise comes from
:func:`add_stability_noise` applied to the normalised images.
"""

from __future__ import annotations

from ivpt.metrics._base import CollectMeter, CountMeter, Meter, MetricError
from ivpt.metrics.accuracy import AccuracyMeter
from ivpt.metrics.consistency import (
    ConsistencyMeter,
    StabilityMeter,
    add_stability_noise,
    concept_peaks,
    keypoint_hits,
    keypoints_to_frame,
)
from ivpt.metrics.distributed import sync_meter
from ivpt.metrics.faithfulness import (
    FaithfulnessMeter,
    blur_images,
    default_blur_sigma,
    faithfulness_batch,
    part_region_masks,
    random_region_like,
    replace_region,
)
from ivpt.metrics.parts import (
    ForegroundIoUMeter,
    KeypointRegressionMeter,
    PartDiscoveryMeter,
    centroids_from_maps,
    keypoint_part_assignments,
    keypoint_regression_error,
    kpr_box,
    normalize_to_bbox,
)

__all__ = [
    "AccuracyMeter",
    "CollectMeter",
    "ConsistencyMeter",
    "CountMeter",
    "FaithfulnessMeter",
    "ForegroundIoUMeter",
    "KeypointRegressionMeter",
    "Meter",
    "MetricError",
    "PartDiscoveryMeter",
    "StabilityMeter",
    "add_stability_noise",
    "blur_images",
    "centroids_from_maps",
    "concept_peaks",
    "default_blur_sigma",
    "faithfulness_batch",
    "keypoint_hits",
    "keypoint_part_assignments",
    "keypoint_regression_error",
    "keypoints_to_frame",
    "kpr_box",
    "normalize_to_bbox",
    "part_region_masks",
    "random_region_like",
    "replace_region",
    "sync_meter",
]
