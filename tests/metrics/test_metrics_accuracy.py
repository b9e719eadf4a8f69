"""AccuracyMeter against hand computation and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from ivpt.errors import IVPTError
from ivpt.metrics import AccuracyMeter, MetricError


def _imbalanced_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Seven classes, 40 images, class 0 holds half of them; logits favour class 0."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.cat([torch.zeros(20, dtype=torch.long), torch.randint(1, 7, (20,), generator=generator)])
    logits = torch.randn(40, 7, generator=generator)
    logits[:, 0] += 1.0
    logits[torch.arange(40), labels] += torch.rand(40, generator=generator) * 2
    return logits, labels


def test_hand_computed_small_case() -> None:
    meter = AccuracyMeter(num_classes=3, topk=2)
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 1, 0, 0])
    meter.update(logits, labels)
    result = meter.compute()
    # top-1 hits: image 0 only; top-2 hits: images 0 and 1 (label 1 is second).
    assert result["accuracy_top1"] == pytest.approx(25.0)
    assert result["accuracy_top2"] == pytest.approx(50.0)
    # Class 0: 1 of 3 right, class 1: 0 of 1, class 2 has no image and does not count.
    assert result["accuracy_macro"] == pytest.approx(100.0 * (1 / 3 + 0) / 2)


def test_matches_sklearn_on_imbalanced_data() -> None:
    logits, labels = _imbalanced_example()
    meter = AccuracyMeter(num_classes=7)
    meter.update(logits, labels)
    result = meter.compute()
    scores, truth = logits.numpy(), labels.numpy()
    assert result["accuracy_top1"] == pytest.approx(100 * accuracy_score(truth, scores.argmax(1)))
    assert result["accuracy_top5"] == pytest.approx(100 * top_k_accuracy_score(truth, scores, k=5, labels=np.arange(7)))
    assert result["accuracy_macro"] == pytest.approx(100 * balanced_accuracy_score(truth, scores.argmax(1)))
    assert result["accuracy_macro"] != pytest.approx(result["accuracy_top1"])


def test_topk_larger_than_class_count_is_always_a_hit() -> None:
    meter = AccuracyMeter(num_classes=3, topk=5)
    meter.update(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), torch.tensor([0, 1]))
    result = meter.compute()
    assert result["accuracy_top5"] == 100.0
    assert result["accuracy_top1"] == 0.0


def test_streaming_and_merging_equal_one_pass() -> None:
    logits, labels = _imbalanced_example()
    whole = AccuracyMeter(7)
    whole.update(logits, labels)
    streamed = AccuracyMeter(7)
    for chunk_logits, chunk_labels in zip(logits.split(13), labels.split(13), strict=True):
        streamed.update(chunk_logits, chunk_labels)
    first, second = AccuracyMeter(7), AccuracyMeter(7)
    first.update(logits[:25], labels[:25])
    second.update(logits[25:], labels[25:])
    merged = first.merge(second)
    assert merged.compute() == whole.compute() == streamed.compute()
    for a, b in zip(merged.state_tensors(), whole.state_tensors(), strict=True):
        assert torch.equal(a, b)


def test_state_roundtrip_and_reset() -> None:
    logits, labels = _imbalanced_example()
    meter = AccuracyMeter(7)
    meter.update(logits, labels)
    copy = meter.empty_like()
    copy.load_state_tensors(meter.state_tensors())
    assert copy.compute() == meter.compute()
    meter.reset()
    with pytest.raises(MetricError, match="no images were added"):
        meter.compute()


def test_label_out_of_range_names_the_range() -> None:
    meter = AccuracyMeter(num_classes=4)
    with pytest.raises(IVPTError, match=r"labels: expected class indices in \[0, 3\], got values in \[0, 7\]"):
        meter.update(torch.zeros(2, 4), torch.tensor([0, 7]))


def test_wrong_logit_width_is_reported() -> None:
    meter = AccuracyMeter(num_classes=4)
    with pytest.raises(MetricError, match=r"logits: expected shape \(B, 4\), got \(2, 5\)"):
        meter.update(torch.zeros(2, 5), torch.tensor([0, 1]))


def test_merging_meters_of_different_class_counts_fails() -> None:
    with pytest.raises(MetricError, match="different settings"):
        AccuracyMeter(3).merge(AccuracyMeter(4))
