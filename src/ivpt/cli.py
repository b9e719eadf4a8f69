"""The ``ivpt`` command line.

Every subcommand is a thin shell around a Python function of the package; this file only parses
arguments, builds the config and prints. User errors (:class:`ivpt.errors.IVPTError`, missing files)
print one line and exit 2, and so do operating-system errors (a path that cannot be written, a full
disk); ``--debug`` (or the environment variable ``IVPT_DEBUG=1``, handy under ``torchrun``) shows the
traceback instead. An interrupt (Ctrl-C) exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ivpt.config import AUGMENTS, DATASETS, METHODS, PRECISIONS
from ivpt.errors import IVPTError
from ivpt.outputs import describe_os_error

CONFIG_HELP = "a YAML file, or the name of an installed preset ({presets}); later key=value overrides win"
# A config override on the command line: a dotted key, then "=".
OVERRIDE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=")
CHECKPOINT_HELP = "checkpoint written by ivpt train, a folder written by ivpt export, or hf-hub:org/name"
OVERRIDES_HELP = "config overrides such as train.epochs=3 model.n_pro=[6,5] (see docs/configuration.md)"


def _add_config_args(parser: argparse.ArgumentParser, with_file: bool = True) -> None:
    if with_file:
        from ivpt.config import preset_names

        help_text = CONFIG_HELP.format(presets=", ".join(preset_names()))
        parser.add_argument("-c", "--config", metavar="FILE_OR_PRESET", help=help_text)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def split_images_and_overrides(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``ivpt explain``'s positionals: ``section.key=value`` words are overrides, everything else (and any
    word naming an existing file) an image, so that explain takes overrides in the same form as eval."""
    images, overrides = [], []
    for word in inputs:
        is_override = OVERRIDE_WORD.match(word) is not None and not Path(word).exists()
        (overrides if is_override else images).append(word)
    return images, overrides


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False, default=str))


