"""``ivpt report``: load a trained model, score it as ``ivpt eval`` does, gather its concept statistics over
the test split, and have :func:`ivpt.viz.report.write_report` draw the page.

The metrics come from :func:`ivpt.engine.evaluate.evaluate` (or the ``metrics.json`` that ``ivpt eval``
wrote for this very checkpoint); the concept statistics are gathered during that same pass over the test
split, so the split is streamed once. The training curves come from the run's ``log.jsonl`` beside the
checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from ivpt.config import Config
from ivpt.engine.evaluate import HEADLINE_KEYS, STAGE_KEYS, BatchObserver, evaluate
from ivpt.engine.logger import read_log
from ivpt.errors import IVPTError
from ivpt.model.pretrained import WEIGHTS_FILE, checkpoint_home, load_checkpoint
from ivpt.outputs import prepare_output_dir, write_text
from ivpt.viz.concept_stats import ConceptStatistics, ConceptStatisticsMeter
from ivpt.viz.explain import default_device
from ivpt.viz.report import collect_statistics, write_report


def _stored_metrics(checkpoint: str | Path) -> tuple[dict[str, Any], Path] | None:
    """``metrics.json`` that ``ivpt eval`` wrote for exactly this checkpoint, if any is current."""
    home = checkpoint_home(checkpoint)
    if home is None:
        return None
    path = home / "metrics.json"
    weights = Path(checkpoint) / WEIGHTS_FILE if Path(checkpoint).is_dir() else Path(checkpoint)
    if not path.is_file() or not weights.is_file() or path.stat().st_mtime < weights.stat().st_mtime:
        return None
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    recorded = results.get("checkpoint") if isinstance(results, dict) else None
    if recorded is None or Path(recorded).resolve() != Path(checkpoint).resolve():
        return None
    return results, path


def report_metrics(
    model: nn.Module,
    cfg: Config,
    checkpoint: str | Path,
    overrides: Sequence[str],
    metrics: Sequence[str] | None,
    device: str,
    out_dir: Path,
    observe: BatchObserver | None = None,
) -> tuple[dict[str, Any], str]:
    """The numbers of ``ivpt eval`` for this checkpoint, and a sentence saying where they come from.

    ``metrics.json`` beside the checkpoint is reused when ``ivpt eval`` wrote it for this checkpoint
    after the checkpoint was saved, with the default metrics and no overrides; otherwise
    :func:`ivpt.engine.evaluate.evaluate` (what ``ivpt eval`` runs) scores the model now, ``observe``
    seeing its pass over the test split, and the result is also written to ``out_dir/metrics.json``.
    """
    stored = _stored_metrics(checkpoint) if not overrides and metrics is None else None
    if stored is not None:
        results, path = stored
        return results, f"read from {path} (written by ivpt eval for this checkpoint)"
    results = evaluate(model, cfg, metrics, device, split="test", observe=observe)
    results["checkpoint"] = str(checkpoint)
    write_text(prepare_output_dir(out_dir) / "metrics.json", json.dumps(results, indent=2) + "\n")
    return results, "computed now by ivpt.engine.evaluate (the function behind ivpt eval); also in metrics.json"


def _check_statistics(statistics: ConceptStatistics, num_images: int, top_k: int) -> None:
    kept = {int(scores.shape[1]) for scores in statistics.top_scores}
    if statistics.num_images != num_images or kept - {top_k}:
        raise IVPTError(
            f"report: the statistics given cover {statistics.num_images} images with top_k {sorted(kept)}, "
            f"but this report shows the {num_images} test images with top_k {top_k}"
        )


def build_report(
    checkpoint: str | Path,
    overrides: Sequence[str] = (),
    *,
    out_dir: str | Path,
    top_k: int = 6,
    metrics: Sequence[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    statistics: ConceptStatistics | None = None,
) -> Path:
    """Write the HTML report of a checkpoint to ``out_dir/index.html``.

    Args:
        checkpoint: written by ``ivpt train``, a folder written by ``ivpt export``, or ``hf-hub:org/name``.
        overrides: ``key=value`` changes to the stored config (``data.root=...`` when the data moved).
        out_dir: output folder; images go to ``out_dir/img/``.
        top_k: gallery crops per concept.
        metrics: metric names for the table (default: ``eval.metrics`` of the config, as ``ivpt eval``).
        device: ``"cuda"`` when available unless given.
        progress: show tqdm progress bars.
        statistics: the model's concept statistics over the test split, already gathered by the
            caller with ``top_k`` (the demo gathers them during ``ivpt eval``'s pass); ``None``: gathered
            here, during the metrics' pass over the test split when the metrics are computed now, else
            in a pass of their own.

    Returns:
        The path of ``index.html``.

    Raises:
        IVPTError: bad checkpoint, data set, overrides or ``top_k``.
    """
    from ivpt.data import build_dataset

    if top_k < 1:
        raise IVPTError(f"report: --top-k must be at least 1, got {top_k}")
    device = device or default_device()
    model, cfg, info = load_checkpoint(checkpoint, overrides, device)
    class_names: list[str] = list(info["class_names"])
    # Before the metrics' pass: an unusable folder must not cost it.
    out = prepare_output_dir(out_dir)

    dataset = build_dataset(cfg, "test", train_transform=False)
    if len(dataset.class_names) != len(class_names):
        raise IVPTError(
            f"report: checkpoint '{checkpoint}' classifies {len(class_names)} classes but the data set at "
            f"'{cfg.data.root}' has {len(dataset.class_names)}; point data.root=... at its data"
        )
    meter = ConceptStatisticsMeter(len(class_names), top_k, device) if statistics is None else None
    observe = None if meter is None else meter.observe
    results, source = report_metrics(model, cfg, checkpoint, overrides, metrics, device, out, observe)
    if statistics is not None:
        _check_statistics(statistics, len(dataset), top_k)
        stats = statistics
    elif meter is not None and meter.num_images:
        stats = meter.compute()  # seen during the metrics' pass
    else:
        loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
        stats = collect_statistics(model, loader, len(class_names), top_k, device, progress)

    home = checkpoint_home(checkpoint)
    log_path = home / "log.jsonl" if home is not None else None
    log_records = read_log(log_path) if log_path is not None and log_path.is_file() else None
    return write_report(
        out,
        checkpoint=str(checkpoint),
        epoch=info.get("epoch"),
        cfg=cfg,
        class_names=class_names,
        dataset=dataset,
        stats=stats,
        results=results,
        source=source,
        metric_keys=(HEADLINE_KEYS, STAGE_KEYS),
        log_path=log_path,
        log_records=log_records,
        top_k=top_k,
    )


__all__ = ["build_report", "report_metrics"]
