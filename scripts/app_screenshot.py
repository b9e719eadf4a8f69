"""Screenshot of ``ivpt app`` for the docs: a test image with its most contributing part switched off.

    python scripts/app_screenshot.py runs/demo/ivpt/best.pt docs/app_screenshot.png [--position 0]

Serves the app on a free local port, opens it in headless Chromium (Debian's /usr/bin/chromium and
/usr/bin/chromedriver, set up as in the browser test), uploads the test image at ``--position``, ticks the part
with the largest share, waits for the page to redraw and saves a PNG of the top of the page, scaled to
``--width`` pixels. Needs ``pip install '.[test]'``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ivpt.app import ExplorerSession, launch_app, load_model

# The browser test's own Chromium set-up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "viz"))
from test_viz_app import chromium_driver, free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--position", type=int, default=0, help="test image to show (default 0)")
    parser.add_argument("--width", type=int, default=1100, help="width of the saved PNG (default 1100)")
    parser.add_argument("--height", type=int, default=1450, help="page height captured, in browser pixels")
    args = parser.parse_args()

    session = ExplorerSession(load_model(args.checkpoint, device="cpu"), progress=False)
    image_file = session.dataset.image_path(args.position)
    plain = session.explain(image_file)
    top_part = max(plain["parts"], key=lambda p: p["contribution"])["part"]
    running = launch_app(session, port=free_port(), block=False)
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium_driver(profile, height=args.height)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(running.url)
            # The browser takes absolute paths only (the checkpoint's data root may be relative).
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ivpt-upload input[type=file]")).send_keys(
                str(Path(image_file).resolve())
            )
            wait.until(lambda d: d.find_element(By.ID, "ivpt-now-class"))
            figure = "return document.querySelector('#ivpt-figure img')?.src || ''"
            wait.until(lambda d: d.execute_script(figure))
            before = driver.execute_script(figure)
            box = driver.find_element(By.ID, "ivpt-disable-parts")
            [label] = [e for e in box.find_elements(By.TAG_NAME, "label") if e.text.strip() == f"part {top_part}"]
            label.click()
            wait.until(lambda d: d.execute_script(figure) not in ("", before))
            wait.until(lambda d: d.execute_script("return document.querySelector('#ivpt-figure img').complete"))
            shot = Path(tempfile.mkdtemp()) / "page.png"
            driver.save_screenshot(str(shot))
            print(driver.find_element(By.ID, "ivpt-prediction").text)
        finally:
            driver.quit()
            running.close()
    with Image.open(shot) as page:
        scaled = page.convert("RGB").resize((args.width, round(page.height * args.width / page.width)), Image.LANCZOS)
        scaled.quantize(colors=256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
