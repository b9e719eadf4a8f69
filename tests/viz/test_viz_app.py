"""``ivpt app`` (ivpt.app, the browser front end of the explanations): the session, the page's pieces, the
command line, and the page itself driven in headless Chromium."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import ipaddress
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ivpt.app.session import ExplorerSession, concept_names, load_model
from ivpt.app.ui import disable_request, format_probability, gallery_choices, parts_html, prediction_html
from ivpt.errors import CheckpointError, IVPTError
from ivpt.viz.explain import explain, explanation_record

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SRC = Path(__file__).resolve().parents[2] / "src"
# Gradio's queue still calls pandas options that pandas 3 deprecates; nothing of ours.
GRADIO_PANDAS_WARNINGS = ("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")


@pytest.fixture
def session(make_checkpoint: Callable[..., Path]) -> ExplorerSession:
    """The tiny untrained model (n_pro (6, 5, 4), 4 classes) with the synthetic test split."""
    return ExplorerSession(load_model(make_checkpoint(), device="cpu"), top_k=3, progress=False)


def test_session_lists_the_test_images_and_explains_them_like_the_api(session: ExplorerSession) -> None:
    dataset = session.dataset
    choices = session.test_image_choices()
    assert len(choices) == len(dataset) == session.num_test_images == 32
    label, position = choices[5]
    assert position == 5
    assert label == f"5: {dataset.class_names[dataset.labels[5]]} ({dataset.image_path(5).name})"
    loaded = session.loaded
    direct = explain(loaded.model, dataset[5]["image"], cfg=loaded.cfg, class_names=loaded.class_names)
    via_app = session.explain(session.test_image(5), {"parts": [1]})
    assert via_app["intervention"]["before"]["predicted"] == direct["predicted"]
    with pytest.raises(IVPTError, match="test image 32 does not exist; there are 32"):
        session.test_image(32)


def test_gallery_shows_the_report_statistics_of_a_concept(session: ExplorerSession) -> None:
    strip, facts = session.gallery(0, 2)
    stats = session.statistics()
    assert session.statistics() is stats  # one pass over the test set, then cached
    assert facts["label"] == "s1:c2"
    assert facts["mean_area"] == pytest.approx(float(stats.mean_area[0][2]))
    assert facts["presence"] == pytest.approx(float(stats.presence[0][2]))
    # stage 1 groups into the final parts; the feeds are its mean grouping row, strongest first, >= 0.1
    row = stats.mean_grouping[0][2]
    expected = [(f"part {t}", float(row[t])) for t in np.argsort(-row, kind="stable") if row[t] >= 0.1]
    assert facts["feeds"] == expected and expected
    if strip is not None:  # three thumbnails side by side, each 96 px plus a 4 px frame, with 4 px gaps
        assert strip.shape == (104, 3 * 104 + 2 * 4, 3) and strip.dtype == np.uint8
    _, background = session.gallery(2, 3)
    assert background["label"] == "background" and background["feeds"] == []
    with pytest.raises(IVPTError, match=r"concept 4 of stage 3 does not exist \(prototypes \(6, 5, 4\)\)"):
        session.gallery(2, 4)


def test_session_without_its_data_works_on_uploads_only(
    make_checkpoint: Callable[..., Path], tmp_path: Path, synthetic_root: Path
) -> None:
    shutil.copytree(synthetic_root, tmp_path / "moved")
    checkpoint = make_checkpoint(f"data.root={tmp_path / 'moved'}")
    shutil.rmtree(tmp_path / "moved")
    session = ExplorerSession(load_model(checkpoint, device="cpu"), progress=False)
    assert session.dataset is None and session.test_image_choices() == []
    assert f"'{tmp_path / 'moved'}' is not here (pass --data ROOT)" in session.data_note
    with pytest.raises(IVPTError, match="concept galleries need the test set"):
        session.gallery(0, 0)
    result = session.explain(Image.new("RGB", (40, 30), (200, 30, 30)))
    assert result["predicted"]["name"] in session.loaded.class_names


def test_session_rejects_a_data_set_of_another_model(
    make_checkpoint: Callable[..., Path], tmp_path: Path, synthetic_root: Path
) -> None:
    from ivpt.data import make_synthetic

    other = tmp_path / "other"
    make_synthetic(other, num_classes=3, per_class=4, size=32, seed=1)
    loaded = load_model(make_checkpoint(), device="cpu")
    with pytest.raises(IVPTError, match=r"classifies 4 classes but the data set at '.*other' has 3"):
        ExplorerSession(loaded, other)


def test_an_exported_folder_serves_like_its_checkpoint(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    from ivpt.model.pretrained import export_checkpoint

    checkpoint = make_checkpoint()
    folder = export_checkpoint(checkpoint, tmp_path / "exported")
    from_file = ExplorerSession(load_model(checkpoint, device="cpu"), progress=False)
    from_folder = ExplorerSession(load_model(folder, device="cpu"), progress=False)
    assert from_folder.loaded.source == str(folder) and from_folder.num_test_images == 32
    image = from_file.test_image(7)
    # the same weights: the same numbers
    served, stored = (explanation_record(s.explain(image, {"parts": [0]})) for s in (from_folder, from_file))
    assert served == stored


def test_load_model_names_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=str(tmp_path / "empty")):
        (tmp_path / "empty").mkdir()
        load_model(tmp_path / "empty")


def test_page_pieces_show_the_explanation_numbers(session: ExplorerSession) -> None:
    result = session.explain(session.test_image(0), {"parts": [1], "stage2": [0, 3]})
    page = prediction_html(result)
    after, before = result["intervention"]["after"], result["intervention"]["before"]
    assert f"<span id='ivpt-now-probability'>{format_probability(after['predicted']['probability'])}</span>" in page
    assert f"<span id='ivpt-before-probability'>{format_probability(before['predicted']['probability'])}</span>" in page
    original = format_probability(after["original_class"]["probability"])
    assert f"<span id='ivpt-original-probability'>{original}</span>" in page
    assert "<span id='ivpt-disabled'>parts 1; stage2 0, 3</span>" in page
    assert page.count("<tr>") == 1 + len(result["top5"])
    shares = parts_html(result, session.palette[-1])
    assert "<span id='ivpt-part-1'>off</span>" in shares
    for part in (0, 2):
        assert f"<span id='ivpt-part-{part}'>{result['parts'][part]['contribution']:+.3f}</span>" in shares
    plain = prediction_html(session.explain(session.test_image(0), {}))
    assert "<span id='ivpt-disabled'>nothing</span>" in plain and "ivpt-before" not in plain


def test_page_escapes_class_names() -> None:
    entry = {"index": 0, "name": "<b>a&b</b>", "probability": 0.5, "logit": 1.0}
    page = prediction_html({"predicted": entry, "top5": [entry]})
    assert "&lt;b&gt;a&amp;b&lt;/b&gt;" in page and "<b>a&b</b>" not in page


def test_ticked_boxes_become_a_disable_request() -> None:
    assert disable_request([2, 0], [[5], None, []]) == {"parts": [2, 0], "stage1": [5], "stage2": [], "stage3": []}
    assert concept_names((3, 2)) == [["s1:c0", "s1:c1", "background"], ["part 0", "background"]]


def test_gallery_choices_cover_every_concept(session: ExplorerSession) -> None:
    choices = gallery_choices(session)
    assert len(choices) == 6 + 5 + 4
    assert choices[0] == ("s1:c0", "0:0") and choices[5] == ("stage 1 background", "0:5")
    assert choices[-1] == ("final background", "2:3") and choices[-2] == ("part 2", "2:2")


def test_cli_app_without_gradio_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ivpt.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets when it is not installed
    # checked before anything else: the checkpoint is not even looked at
    assert main(["app", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip() == (
        "ivpt app: error: ivpt app needs gradio, an optional extra: pip install 'ivpt[app]'"
    )


def _module_level_imports(tree: ast.Module) -> Iterator[str]:
    """Modules a file imports when it is imported (function bodies and ``if TYPE_CHECKING:`` left out)."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody


def test_the_package_imports_gradio_only_when_the_app_is_built() -> None:
    eager = []
    for path in sorted((SRC / "ivpt").rglob("*.py")):
        for name in _module_level_imports(ast.parse(path.read_text())):
            if name.split(".")[0] in ("gradio", "selenium"):
                eager.append(f"{path.relative_to(SRC)}: {name}")
    assert eager == []
    sample = "import a\nif TYPE_CHECKING:\n    import b\ndef f():\n    import c\n"
    assert list(_module_level_imports(ast.parse(sample))) == ["a"]


def test_cli_app_names_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gradio", reason="the app's extra is not installed (pip install 'ivpt[app]')")
    from ivpt.cli import main

    assert main(["app", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert f"checkpoint '{tmp_path / 'missing.pt'}' does not exist" in capsys.readouterr().err


# --- the page in a real browser -------------------------------------------------------------------------


def _browser_missing() -> str | None:
    for module, extra in (("gradio", "ivpt[app]"), ("selenium", "ivpt[test]")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install '{extra}')"
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return "chromium and its driver are not installed (apt-get install -y chromium chromium-driver)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _is_local(address: Any) -> bool:
    if not isinstance(address, tuple):  # a Unix socket path
        return True
    host = str(address[0])
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _only_loopback(attempts: list[str]) -> Iterator[None]:
    """Refuse (and record) every connection or name lookup of this process that leaves the machine."""
    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if not _is_local(address):
            attempts.append(f"connect {address}")
            raise OSError(f"test: no network ({address})")
        return connect(sock, address)

    def guarded_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_local((host, 0)):
            attempts.append(f"lookup {host}")
            raise socket.gaierror(f"test: no network ({host})")
        return lookup(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_lookup  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect, socket.getaddrinfo = connect, lookup  # type: ignore[method-assign]


def chromium_driver(profile: str, height: int = 1600) -> Any:
    """Selenium on Debian's headless Chromium, offline, with a fresh profile folder (also the screenshot
    script's browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size=1400,{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.mark.slow
@pytest.mark.filterwarnings(*GRADIO_PANDAS_WARNINGS)
def test_app_in_chromium_shows_the_api_numbers_offline(
    session: ExplorerSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upload an image, read the class, switch the top part off: the page shows what ivpt.explain returns."""
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from ivpt.app.ui import launch_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)  # the app must switch it off itself
    image_file = session.dataset.image_path(3)
    loaded = session.loaded
    api_plain = explain(loaded.model, image_file, cfg=loaded.cfg, class_names=loaded.class_names)
    top_part = max(api_plain["parts"], key=lambda p: p["contribution"])["part"]
    api = explain(
        loaded.model, image_file, cfg=loaded.cfg, class_names=loaded.class_names, disable={"parts": [top_part]}
    )
    after = api["intervention"]["after"]
    # the intervention must show at the page's precision, or the comparison below proves little
    assert format_probability(after["original_class"]["probability"]) != format_probability(
        api_plain["predicted"]["probability"]
    )

    attempts: list[str] = []
    with _only_loopback(attempts), tempfile.TemporaryDirectory() as profile:
        running = launch_app(session, port=free_port(), block=False)
        driver = None
        try:
            assert running.url.startswith("http://127.0.0.1:")
            assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and running.page.analytics_enabled is False
            driver = chromium_driver(profile)
            wait = WebDriverWait(driver, 30)
            driver.get(running.url)
            upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ivpt-upload input[type=file]"))
            upload.send_keys(str(image_file))
            shown = wait.until(lambda d: d.find_element(By.ID, "ivpt-now-class"))
            assert shown.text == api_plain["predicted"]["name"]
            probability = driver.find_element(By.ID, "ivpt-now-probability").text
            assert probability == format_probability(api_plain["predicted"]["probability"])

            box = driver.find_element(By.ID, "ivpt-disable-parts")
            [label] = [e for e in box.find_elements(By.TAG_NAME, "label") if e.text.strip() == f"part {top_part}"]
            label.click()
            wait.until(lambda d: d.find_element(By.ID, "ivpt-disabled").text == f"parts {top_part}")
            assert driver.find_element(By.ID, "ivpt-now-class").text == after["predicted"]["name"]
            shown_now = driver.find_element(By.ID, "ivpt-now-probability").text
            assert shown_now == format_probability(after["predicted"]["probability"])
            shown_original = driver.find_element(By.ID, "ivpt-original-probability").text
            assert shown_original == format_probability(after["original_class"]["probability"])
            assert driver.find_element(By.ID, f"ivpt-part-{top_part}").text == "off"

            driver.find_element(By.ID, "ivpt-reset").click()  # back to the plain model
            wait.until(lambda d: d.find_element(By.ID, "ivpt-disabled").text == "nothing")
            assert driver.find_element(By.ID, "ivpt-now-probability").text == probability
            assert not label.find_element(By.TAG_NAME, "input").is_selected()

            # everything the page loaded came from the app itself: no CDN, no web font service
            loaded_urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            assert loaded_urls and all(url.startswith(running.url) for url in loaded_urls), loaded_urls
        finally:
            if driver is not None:
                driver.quit()
            running.close()
    assert attempts == []