# --- handlers -----------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from ivpt.config import load_config

    cfg = load_config(args.config, args.overrides)
    from ivpt.engine.trainer import train

    summary = train(cfg, resume=args.resume)
    if summary is not None:
        _print_json(summary)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ivpt.engine.evaluate import evaluate_checkpoint

    if args.oracle:
        from ivpt.engine.oracle import evaluate_checkpoint_oracles

        evaluate_checkpoint_oracles(args.checkpoint, overrides=args.overrides, out_dir=args.out)
        return 0
    metrics = args.metrics.split(",") if args.metrics else None
    evaluate_checkpoint(args.checkpoint, overrides=args.overrides, metrics=metrics, out_dir=args.out)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from ivpt.viz.explain import explain_files

    images, overrides = split_images_and_overrides(args.inputs)
    if not images:
        raise IVPTError("explain: no image given (expected image files, then optional key=value overrides)")
    explain_files(images, checkpoint=args.checkpoint, out_dir=args.out, overrides=overrides)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ivpt.engine.report import build_report

    path = build_report(args.checkpoint, overrides=args.overrides, out_dir=args.out, top_k=args.top_k)
    print(f"report written to {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ivpt.model.pretrained import export_checkpoint

    folder = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {folder} (load it with ivpt.from_pretrained, or pass it as --checkpoint)")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from ivpt.app import run_app

    run_app(args.checkpoint, data=args.data, host=args.host, port=args.port, device=args.device, top_k=args.top_k)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ivpt.demo.jobs import default_jobs, start_workers

    if (default_jobs() if args.jobs is None else args.jobs) > 1:
        start_workers()  # the workers' imports then overlap with this process's own
    from ivpt.demo import run_demo

    run_demo(out_dir=args.out, fast=args.fast, backbone_file=args.backbone, jobs=args.jobs, seed=args.seed)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ivpt.bench import run_bench

    n_pro = tuple(int(v) for v in args.n_pro.split(",")) if args.n_pro else None
    model = dict(
        arch=args.arch,
        img_size=args.img_size,
        batch=args.batch,
        precision=args.precision,
        device=args.device,
        compile=args.compile,
        method=args.method,
        steps=args.steps,
        warmup=args.warmup,
        n_pro=n_pro,
    )
    if args.mode in ("train-step", "eval"):
        _print_json(run_bench(args.mode, **model))
        return 0
    from ivpt.bench.data import run_eval_bench, run_loader_bench, run_train_bench

    if args.data is None:
        raise IVPTError(f"bench {args.mode}: --data ROOT is required (the data set to read)")
    data = dict(data=args.data, dataset=args.dataset, workers=args.workers)
    if args.mode == "loader":
        loader = {key: model[key] for key in ("img_size", "batch", "device", "steps", "warmup")}
        result = run_loader_bench(**data, **loader, augment=args.augment, samples=args.samples, rounds=args.rounds or 5)
    elif args.mode == "train":
        rounds = args.rounds or 2
        result = run_train_bench(**data, **model, augment=args.augment, rounds=rounds, pretrained=args.pretrained)
    else:
        result = run_eval_bench(**data, **model, rounds=args.rounds or 2, pretrained=args.pretrained)
    _print_json(result)
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from ivpt.data.synthetic import make_synthetic

    summary = make_synthetic(
        args.out,
        num_classes=args.classes,
        per_class=args.per_class,
        size=args.size,
        seed=args.seed,
        family=args.family,
    )
    _print_json(summary)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from ivpt.data.check import check_dataset

    report = check_dataset(args.dataset, args.root, verify_images=not args.no_images)
    _print_json(report)
    return 1 if report["problems"] else 0


def _cmd_convert_official(args: argparse.Namespace) -> int:
    from ivpt.model.official import convert_official

    n_pro = tuple(int(v) for v in args.n_pro.split(","))
    convert_official(
        args.snapshot,
        arch=args.arch,
        img_size=args.img_size,
        num_classes=args.num_classes,
        n_pro=n_pro,
        out=args.out,
    )
    print(f"wrote {args.out}")
    return 0


def _cmd_pretrain_backbone(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ivpt.demo import pretrain_backbone
    from ivpt.demo.recipe import PretrainRecipe

    # Every recipe field has the option of the same name (see build_parser).
    recipe = PretrainRecipe(**{field.name: getattr(args, field.name) for field in fields(PretrainRecipe)})
    path = pretrain_backbone(
        args.out,
        recipe,
        data_dir=args.data_dir,
        device=args.device,
        workers=args.workers,
        max_minutes=args.max_minutes,
    )
    print(f"wrote {path}")
    return 0


def _optional_count(text: str) -> int | None:
    """``--test-per-class``: a count, or ``none`` for half of ``--per-class``."""
    return None if text.strip().lower() == "none" else int(text)


def _optional_compute(text: str) -> float | None:
    """``--compute``: a number, or ``none`` to train ``--epochs`` epochs instead."""
    return None if text.strip().lower() == "none" else float(text)


def _compute_list(text: str) -> tuple[float, ...]:
    """``--snapshots``: comma-separated compute multiples, or ``none``."""
    if text.strip().lower() == "none":
        return ()
    return tuple(float(v) for v in text.split(",") if v.strip())


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivpt",
        description="Interpretable Visual Prompt Tuning: train, evaluate and explain concept-prototype "
        "prompts on frozen Vision Transformers.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("train", _cmd_train, "Train a model (IVPT or a baseline) from a config.")
    _add_config_args(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default="auto",
        metavar="CKPT",
        help="resume from CKPT, or (default) from last.pt in train.out_dir when it exists",
    )
    p.add_argument("--no-resume", dest="resume", action="store_const", const=None, help="start afresh")

    p = add("eval", _cmd_eval, "Evaluate a checkpoint: accuracy and interpretability metrics.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument(
        "--metrics",
        metavar="LIST",
        help="comma-separated subset of: accuracy,consistency,stability,part_discovery,kpr,fg_iou,"
        "faithfulness (default: all that the data set supports)",
    )
    p.add_argument("--out", metavar="DIR", help="write DIR/metrics.json (default: beside the checkpoint)")
    p.add_argument(
        "--oracle",
        action="store_true",
        help="instead, score the data set's true part masks and two image-blind maps with the same protocols, "
        "shaped like the checkpoint's scored stage (needs part_masks/); writes DIR/oracle.json",
    )
    _add_config_args(p, with_file=False)

    p = add("explain", _cmd_explain, "Explain single images: concept maps, part evidence, hierarchy.")
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_KEY=VALUE",
        help="image files (any format PIL reads), then config overrides such as eval.stage=-2 as for eval",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for PNG + JSON per image")

    p = add("report", _cmd_report, "Write a static HTML report of a trained model.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (index.html and images)")
    p.add_argument("--top-k", type=int, default=6, help="gallery crops per concept (default 6)")
    _add_config_args(p, with_file=False)

    p = add("export", _cmd_export, "Write a checkpoint as a model folder (config.json + model.safetensors).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint written by ivpt train")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (ivpt.from_pretrained reads it)")

    p = add(
        "app",
        _cmd_app,
        "Explore a trained model in the browser and switch its concepts off (needs pip install 'ivpt[app]').",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT_OR_DIR", help=CHECKPOINT_HELP)
    p.add_argument(
        "--data", default=None, metavar="ROOT", help="the data set's folder (default: the one in the model's config)"
    )
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: reachable from this machine only)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--top-k", type=int, default=6, help="typical crops per concept in the gallery (default 6)")

    p = add("demo", _cmd_demo, "Run the whole story offline on synthetic data (what `make demo` runs).")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--fast", action="store_true", help="a much smaller run, for smoke tests")
    p.add_argument(
        "--backbone",
        default=None,
        metavar="FILE",
        help="an 'ivpt pretrain-backbone' weight file to tune instead of the shipped one",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="processes that train and score the methods side by side, sharing the cores "
        "(default: 2 with 2 cores or more; 1: one method after the other in this process)",
    )
    p.add_argument("--seed", type=int, default=42, help="train.seed of every run (default 42; the data stay the same)")

    p = add("bench", _cmd_bench, "Benchmark against a bound: the training step, inference, the data path, ivpt eval.")
    p.add_argument(
        "mode",
        choices=["train-step", "eval", "loader", "train", "eval-metrics"],
        help="what to time: the step or the forward on tensors in memory; the training data path alone (loader); "
        "training fed by it (train); ivpt eval with every metric (eval-metrics). The last three need --data",
    )
    p.add_argument("--arch", default="vit_small_patch16_224", help="timm model name")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--method", default="ivpt", choices=METHODS)
    p.add_argument("--n-pro", default=None, metavar="K1,K2,...", help="prototypes per stage")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
    p.add_argument("--data", metavar="ROOT", default=None, help="data set folder (loader, train, eval-metrics)")
    p.add_argument("--dataset", choices=DATASETS, default="cub", help="its layout")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: data.num_workers)")
    p.add_argument("--augment", choices=AUGMENTS, default=None, help="training augmentation")
    p.add_argument("--samples", type=int, default=32, help="loader: images compared with the loader bound")
    p.add_argument(
        "--rounds", type=int, default=None, help="alternations with the bound (default: loader 5, train and eval 2)"
    )
    p.add_argument(
        "--pretrained", action="store_true", help="the arch's pretrained weights (local ones: ivpt_demo_vit's)"
    )

    p = add("make-synthetic", _cmd_make_synthetic, "Generate the synthetic part data set in CUB layout.")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--per-class", type=int, default=40, help="images per class (default 40)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--family",
        choices=["default", "pretrain", "generic"],
        default="default",
        help="class definitions: 'default' (the downstream task), 'pretrain' (other parts and colours) or "
        "'generic' (no classes: every attribute drawn per image)",
    )

    p = add("data-check", _cmd_data_check, "Validate a data set folder and print a JSON summary.")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", required=True, metavar="DIR")
    p.add_argument("--no-images", action="store_true", help="skip decoding every image (faster)")

    p = add("convert-official", _cmd_convert_official, "Convert an official IVPT snapshot to an ivpt checkpoint.")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot saved by the authors' code")
    p.add_argument("--arch", required=True, help="timm model name the snapshot was trained with")
    p.add_argument("--img-size", type=int, required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--n-pro", default="17,14,11,8,5", metavar="K1,K2,...")
    p.add_argument("--out", required=True, metavar="CKPT")

    p = add(
        "pretrain-backbone",
        _cmd_pretrain_backbone,
        "Train the small demo ViT on separate synthetic data (reproduces the shipped weights).",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    from ivpt.demo.recipe import APPEARANCE_STYLES, PRETRAIN_FAMILIES, TOKEN_STRIDES, PretrainRecipe

    default = PretrainRecipe()
    recipe_options: dict[str, tuple[type, str]] = {
        "seed": (int, "seed of the images, the initialisation, the data order and the flips"),
        "epochs": (int, "passes over the training images"),
        "num_classes": (int, "classes of the pretraining task, at most 100"),
        "per_class": (int, "images per class"),
        "test_per_class": (_optional_count, "held-out images per class ('none': half of --per-class)"),
        "batch_size": (int, "training batch size"),
        "lr": (float, "peak learning rate"),
        "appearance_weight": (float, "weight of the per-token appearance term"),
        "attribute_weight": (float, "weight of the class-attribute term (0: no class labels)"),
        "part_appearance_weight": (float, "weight of the per-token description of its whole part (0: off)"),
        "part_weight": (float, "weight of the two dense part terms (0: off)"),
        "distill_weight": (float, "weight of the self-distillation terms, views with masked tokens (0: off)"),
        "compute": (_optional_compute, "this multiple of the earlier shipped file's compute ('none': --epochs)"),
    }
    for name, (kind, text) in recipe_options.items():
        value = getattr(default, name)
        shown = text if value is None else f"{text} (default {value})"
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, help=shown)
    p.add_argument(
        "--appearance",
        choices=APPEARANCE_STYLES,
        default=default.appearance,
        help=f"what the per-token appearance targets describe (default {default.appearance})",
    )
    p.add_argument(
        "--snapshots",
        type=_compute_list,
        default=default.snapshots,
        metavar="C1,C2,...",
        help="with --compute: also write a finished backbone at each of these smaller compute multiples "
        "(OUT_c<C>.safetensors), branched off one run whose rate stays constant until its last fifth",
    )
    p.add_argument(
        "--family",
        choices=PRETRAIN_FAMILIES,
        default=default.family,
        help=f"synthetic images to pretrain on: 'generic' has no classes (default {default.family})",
    )
    p.add_argument(
        "--token-stride",
        type=int,
        default=default.token_stride,
        help=f"pixels per token side, one of {', '.join(map(str, TOKEN_STRIDES))}: 8 gives an 8 x 8 token grid at "
        f"64 px, 4 a 16 x 16 one (default {default.token_stride})",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda[:N]")
    p.add_argument("--workers", type=int, default=1, help="processes that draw the images (default 1)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="keep the drawn images here for the next run")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after the epoch that passes this many minutes of training, and save (the file records it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("IVPT_DEBUG", "") not in ("", "0")
    try:
        return int(args.handler(args) or 0)
    except (IVPTError, OSError) as exc:
        if debug:
            raise
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"ivpt {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # A bare Ctrl-C has no message; an interrupted training run says where it saved. The status is the
        # shell's for a process stopped by that signal: 130 for SIGINT, 143 for SIGTERM.
        signum = getattr(exc, "signum", signal.SIGINT)
        said = f": {one_line(str(exc))}" if str(exc) else ""
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"ivpt {args.command}: {how}{said}", file=sys.stderr)
        return 128 + signum


def one_line(text: str) -> str:
    """``text`` with its lines joined by ``"; "`` (a YAML parser's message spans several)."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "main"]
