"""Retake ``docs/app.png``: the page of ``impure app`` with the embedded purifier, in headless Chromium.

    python docs/screenshot_app.py [--model NAME_OR_PATH] [--out docs/app.png]

Serves the page (``impure_hf.app.build_app``, the embedded model unless ``--model``), attacks the first
packaged photo (chelsea, a cat) with PGD at 16/255 and saves a full-page screenshot. Needs the app
extra and the distribution's Chromium (the same set-up as the browser test in tests/test_app.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from pathlib import Path

from impure_hf._utils import atomic_write_bytes
from impure_hf.app import build_app

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="purifier (default: the embedded model)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("app.png")))
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    chromium = os.environ.get("IMPURE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium found: apt-get install -y chromium (or IMPURE_CHROMIUM=PATH)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(args.model, device="cpu", dtype="fp32")
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS, viewport={"width": 1500, "height": 1000}
            )
            page = browser.new_page()
            page.set_default_timeout(300_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#attack-photos button.gallery-item").first.click()
            page.locator("#attack-input img").wait_for()
            page.locator("#attack-eps textarea").fill("16/255")
            page.locator("#attack-run").click()
            for box in ("#clean-image", "#adversarial-image", "#purified-image"):
                page.locator(f"{box} img").wait_for()
            expect(page.locator("#attack-seconds")).to_contain_text("attack (pgd)")
            with tempfile.TemporaryDirectory() as tmp:
                shot = Path(tmp) / "app.png"
                page.screenshot(path=shot, full_page=True)
                atomic_write_bytes(Path(args.out), shot.read_bytes())
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
