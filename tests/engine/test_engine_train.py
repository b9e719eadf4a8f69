"""The training loop on the tiny synthetic set: outputs, loss, selection on validation, exact resumption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ivpt.checkpoint import read_checkpoint
from ivpt.cli import main
from ivpt.engine.logger import read_log
from ivpt.engine.trainer import train
from ivpt.errors import CheckpointError, ConfigError
from ivpt.losses import TERM_NAMES
from ivpt.model.preprocessing import resolve_preprocessing

# 64 synthetic images: 32 official train, of which 8 validation -> 24 train = 3 steps of 8 per epoch.
STEPS_PER_EPOCH = 3
# A higher head rate and no augmentation make the two-epoch loss decrease unmistakable.
LEARNS_FAST = ("data.augment=none", "optim.lr_head=0.03", "optim.lr_prototypes=0.003")


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"weights differ: {different[:5]}"


def test_two_epoch_run_writes_its_outputs_and_the_loss_falls(tiny_config) -> None:
    cfg = tiny_config(*LEARNS_FAST, f"train.log_every_steps={STEPS_PER_EPOCH}")
    summary = train(cfg, resume=None)
    out = Path(cfg.train.out_dir)

    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["epochs"] == 2
    assert summary["best_checkpoint"] == str(out / "best.pt")
    # config.yaml holds the config with the backbone's input size and normalisation filled in.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == resolve_preprocessing(cfg).to_dict()
    assert (saved["data"]["mean"], saved["data"]["std"]) == ([0.5] * 3, [0.5] * 3)  # vit_tiny_patch16_224's

    records = read_log(out / "log.jsonl")
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "end"
    assert events.count("val") == 2 and events.count("test") == 1
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [3, 6]
    for record in train_records:
        assert set(record["loss"]) == {*TERM_NAMES, "total"}
        assert set(record["lr"]) == {"head", "prototypes", "tokens"}
        assert record["img_per_s"] > 0
    first, last = train_records[0]["loss"]["total"], train_records[-1]["loss"]["total"]
    assert last < first - 0.1, (first, last)
    assert summary["final_train_loss"] == pytest.approx(last)

    # best.pt is the checkpoint with the highest validation accuracy, and test was scored once, on it.
    val = [r for r in records if r["event"] == "val"]
    best_epoch = max(val, key=lambda r: r["accuracy"])["epoch"]  # the first maximum wins ties
    assert read_checkpoint(out / "best.pt")["epoch"] == best_epoch
    assert summary["best_val_accuracy"] == max(r["accuracy"] for r in val)
    test = next(r for r in records if r["event"] == "test")
    assert test["checkpoint_epoch"] == best_epoch and summary["test_accuracy"] == test["accuracy"]

    last_ckpt = read_checkpoint(out / "last.pt", training=True)
    assert (last_ckpt["epoch"], last_ckpt["step"], last_ckpt["epoch_step"]) == (2, 6, 0)
    assert last_ckpt["config"] == saved
    assert len(last_ckpt["class_names"]) == 4 and last_ckpt["part_names"]


def test_the_trainer_feeds_its_step_normalised_images_from_uint8_batches(tiny_config) -> None:
    """Samples are uint8 pixels; the step normalises each batch with the training set's mean / std."""
    from ivpt.engine.distributed import DistributedContext
    from ivpt.engine.trainer import Trainer

    cfg = resolve_preprocessing(tiny_config())
    trainer = Trainer(cfg, DistributedContext())
    normalize = trainer.train_set.transform.normalize
    assert trainer.step.normalize is normalize and normalize.mean == tuple(cfg.data.mean)
    batch = next(iter(trainer.loader))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, *([cfg.model.img_size] * 2))
    seen: list[torch.Tensor] = []
    hook = trainer.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    try:
        trainer.step(batch["image"], batch["label"])
    finally:
        hook.remove()
    assert seen and seen[0].dtype == torch.float32
    mean, std = (torch.tensor(v)[:, None, None] for v in (cfg.data.mean, cfg.data.std))
    torch.testing.assert_close(seen[0], (batch["image"].float() / 255 - mean) / std, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_test_at_end_false_leaves_the_test_split_to_ivpt_eval(tiny_config) -> None:
    cfg = tiny_config("train.epochs=1", "data.val_fraction=0", "train.test_at_end=false")
    summary = train(cfg, resume=None)
    events = [r["event"] for r in read_log(Path(cfg.train.out_dir) / "log.jsonl")]
    assert "test" not in events and events[-1] == "end"
    assert summary["test_accuracy"] is None
    assert Path(summary["best_checkpoint"]).is_file()


def test_resume_continues_exactly(tiny_config, tmp_path: Path) -> None:
    straight = tiny_config(f"train.out_dir={tmp_path / 'straight'}")
    train(straight, resume=None)

    # One epoch, then resume for the second.
    split_run = tiny_config(f"train.out_dir={tmp_path / 'split'}", "train.epochs=1")
    train(split_run, resume=None)
    split_run.train.epochs = 2
    summary = train(split_run, resume="auto")
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(model_state(tmp_path / "straight" / "last.pt"), model_state(tmp_path / "split" / "last.pt"))

    # Stopped in the middle of the second epoch (step 4 of 6), then resumed from that checkpoint.
    mid = tiny_config(f"train.out_dir={tmp_path / 'mid'}", "train.max_steps=4")
    assert train(mid, resume=None)["steps"] == 4
    assert read_checkpoint(tmp_path / "mid" / "last.pt")["epoch_step"] == 1
    mid.train.max_steps = 0
    train(mid, resume=str(tmp_path / "mid" / "last.pt"))
    assert_same_weights(model_state(tmp_path / "straight" / "last.pt"), model_state(tmp_path / "mid" / "last.pt"))
    straight_opt = read_checkpoint(tmp_path / "straight" / "last.pt")["optimizer"]
    mid_opt = read_checkpoint(tmp_path / "mid" / "last.pt")["optimizer"]
    for index, state in straight_opt["state"].items():
        assert torch.equal(state["exp_avg_sq"], mid_opt["state"][index]["exp_avg_sq"])
    # The resumed run's log holds each step once.
    steps = [r["step"] for r in read_log(tmp_path / "mid" / "log.jsonl") if r["event"] == "train"]
    assert steps == list(range(1, 7))


def test_finished_run_resumes_to_nothing_and_fresh_start_overwrites(tiny_config) -> None:
    cfg = tiny_config("train.epochs=1")
    train(cfg, resume=None)
    out = Path(cfg.train.out_dir)
    before = model_state(out / "last.pt")
    summary = train(cfg, resume="auto")
    assert summary["steps"] == STEPS_PER_EPOCH
    assert_same_weights(before, model_state(out / "last.pt"))
    train(cfg, resume=None)
    assert sum(r["event"] == "start" for r in read_log(out / "log.jsonl")) == 1


def test_without_validation_best_is_last_and_the_log_says_so(tiny_config) -> None:
    cfg = tiny_config("data.val_fraction=0", "train.epochs=1", "train.grad_accum=2", "train.batch_size=4")
    summary = train(cfg, resume=None)
    out = Path(cfg.train.out_dir)
    # 32 train images / (4 x 2) = 4 optimizer steps.
    assert summary["steps"] == 4
    assert summary["best_val_accuracy"] is None
    notes = [r["message"] for r in read_log(out / "log.jsonl") if r["event"] == "note"]
    assert any("no validation split" in n and "best.pt is the last checkpoint" in n for n in notes)
    assert not any(r["event"] == "val" for r in read_log(out / "log.jsonl"))
    assert_same_weights(model_state(out / "best.pt"), model_state(out / "last.pt"))
    assert summary["test_accuracy"] is not None


def test_step_checkpoints_and_bf16_training(tiny_config) -> None:
    cfg = tiny_config("train.precision=bf16", "train.save_every_steps=2", "train.epochs=1")
    summary = train(cfg, resume=None)
    out = Path(cfg.train.out_dir)
    records = read_log(out / "log.jsonl")
    saved_at = [r["step"] for r in records if r["event"] == "checkpoint"]
    assert saved_at == [2, 3]
    losses = [r["loss"]["total"] for r in records if r["event"] == "train"]
    assert len(losses) == 3 and all(isinstance(v, float) for v in losses)  # NaN would be logged as null
    assert summary["final_train_loss"] == pytest.approx(losses[-1])


def test_user_errors(tiny_config, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_config(), resume=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="exceeds the 24 training images"):
        train(tiny_config("train.batch_size=32"), resume=None)
    other = tiny_config("train.epochs=1")
    train(other, resume=None)
    changed = tiny_config("train.batch_size=4")
    with pytest.raises(CheckpointError, match="written with 3 optimizer steps per epoch, this run has 6"):
        train(changed, resume="auto")


def test_a_bad_image_is_the_same_line_with_and_without_worker_processes(
    synthetic_root: Path, tiny_overrides, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    split = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    images = [line.split() for line in (root / "images.txt").read_text().splitlines()]
    bad = root / "images" / next(path for image_id, path in images if split[image_id] == "1")  # a training image
    bad.write_bytes(bad.read_bytes()[:300])
    errors = []
    for workers in (0, 1):
        code = main(["train", *tiny_overrides(f"data.root={root}", f"data.num_workers={workers}", "train.epochs=1")])
        assert code == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"ivpt train: error: cannot decode image '{bad}': ") and errors[0].count("\n") == 1


def test_tensorboard_scalars_are_written(tiny_config) -> None:
    pytest.importorskip("tensorboard")
    cfg = tiny_config("train.tensorboard=true", "train.max_steps=1", "train.epochs=1")
    train(cfg, resume=None)
    events = list((Path(cfg.train.out_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert json.loads((Path(cfg.train.out_dir) / "log.jsonl").read_text().splitlines()[0])["event"] == "start"


def test_data_initialised_prototypes_start_from_the_tokens_and_survive_a_resume(tiny_config, tmp_path: Path) -> None:
    # Prototypes frozen (rate 0) so that the checkpoint shows where they started.
    frozen = ("optim.lr_prototypes=0", "train.max_steps=1", "train.epochs=1")
    train(tiny_config(f"train.out_dir={tmp_path / 'random'}", *frozen), resume=None)
    train(tiny_config(f"train.out_dir={tmp_path / 'data'}", "train.prototype_init=data", *frozen), resume=None)
    random_state, data_state = model_state(tmp_path / "random" / "last.pt"), model_state(tmp_path / "data" / "last.pt")
    notes = [r["message"] for r in read_log(tmp_path / "data" / "log.jsonl") if r["event"] == "note"]
    assert "prototypes initialised from the tokens of 24 training images (prototype_init)" in notes
    keys = [key for key in data_state if key.endswith("prototypes")]
    assert keys
    for key in keys:
        # N(0, 0.05^2) draws in 32 dimensions have a norm near 0.28; the tokens' centroids are LayerNorm outputs.
        assert random_state[key].norm(dim=1).max() < 0.6
        assert data_state[key].norm(dim=1).min() > 1.0, key

    # A resumed run keeps its checkpoint's prototypes: one run of two epochs equals one epoch plus a resume.
    straight = tiny_config(f"train.out_dir={tmp_path / 'straight'}", "train.prototype_init=data")
    train(straight, resume=None)
    split_run = tiny_config(f"train.out_dir={tmp_path / 'split'}", "train.prototype_init=data", "train.epochs=1")
    train(split_run, resume=None)
    split_run.train.epochs = 2
    train(split_run, resume="auto")
    assert_same_weights(model_state(tmp_path / "straight" / "last.pt"), model_state(tmp_path / "split" / "last.pt"))


def test_data_initialised_prototypes_need_prototype_stages(tiny_config) -> None:
    with pytest.raises(ConfigError, match="'train.prototype_init'.*'vpt_deep' has no prototype stages"):
        tiny_config("model.method=vpt_deep", "train.prototype_init=data")
