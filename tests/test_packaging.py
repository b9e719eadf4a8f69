"""The built wheel, installed away from the checkout: presets by name, the shipped assets, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRESETS = {p.name for p in (REPO / "src" / "ivpt" / "configs").glob("*.yaml")}

# Runs the installed package with the checkout's src/ (the editable install's path entry) removed from
# sys.path, so that only the wheel's files can be imported.
_ISOLATE = """
import sys
sys.path[:] = [{target!r}] + [p for p in sys.path if not p.rstrip('/').endswith('/src')]
import ivpt
assert ivpt.__file__.startswith({target!r}), ivpt.__file__
"""
_CLI = "from ivpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
# A user's first lines after training: load the exported folder, predict and explain one image, save again.
_PYTHON_USER = """
import json
from PIL import Image
model = ivpt.from_pretrained("exported")
image = Image.open(sys.argv[1])
logits = model(ivpt.transforms_for(model)(image)[None]).logits
info = ivpt.explain(model, image)
ivpt.save_pretrained(model, "saved")
again = ivpt.from_pretrained("saved")
same = bool((again(ivpt.transforms_for(again)(image)[None]).logits == logits).all())
print(json.dumps({"predicted": int(logits.argmax()), "explained": info["predicted"]["index"], "same": same}))
"""


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(wheel, target)``: the package built from a copy of the tracked files, installed into ``target``."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "dist"), str(source)],
                   check=True, capture_output=True)
    (wheel,) = (base / "dist").glob("ivpt-*.whl")
    target = base / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return wheel, target


@pytest.mark.slow
def test_wheel_carries_the_presets_and_the_demo_backbone_but_no_tests(installed_wheel):
    wheel, _ = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert {Path(n).name for n in names if n.startswith("ivpt/configs/")} == PRESETS
    assert "ivpt/assets/ivpt_demo_vit.safetensors" in names
    assert not [n for n in names if n.startswith("tests/")]
    assert any(n.endswith("entry_points.txt") for n in names)


@pytest.mark.slow
def test_installed_package_trains_a_preset_by_name_from_another_directory(installed_wheel, synthetic_root, tmp_path):
    _, target = installed_wheel
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    isolate = _ISOLATE.format(target=str(target))
    command = [
        sys.executable, "-c", isolate + _CLI, "train", "-c", "synthetic_tiny",
        f"data.root={synthetic_root}", "data.val_fraction=0.25", "train.epochs=1", "train.max_steps=2",
        "train.batch_size=4", "train.progress=false", "train.test_at_end=false", "train.out_dir=run",
        "model.n_pro=[4,3]",
    ]
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (workdir / "run" / "last.pt").is_file() and (workdir / "run" / "config.yaml").is_file()
    assert "arch: ivpt_demo_vit" in (workdir / "run" / "config.yaml").read_text()

    export = [sys.executable, "-c", isolate + _CLI, "export", "--checkpoint", "run/last.pt", "--out", "exported"]
    proc = subprocess.run(export, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in (workdir / "exported").iterdir()} == {"config.json", "model.safetensors"}

    image = next((synthetic_root / "images").rglob("*.jpg"))
    user = [sys.executable, "-c", isolate + _PYTHON_USER, str(image)]
    proc = subprocess.run(user, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["predicted"] == result["explained"] and result["same"] is True
