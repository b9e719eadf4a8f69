"""``ivpt demo`` (what ``make demo`` runs): the whole story, offline, in minutes on a CPU.

1. generate the synthetic part data set (kept in ``OUT/data`` and reused while its settings match);
2. tune three methods on the shipped frozen backbone ``ivpt_demo_vit`` (pretrained on a different
   synthetic task, see :mod:`ivpt.demo.pretrain`) with the same budget: IVPT (``model.freeze=tokens``,
   the paper's setting), VPT-Deep and a linear probe, each with :func:`ivpt.engine.trainer.train`;
3. score each with :func:`ivpt.engine.evaluate.evaluate_checkpoint` (``ivpt eval``);
4. explain a few test images with IVPT (:func:`ivpt.viz.explain.explain_files`, ``ivpt explain``) and
   write its HTML report (:func:`ivpt.viz.report.build_report`, ``ivpt report``; its concept statistics
   gathered during IVPT's scoring pass over the test split, not in a pass of their own);
5. score the data set's true part masks and two sets of maps that ignore the image with the same
   protocols (:mod:`ivpt.engine.oracle`, ``ivpt eval --oracle``): the ``oracle``, ``fixed_parts`` and
   ``fixed_grid`` rows that every other row is read between;
6. print a table and write ``OUT/results.json``.

Every step is the function behind a CLI command, called with the config a user would pass: each run's
``OUT/runs/<method>/config.yaml`` reproduces it with ``ivpt train -c``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivpt.config import Config, apply_overrides, validate
from ivpt.demo.data import ensure_synthetic
from ivpt.engine.oracle import text_table
from ivpt.errors import IVPTError
from ivpt.model.demo_vit import DEMO_ARCH, DEMO_VIT_ARGS, TOKEN_STRIDE, require_weights

METHODS: tuple[str, ...] = ("ivpt", "vpt_deep", "linear_probe")
# The columns of the results table, keys of ``results.json`` and of ``ivpt eval``'s results.
TABLE_METRICS: tuple[str, ...] = ("accuracy", "consistency", "stability", "nmi", "ari", "kpr", "faithfulness")
DATA_SEED = 0
# The demo's train.seed (the prototypes' initialisation, the data order, flips and transforms); the targets
# are read over it and seeds 1 and 2 (scripts/demo_seeds.py).
DEMO_SEED = 42
# The token stride of ``ivpt pretrain-backbone`` files that do not record one (the option came later).
LEGACY_TOKEN_STRIDE = 8
# ``ivpt eval`` notes start with the metric they concern; these are the ones behind the table's columns.
_NOTED_METRICS = ("accuracy", "consistency", "stability", "part_discovery", "kpr", "faithfulness")


@dataclass(frozen=True)
class DemoPlan:
    """How big a demo run is.

    Attributes:
        num_classes: classes of the synthetic task.
        per_class: images per class (half for training, half for testing).
        epochs: training epochs, the same for every method.
        max_steps: stop each training after this many optimizer steps (0: no limit).
        batch_size: training batch size.
        n_pro: IVPT prototypes per stage, shallow to deep (background included).
        explain_images: test images explained with ``ivpt explain`` (one per class, from class 1 on).
        top_k: gallery crops per concept in the report.
    """

    num_classes: int
    per_class: int
    epochs: int
    max_steps: int
    batch_size: int
    n_pro: tuple[int, ...]
    explain_images: int
    top_k: int


FULL_PLAN = DemoPlan(
    num_classes=10,
    per_class=90,
    epochs=10,
    max_steps=0,
    batch_size=16,
    n_pro=(17, 14, 11, 8, 5),
    explain_images=3,
    top_k=6,
)
# A smoke run of the same code paths: a few images and optimizer steps.
FAST_PLAN = DemoPlan(
    num_classes=3,
    per_class=6,
    epochs=1,
    max_steps=2,
    batch_size=4,
    n_pro=(6, 5, 4),
    explain_images=1,
    top_k=2,
)

# Settings shared by the three runs (the same backbone, data, budget and schedule).
COMMON_OVERRIDES: tuple[str, ...] = (
    f"model.arch={DEMO_ARCH}",
    "model.pretrained=true",
    f"model.img_size={DEMO_VIT_ARGS['img_size']}",
    "data.dataset=cub",
    # No checkpoint selection: with a few hundred images a validation split would cost training data.
    "data.val_fraction=0",
    "data.augment=flip",
    "data.num_workers=0",
    "optim.scheduler=cosine",
    "optim.warmup_epochs=0",
    "train.precision=fp32",
    "train.device=auto",
    "train.log_every_steps=5",
    # The demo scores every checkpoint with ``ivpt eval``; the trainer's own test pass would repeat it.
    "train.test_at_end=false",
    "eval.batch_size=64",
)
# What each method trains, and at which learning rates. The official recipe moves the prototypes at
# 2e-4 for ~9000 steps; the demo has ~280 steps. VPT-Deep's prompt tokens (which train at ``lr_prototypes``)
# start at random and train at 0.01 with its head (docs/demo.md, "The learning rates": its best pair on
# seeds 42, 1 and 2 on two CPUs); IVPT's and the linear probe's heads at 0.02.
#
# IVPT trains with the paper's eight loss weights, all 1, and its prototypes initialised from the data
# (``train.prototype_init=data``: each stage's background prototype from the tokens that look like the image
# border, the others by k-means on the rest; docs/method.md section 1). Drawn near the origin as in the paper,
# every prototype starts equally far from every token; on this small backbone which of them ended up on the
# creature was then decided early and by chance (top-1 49 to 82 over seeds 42 / 1 / 2), and the paper's weight
# 1 for background presence, entropy and total variation collapsed the maps onto the background, so the demo
# used to damp those three to 0.1 and move the prototypes at 0.01. Started from the data, the prototypes are
# near their parts already: at 0.001 they keep the parts the initialisation found (NMI 66 over the three
# seeds, against 58 at 0.01 and 50 from random prototypes). Label smoothing 0.1 (not in the paper) reaches the
# final prototypes through the classifier's gradient and keeps more of those parts still (NMI 70, ARI 51,
# consistency 31 against 66, 46 and 28 without; top-1 81.2 against 81.8; docs/demo.md, "The prototypes'
# initialisation").
IVPT_RECIPE_OVERRIDES: tuple[str, ...] = ("train.prototype_init=data", "loss.label_smoothing=0.1")
METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    "ivpt": (
        "model.method=ivpt",
        "model.freeze=tokens",
        "optim.lr_head=0.02",
        "optim.lr_prototypes=0.001",
        "optim.lr_tokens=0.0002",
        *IVPT_RECIPE_OVERRIDES,
    ),
    "vpt_deep": (
        "model.method=vpt_deep",
        "model.freeze=frozen",
        "optim.lr_head=0.01",
        "optim.lr_prototypes=0.01",
        # One map stage (the last block's prompt attention): score it without a clamping note.
        "eval.stage=-1",
    ),
    "linear_probe": (
        "model.method=linear_probe",
        # The frozen backbone sees each training image in two views (flipped or not): compute each once.
        "model.cache_features=true",
        "optim.lr_head=0.02",
    ),
}


def backbone_file_overrides(path: str | Path) -> list[str]:
    """Overrides that swap the shipped demo weights for another ``ivpt pretrain-backbone`` file.

    The file's metadata records the architecture it was trained with; sizes (and a token stride) that
    differ from the registered ``ivpt_demo_vit`` become ``model.backbone_args``.

    Raises:
        IVPTError: the file does not exist or was not written by ``ivpt pretrain-backbone``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise IVPTError(f"demo: backbone file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise IVPTError(f"demo: backbone file '{path}' is not a safetensors file: {exc}") from None
    if metadata.get("arch") != DEMO_ARCH or "arch_args" not in metadata:
        raise IVPTError(
            f"demo: backbone file '{path}' was not written by 'ivpt pretrain-backbone' (no {DEMO_ARCH} metadata)"
        )
    # Files written before the token stride was an option were all trained at 8 px per token.
    trained = {"token_stride": LEGACY_TOKEN_STRIDE, **json.loads(metadata["arch_args"])}
    registered = {**DEMO_VIT_ARGS, "token_stride": TOKEN_STRIDE}
    changed = {key: value for key, value in trained.items() if key in registered and value != registered[key]}
    overrides = [f"model.pretrained_file={path.resolve()}"]
    if changed:
        overrides.append("model.backbone_args={" + ", ".join(f"{k}: {v}" for k, v in sorted(changed.items())) + "}")
    return overrides


def demo_overrides(
    method: str,
    plan: DemoPlan,
    data_root: Path,
    run_dir: Path,
    backbone_file: str | Path | None = None,
    seed: int = DEMO_SEED,
) -> list[str]:
    """The ``key=value`` overrides (of the default config) of one demo training run (``seed``: ``train.seed``)."""
    if method not in METHOD_OVERRIDES:
        raise IVPTError(f"demo: unknown method '{method}'; expected one of {', '.join(METHOD_OVERRIDES)}")
    n_pro = ",".join(str(k) for k in plan.n_pro)
    return [
        *COMMON_OVERRIDES,
        *(backbone_file_overrides(backbone_file) if backbone_file is not None else []),
        *METHOD_OVERRIDES[method],
        f"model.n_pro=[{n_pro}]",
        f"data.root={data_root}",
        f"train.epochs={plan.epochs}",
        f"train.max_steps={plan.max_steps}",
        f"train.batch_size={plan.batch_size}",
        f"train.out_dir={run_dir}",
        f"train.seed={seed}",
    ]


def demo_config(
    method: str,
    plan: DemoPlan,
    data_root: Path,
    run_dir: Path,
    backbone_file: str | Path | None = None,
    seed: int = DEMO_SEED,
) -> Config:
    """The resolved config of one demo training run."""
    cfg = apply_overrides(Config(), demo_overrides(method, plan, data_root, run_dir, backbone_file, seed))
    validate(cfg)
    return cfg


# What the oracle rows are, in results.json's notes and under the printed table.
ORACLE_NOTES: dict[str, str] = {
    "oracle": "the true part masks scored as concept maps (one per part and the background, at the scored "
    "stage's resolution); accuracy: a linear probe on the frozen backbone's tokens pooled over the true parts",
    "fixed_parts": "maps that ignore the image: one peak per part at its mean keypoint location over the "
    "training images (in the box crop for consistency and stability); no classifier",
    "fixed_grid": "maps that ignore the image: one peak per concept of IVPT's scored stage on a fixed grid; "
    "no classifier",
}


def table_row(results: dict[str, Any], oracle: str | None = None) -> dict[str, Any]:
    """The table's metrics from ``ivpt eval`` results, and the notes that explain any ``None`` among them
    (for an ``oracle`` row, one of :data:`ORACLE_NOTES`'s keys: what the row is)."""
    row: dict[str, Any] = {key: results.get(key) for key in TABLE_METRICS}
    if oracle is not None:
        row["notes"] = [ORACLE_NOTES[oracle]]
        return row
    row["notes"] = [str(note) for note in results.get("notes", []) if str(note).split(":", 1)[0] in _NOTED_METRICS]
    return row


def format_results(rows: dict[str, dict[str, Any]]) -> str:
    """The results table as text: one line per method, ``-`` where a metric does not apply."""
    lines = text_table(rows, TABLE_METRICS, "method", 14)
    lines.append(
        "(percent on the synthetic test split; part metrics at eval.stage; kpr is an error: lower is better; "
        "faithfulness = drop when the top part is removed minus drop for a random region)"
    )
    for method, row in rows.items():
        if method in ORACLE_NOTES:
            lines.append(f"note: {method}: {ORACLE_NOTES[method]}")
            continue
        missing = [key for key in TABLE_METRICS if row[key] is None]
        if missing:
            # The full sentences are in results.json; one line per method keeps the table readable.
            lacks = "concept maps or part scores" if "consistency" in missing else "part scores"
            verb = "does" if len(missing) == 1 else "do"
            lines.append(f"note: {method} has no {lacks}, so {', '.join(missing)} {verb} not apply")
    return "\n".join(lines)


def _explain_candidates(cfg: Config, count: int) -> list[Path]:
    """The first test image of each of the first ``count`` classes."""
    from ivpt.data import build_dataset

    test = build_dataset(cfg, "test", train_transform=False)
    chosen: dict[int, Path] = {}
    for index, label in enumerate(test.labels):
        if label not in chosen:
            chosen[label] = test.image_path(index)
        if len(chosen) == count:
            break
    return [chosen[label] for label in sorted(chosen)]


class _Steps:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    def run(self, title: str, action: Any, *args: Any, **kwargs: Any) -> Any:
        self.done += 1
        print(f"\n[demo {self.done}/{self.total}] {title}", flush=True)
        begin = time.perf_counter()
        result = action(*args, **kwargs)
        seconds = time.perf_counter() - begin
        self.timings[title] = round(seconds, 1)
        print(f"[demo {self.done}/{self.total}] done in {seconds:.1f} s", flush=True)
        return result

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def run_demo(
    out_dir: str | Path = "runs/demo",
    fast: bool = False,
    *,
    methods: Sequence[str] = METHODS,
    backbone_file: str | Path | None = None,
    jobs: int | None = None,
    seed: int = DEMO_SEED,
) -> dict[str, dict[str, Any]]:
    """Run the demo (see the module docstring) into ``out_dir``.

    Layout of ``out_dir``: ``data/`` (the synthetic set), ``runs/<method>/`` (``ivpt train`` outputs:
    ``config.yaml``, ``log.jsonl``, ``best.pt``, ``last.pt``, ``metrics.json``), ``explain/`` (one PNG and
    one JSON per explained image), ``report/index.html``, ``results.json`` and ``timings.json``.

    Args:
        out_dir: output folder (created).
        fast: a much smaller run of the same steps, for smoke tests.
        methods: which of :data:`METHODS` to train and score (IVPT is always needed for the figures).
        backbone_file: another ``ivpt pretrain-backbone`` weight file to use instead of the shipped one.
        jobs: worker processes that train and score the methods side by side (IVPT in one, the others
            in the rest; :mod:`ivpt.demo.jobs` says why), the cores shared out between them; 1 runs
            everything in this process, one method after the other. ``None``:
            :func:`~ivpt.demo.jobs.default_jobs` (2 on a machine with 2 cores or more).
        seed: ``train.seed`` of every run (the data set stays the same).

    Returns:
        ``results.json``'s content: method -> the :data:`TABLE_METRICS` (percent, ``None`` where the
        method has no concept maps or parts) and ``notes`` saying why any is ``None``.

    Raises:
        IVPTError: ``out_dir`` is a file, the shipped backbone weights are missing, ``methods`` is wrong
            or ``jobs`` is below 1.
    """
    from ivpt.demo.jobs import available_cores, default_jobs, method_groups, run_in_parallel, start_workers
    from ivpt.engine.evaluate import evaluate_checkpoint
    from ivpt.engine.oracle import checkpoint_oracle_rows
    from ivpt.engine.report import build_report
    from ivpt.engine.trainer import train
    from ivpt.viz.concept_stats import ConceptStatisticsMeter
    from ivpt.viz.explain import explain_files

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IVPTError(f"demo: output '{out}' exists and is not a folder")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "ivpt" not in methods:
        raise IVPTError(f"demo: methods must include 'ivpt' and come from {', '.join(METHODS)}, got {list(methods)}")
    if backbone_file is None:
        require_weights()
    else:
        backbone_file_overrides(backbone_file)  # a bad file fails here, before any work
    plan = FAST_PLAN if fast else FULL_PLAN
    groups = method_groups(methods, default_jobs() if jobs is None else jobs)
    out.mkdir(parents=True, exist_ok=True)
    if len(groups) > 1:
        start_workers()  # their imports then overlap with drawing the data set
    steps = _Steps(total=1 + (2 * len(methods) if len(groups) == 1 else 2) + 3)

    data_root, generated = steps.run(
        f"synthetic data: {plan.num_classes} classes x {plan.per_class} images in {out / 'data'}",
        ensure_synthetic,
        out / "data",
        num_classes=plan.num_classes,
        per_class=plan.per_class,
        size=int(DEMO_VIT_ARGS["img_size"]),
        seed=DATA_SEED,
    )
    print("generated" if generated else "reused the existing data set (same settings)")

    configs = {
        method: demo_config(method, plan, data_root, out / "runs" / method, backbone_file, seed) for method in methods
    }
    # The report's concept statistics come from the same forward passes as IVPT's scores.
    report_statistics = ConceptStatisticsMeter(plan.num_classes, plan.top_k, device=None)
    checkpoints: dict[str, Path] = {}
    rows: dict[str, dict[str, Any]] = {}
    method_timings: dict[str, dict[str, float]] = {}
    if len(groups) == 1:
        for method, cfg in configs.items():
            summary = steps.run(f"train {method} (ivpt train -c {cfg.train.out_dir}/config.yaml)", train, cfg, None)
            checkpoints[method] = Path(summary["best_checkpoint"])
        for method in methods:
            results = steps.run(
                f"evaluate {method} (ivpt eval --checkpoint {checkpoints[method]})",
                evaluate_checkpoint,
                checkpoints[method],
                observe=report_statistics.observe if method == "ivpt" else None,
            )
            rows[method] = table_row(results)
    else:
        threads = max(1, available_cores() // len(groups))
        outcomes = steps.run(
            f"train {' | '.join(', '.join(g) for g in groups)} side by side and evaluate all but ivpt "
            f"({len(groups)} processes x {threads} thread(s); the output of each run in "
            f"{out / 'runs'}/<method>/demo.log)",
            run_in_parallel,
            configs,
            groups,
            threads,
            train_only=("ivpt",),
        )
        for method, outcome in outcomes.items():
            checkpoints[method] = Path(outcome.checkpoint)
            results = outcome.results
            if results is None:
                # Every core is free again: score the longest job here rather than on one of them.
                results = steps.run(
                    f"evaluate {method} (ivpt eval --checkpoint {outcome.checkpoint})",
                    evaluate_checkpoint,
                    outcome.checkpoint,
                    observe=report_statistics.observe if method == "ivpt" else None,
                )
            rows[method] = table_row(results)
            method_timings[method] = {"train": round(outcome.train_seconds, 1)}
            if outcome.results is not None:
                method_timings[method]["evaluate"] = round(outcome.eval_seconds, 1)

    images = _explain_candidates(configs["ivpt"], plan.explain_images)
    figures = steps.run(
        f"explain {len(images)} test image(s) with IVPT (ivpt explain)",
        explain_files,
        images,
        checkpoint=checkpoints["ivpt"],
        out_dir=out / "explain",
    )
    report = steps.run(
        "IVPT report (ivpt report)",
        build_report,
        checkpoints["ivpt"],
        out_dir=out / "report",
        top_k=plan.top_k,
        progress=False,
        statistics=report_statistics.compute(),
    )

    oracles = steps.run(
        f"oracle rows: true part masks and image-blind maps (ivpt eval --oracle --checkpoint {checkpoints['ivpt']})",
        checkpoint_oracle_rows,
        checkpoints["ivpt"],
    )
    rows.update({name: table_row(results, oracle=name) for name, results in oracles.items()})

    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    # The steps' wall-clock times sum to the total; side by side, each method's own times are given apart.
    timings: dict[str, Any] = {**steps.timings, "total": round(steps.elapsed, 1)}
    if method_timings:
        timings["methods"] = method_timings
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print("\n" + format_results(rows))
    print(f"\nexplanations: {', '.join(str(path) for path in figures)}")
    print(f"report: {report}")
    print(f"results: {out / 'results.json'}  (demo took {steps.elapsed / 60:.1f} min)")
    return rows


__all__ = [
    "COMMON_OVERRIDES",
    "FAST_PLAN",
    "FULL_PLAN",
    "IVPT_RECIPE_OVERRIDES",
    "LEGACY_TOKEN_STRIDE",
    "METHODS",
    "METHOD_OVERRIDES",
    "ORACLE_NOTES",
    "TABLE_METRICS",
    "DEMO_SEED",
    "DemoPlan",
    "backbone_file_overrides",
    "demo_config",
    "demo_overrides",
    "format_results",
    "run_demo",
    "table_row",
]
