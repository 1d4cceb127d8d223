"""Click to image in `easyref serve`, beside the generation's own time, in headless Chromium.

    python benchmarks/serve_latency.py [--repeats 5] [--screenshot examples/serve.png] [MODEL FLAGS...]

Starts `easyref serve` (the bundled model unless model flags follow), loads the demo group (the pick group's
star prompt, compared with nothing) from the examples row, and for each setting clicks Generate `--repeats`
times, timing from the click to the last output image shown in the page. The page's status line gives the
server's own time for the same request (reading the references, denoising, writing the PNGs), so the
difference is what the page, the queue and the transfers add. Prints a markdown table; with --screenshot,
loads the examples row's first example (which ticks "Compare without references"), generates
`SCREENSHOT_IMAGES` images and saves the page.
Needs the `ui` and `dev` extras and Debian's chromium.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from easyref.shapes.data import demo_group, demo_prompts

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTINGS = [(30, 1), (30, 4)]  # (steps, images)
SCREENSHOT_IMAGES = 2  # each beside its twin made without the references


def start_server(model_flags: list[str], folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "easyref", "serve", "--port", str(port), *model_flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"easyref serve did not start:\n{(folder / 'server.log').read_text()}")


def set_number(page, elem_id: str, value: int) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(20):
        field.fill(str(value))
        field.press("Tab")
        page.wait_for_timeout(100)
        if field.input_value() == str(value):
            return
    sys.exit(f"could not set {elem_id} to {value}")


DONE = """([old, count]) => {
  const status = document.querySelector('#status').innerText;
  const images = [...document.querySelectorAll('#outputs img')];
  return /in [\\d.]+ s, seed \\d+/.test(status) && images.length === count
      && images.every(i => i.complete && i.naturalWidth > 0 && !old.includes(i.src));
}"""


def click_to_image(page, count: int) -> tuple[float, float]:
    """Seconds from the click to `count` new images shown in the page, and the server's own seconds."""
    old = page.evaluate("[...document.querySelectorAll('#outputs img')].map(i => i.src)")
    started = time.perf_counter()
    page.click("#generate")
    page.wait_for_function(DONE, arg=[old, count], timeout=600_000, polling="raf")
    total = time.perf_counter() - started
    server = float(re.search(r"in ([\d.]+) s", page.inner_text("#status")).group(1))
    return total, server


def screenshot(page, path: Path) -> None:
    """The page with the examples row's first example loaded and generated, its fade-in done."""
    page.locator("#examples tbody tr").first.click()
    page.wait_for_selector("#reference-status:has-text('3 references ready')")
    set_number(page, "num-images", SCREENSHOT_IMAGES)
    compared = 2 if page.is_checked("#compare input") else 1
    click_to_image(page, compared * SCREENSHOT_IMAGES)
    page.wait_for_timeout(2000)
    page.screenshot(path=str(path), full_page=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshot", type=Path)
    args, model_flags = parser.parse_known_args()
    chromium = shutil.which("chromium") or sys.exit("needs Debian's chromium (apt-get install chromium)")
    folder = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    proc, url = start_server(model_flags, folder)
    rows = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_text(demo_prompts(demo_group())[0], exact=True).click()
            page.wait_for_selector("#reference-status:has-text('3 references ready')")
            page.click("text=Settings")
            for steps, count in SETTINGS:
                set_number(page, "steps", steps)
                set_number(page, "num-images", count)
                click_to_image(page, count)  # warm-up: first-call costs are not the steady state
                runs = [click_to_image(page, count) for _ in range(args.repeats)]
                total = statistics.median(r[0] for r in runs)
                server = statistics.median(r[1] for r in runs)
                rows.append((steps, count, total, server))
            if args.screenshot:
                screenshot(page, args.screenshot)
            browser.close()
    finally:
        proc.terminate()
        proc.wait()
    print(f"| steps | images | click to image (s, median of {args.repeats}) | server's own (s) | page overhead |")
    print("|---|---|---|---|---|")
    for steps, count, total, server in rows:
        print(f"| {steps} | {count} | {total:.2f} | {server:.2f} | {total - server:.2f} s ({total / server:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
