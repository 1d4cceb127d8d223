"""`easyref serve`: the command's checks, the page's API through gradio_client, and the page itself in a
real browser (Debian's headless Chromium driven by playwright), all against one `easyref serve` started
as a user would start it, on the bundled model and a free localhost port.

Without Chromium the browser test is skipped outside CI only; `.ci/run` installs it, so CI runs it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import bomb_png
from PIL import Image

from easyref.cli import main
from easyref.explain import label_sizes
from easyref.shapes.data import demo_examples, demo_group, demo_prompts, write_demo_references

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags a closed network needs: without the background-networking ones Chromium keeps dialling out
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STAR, SQUARE = demo_prompts(demo_group())
SUBJECT = demo_examples()[0]  # the examples row's first: one subject, compared with and without references


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(image_bytes: bytes) -> dict:
    with Image.open(io.BytesIO(image_bytes)) as image:
        return json.loads(image.info["easyref"])


def pixels(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "out" / "private").mkdir(parents=True)
    (root / "out" / "notes.txt").write_text("a secret")  # put there by someone else: the page must not serve it
    (root / "out" / "private" / "key.txt").write_text("another secret")
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(root / "gradio-cache")}
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "easyref",
                "serve",
                "--port",
                str(port),
                "--out-dir",
                str(root / "out"),
                "--device",
                "cpu",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"easyref serve did not start:\n{log.read_text()}")
            time.sleep(0.5)
    yield SimpleNamespace(url=url, out=root / "out", proc=proc, log=log, refs=write_demo_references(root / "refs"))
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------- the command
def test_serve_needs_gradio_and_says_how_to_get_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["serve"]) == 2
    assert "pip install 'easyref[ui]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--host", "no such host.invalid"], "is not an address or name this machine can resolve"),
    ],
)
def test_serve_refuses_bad_addresses_before_loading(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_a_taken_port_and_a_file_as_out_dir(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "choose another --port" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["serve", "--out-dir", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the API
def generate(client, refs, prompt=STAR, steps=4, seed=11, random_seed=False, count=2, side=64, scale=1.0, **later):
    """The API as its first callers call it (11 values); `later`: the inputs added since (compare, scheduler)."""
    from gradio_client import handle_file

    return client.predict(
        [handle_file(str(p)) for p in refs],
        prompt,
        "",
        scale,
        steps,
        5.0,
        seed,
        random_seed,
        count,
        side,
        side,
        **later,
        api_name="/generate",
    )


def test_api_writes_the_pngs_generate_writes_compared_and_zipped(server, tmp_path, monkeypatch):
    from gradio_client import Client

    client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
    images, files, explained, seed, status = generate(client, server.refs, count=3, compare=True)
    assert seed == 11 and "3 images with references and 3 without" in status and "seed 11" in status
    assert [item["caption"] for item in images[:2]] == ["with references (scale 1)", "without (scale 0)"]
    shown, twins = [Path(item["image"]) for item in images[::2]], [Path(item["image"]) for item in images[1::2]]
    for index, (path, twin) in enumerate(zip(shown, twins)):
        rec = record(path.read_bytes())
        assert (rec["prompt"], rec["seed"], rec["steps"], rec["num_images"], rec["index"]) == (STAR, 11, 4, 3, index)
        assert (rec["guidance"], rec["scale"], rec["width"], rec["height"]) == (5.0, 1.0, 64, 64)
        assert {**rec, "scale": 0.0} == record(twin.read_bytes()), "the twin: the same settings but the scale"
        assert not np.array_equal(pixels(path), pixels(twin))
        kept = list(server.out.glob(f"*/{path.name}"))
        assert any(k.read_bytes() == path.read_bytes() for k in kept), "the download is the file the server wrote"
    names = [
        *(f"easyref_{i}.png" for i in range(3)),
        "easyref_explain.png",
        *(f"easyref_scale0_{i}.png" for i in range(3)),
    ]
    assert [Path(f).name for f in files[1:]] == names and Path(files[0]).suffix == ".zip"
    with zipfile.ZipFile(files[0]) as archive:  # one download for the batch: the same files, byte for byte
        assert archive.namelist() == names
        assert all(archive.read(Path(f).name) == Path(f).read_bytes() for f in files[1:])
    assert record(Path(explained).read_bytes())["explain"] is True
    # without references is what the model makes at scale 0, where nothing of the reference path runs
    plain = generate(client, server.refs, count=3, scale=0.0)[0]
    for twin, alone in zip(twins, plain):
        np.testing.assert_array_equal(pixels(twin), pixels(Path(alone["image"])))
    # the record names the server's copies of the references: the CLI makes the same pixels from it, though
    # the page drew the explain sheet and the CLI does not
    monkeypatch.chdir(tmp_path)
    for index, path in enumerate((shown[0], twins[1], shown[2])):
        assert main(["generate", "--from-metadata", str(path), "--out", f"again{index}.png"]) == 0
        np.testing.assert_array_equal(pixels(tmp_path / f"again{index}.png"), pixels(path))


def test_api_scheduler_choice_changes_the_image_and_the_default_does_not(server, tmp_path, monkeypatch):
    from gradio_client import Client

    client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
    made = {name: generate(client, server.refs, count=1, scheduler=name) for name in ("default", "ddim", "euler")}
    again = generate(client, server.refs, count=1)  # after another scheduler: the model's own again
    first, ddim, euler, again = (Path(r[0][0]["image"]) for r in (*made.values(), again))
    np.testing.assert_array_equal(pixels(first), pixels(again))
    np.testing.assert_array_equal(pixels(first), pixels(euler))  # the bundled model's own is Euler
    assert not np.array_equal(pixels(first), pixels(ddim))
    # the choice is `generate --scheduler`'s, recorded as it records it: the CLI makes the same pixels
    schedulers = [record(path.read_bytes())["scheduler"] for path in (first, ddim, euler, again)]
    assert schedulers == ["default", "ddim", "euler", "default"]
    download = Path(made["ddim"][1][1])  # the files list: the zip, then the PNG
    assert download.name == "easyref.png" and download.read_bytes() == ddim.read_bytes()
    monkeypatch.chdir(tmp_path)
    for name, path in (("ddim", download), ("euler", euler)):
        assert main(["generate", "--from-metadata", str(path), "--out", f"again-{name}.png"]) == 0
        np.testing.assert_array_equal(pixels(tmp_path / f"again-{name}.png"), pixels(path))


def call_raw(url: str, data: list) -> str:
    """gradio's two-step HTTP API: post the inputs, then read the event stream of the result."""
    body = json.dumps({"data": data}).encode()  # ASCII: a lone surrogate travels as its escape
    request = urllib.request.Request(
        f"{url}gradio_api/call/generate", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/generate/{event}", timeout=60) as response:
        return response.read().decode()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_page_serves_only_the_files_a_request_made(server, tmp_path):
    from gradio_client import Client

    client = Client(server.url, verbose=False, download_files=False)
    images, files, explained, _, _ = generate(client, server.refs, count=2)
    handed = [item["image"] for item in images] + files + [explained]
    assert all(http_status(item["url"]) == 200 for item in handed)
    made = sorted(server.out.glob("*/easyref_*.png"))
    (made[0].parent / "later.txt").write_text("written into a request's folder while serving")
    (server.out / "link.png").symlink_to(server.out / "notes.txt")
    private = [
        server.out / "notes.txt",
        server.out / "private" / "key.txt",
        made[0].parent / "later.txt",
        server.out / "link.png",
        made[0],  # the output folder is never served itself, only each request's own copies
        made[0].parent / "references" / sorted(p.name for p in (made[0].parent / "references").iterdir())[0],
        Path(handed[0]["path"]).parent.parent / "..",
    ]
    for path in private:
        assert http_status(f"{server.url}gradio_api/file={os.path.abspath(path)}") == 403, path
    # one request's hand-out folder is named at random: its neighbours cannot be guessed from it
    assert re.fullmatch(r"[0-9a-f]{32}", Path(handed[0]["path"]).parent.name)


def test_links_planted_in_the_output_folder_are_never_written_through(server, tmp_path):
    from gradio_client import Client

    victim = tmp_path / "victim"
    victim.mkdir()
    now = time.time()
    # every name a request folder of the form TIME-NUMBER could take in the next seconds, as a link out
    for second in range(6):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now + second))
        for number in range(1, 40):
            (server.out / f"{stamp}-{number:04d}").symlink_to(victim, target_is_directory=True)
    client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
    assert generate(client, server.refs, count=1)[4].startswith("1 image")
    assert not list(victim.iterdir())
    made = [p for p in server.out.glob("*/easyref.png") if not p.parent.is_symlink()]
    assert made and all(re.fullmatch(r"\d{8}-\d{6}-\d{4}-\w+", p.parent.name) for p in made)
    for link in server.out.glob("*"):
        if link.is_symlink():
            link.unlink()


def test_a_cancelled_request_stops_and_the_next_is_unaffected(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
    before = generate(client, server.refs, count=2, seed=5)
    folders = set(server.out.iterdir())
    long = client.submit(
        [handle_file(str(p)) for p in server.refs], STAR, "", 1.0, 100, 5.0, 3, False, 8, 64, 64, api_name="/generate"
    )
    wait_for_denoising(long)
    long.cancel()
    after = generate(client, server.refs, count=2, seed=5)  # as the cancelled one's orphan would have overlapped it
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(pixels(Path(a["image"])), pixels(Path(b["image"])))
    assert len(set(server.out.iterdir()) - folders) == 1, "the cancelled request wrote nothing"
    assert "request cancelled" in server.log.read_text()


def wait_for_denoising(job, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(p.desc == "denoising" for p in job.status().progress_data or []):
        assert time.monotonic() < deadline, "the request never started denoising"
        time.sleep(0.05)


def test_api_random_seed_is_reported_and_reproduces(server, tmp_path):
    from gradio_client import Client

    client = Client(server.url, verbose=False, download_files=str(tmp_path))
    first = generate(client, server.refs, seed=0, random_seed=True, count=1)
    again = generate(client, server.refs, seed=first[3], random_seed=False, count=1)
    assert "seed" in first[4] and str(first[3]) in first[4]
    np.testing.assert_array_equal(pixels(Path(first[0][0]["image"])), pixels(Path(again[0][0]["image"])))


def test_api_refuses_bad_requests_in_one_line_and_keeps_serving(server, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "notes.png").write_text("not a picture either, whatever its name says")
    (tmp_path / "cut.png").write_bytes(server.refs[0].read_bytes()[:100])
    cases = {
        "Invalid file type": [*server.refs[:2], tmp_path / "notes.txt"],  # gradio's check of the name
        "notes.png is not an image PIL can read": [*server.refs[:2], tmp_path / "notes.png"],  # ours, of the bytes
        "cut.png is damaged or truncated": [server.refs[0], tmp_path / "cut.png"],
        "no reference images": [],
        "29 references given; this model takes at most 28": [server.refs[0]] * 29,
    }
    for message, refs in cases.items():
        with pytest.raises(AppError, match=re.escape(message)):
            generate(client, refs, count=1)
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(AppError, match=re.escape("bomb.png is 9000 x 9000 = 81.0 M pixels")):
        generate(client, [server.refs[0], tmp_path / "bomb.png"], count=1)
    # a lone surrogate (JSON can hold one; gradio_client cannot send it), through gradio's plain HTTP API
    assert "prompt is not valid UTF-8" in call_raw(
        server.url, [[], "a caf\udce9 star", "", 1, 4, 5, 1, False, 1, 64, 64, False, "default"]
    )
    with pytest.raises(AppError, match="prompt is 20000 characters long; at most 16384"):
        generate(client, server.refs, prompt="a" * 20_000)
    with pytest.raises(AppError, match="steps must be a whole number, got 2.5"):
        generate(client, server.refs, steps=2.5)
    assert generate(client, server.refs, count=1)[4].startswith("1 image")
    assert not list(server.out.glob("*/notes.*")), "a refused request writes nothing"


# ---------------------------------------------------------------------------- the page, in Chromium
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium on this machine (apt-get install chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's or number's box; retried, since a box typed into as it mounts is reset to its
    initial value."""
    from playwright.sync_api import expect

    field = page.locator(f"#{elem_id} input[type=number]")
    slider = page.locator(f"#{elem_id} input[type=range]")
    for _ in range(20):
        field.fill(str(value))
        field.press("Tab")
        page.wait_for_timeout(100)
        if field.input_value() == str(value) and (not slider.count() or slider.input_value() == str(value)):
            break
    expect(field).to_have_value(str(value))


# every element between an image and the page that could cut it: the image's box must lie inside each
CUT_PARTS = """(selector) => [...document.querySelectorAll(selector)].flatMap(img => {
  const box = img.getBoundingClientRect(), cut = [];
  for (let e = img.parentElement; e; e = e.parentElement) {
    const style = getComputedStyle(e);
    if (style.overflowX === 'visible' && style.overflowY === 'visible') continue;
    const r = e.getBoundingClientRect();
    if (box.left < r.left - 1 || box.right > r.right + 1 || box.top < r.top - 1 || box.bottom > r.bottom + 1)
      cut.push(`${img.src.split('/').pop()} cut by ${e.tagName}.${e.className}`);
  }
  return cut;
})"""
SHOWN = """(selector) => [...document.querySelectorAll(selector)].map(img => {
  const style = getComputedStyle(img), box = img.getBoundingClientRect();
  return {fit: style.objectFit, rendering: style.imageRendering, width: box.width, height: box.height,
          natural: [img.naturalWidth, img.naturalHeight], complete: img.complete};
})"""


def wait_for_images(page, selector: str, count: int) -> list[dict]:
    page.wait_for_function(
        "([s, n]) => { const i = [...document.querySelectorAll(s)]; return i.length === n && i.every(x => x.complete"
        " && x.naturalWidth > 0); }",
        arg=[selector, count],
    )
    return page.evaluate(SHOWN, selector)


def test_the_page_generates_explains_and_reports_bad_files(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(server.url)
    assert page.get_attribute("#references input[type=file]", "accept") == "image/*"  # the picker offers images
    Image.new("RGB", (200, 60), "navy").save(tmp_path / "wide.png")  # read whole by the model: shown whole
    page.locator("#references input[type=file]").set_input_files([*map(str, server.refs), str(tmp_path / "wide.png")])
    page.wait_for_selector("#reference-status:has-text('4 references ready')")
    wide = wait_for_images(page, "#preview img", 4)[3]
    assert wide["fit"] == "contain" and wide["natural"] == [200, 60]
    assert page.evaluate(CUT_PARTS, "#preview img") == []
    page.fill("#prompt textarea", STAR)
    page.click("text=Settings")
    assert not page.locator("#seed").is_visible(), "no seed is shown while it is drawn at random"
    set_number(page, "steps", 3)
    page.uncheck("#random-seed input")
    set_number(page, "seed", 21)
    # every output in view, at any count the page offers, with no scrolling inside the gallery
    for count in (4, 1, 8):
        set_number(page, "num-images", count)
        page.click("#generate")
        page.wait_for_selector(f"#status:has-text('{count} image{'s' if count > 1 else ''} in')", timeout=60_000)
        shown = wait_for_images(page, "#outputs img", count)
        assert page.evaluate(CUT_PARTS, "#outputs img") == [], count
        # 64 px images shown large, in crisp pixels
        assert all(s["rendering"] == "pixelated" and s["width"] >= 2 * s["natural"][0] for s in shown), shown
        if count == 4:
            sources = [img.get_attribute("src") for img in page.locator("#outputs img").all()]
            for index, src in enumerate(sources):
                rec = record(page.request.get(src).body())
                assert (rec["prompt"], rec["seed"], rec["steps"], rec["num_images"], rec["index"]) == (
                    STAR,
                    21,
                    3,
                    4,
                    index,
                )
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)

    page.get_by_role("tab", name="What it took from each reference").click()
    sheet = wait_for_images(page, "#explain img", 1)[0]
    assert record(page.request.get(page.locator("#explain img").get_attribute("src")).body())["explain"] is True
    # the shares are legible as the page shows the sheet: its text is not shrunk below 12 px
    shrunk = min(sheet["width"] / sheet["natural"][0], sheet["height"] / sheet["natural"][1])
    share_px, name_px = label_sizes(256)
    assert name_px * shrunk >= 12 and share_px * shrunk >= 20, (sheet, shrunk)

    (tmp_path / "notes.txt").write_text("not a picture")
    page.locator("#references input[type=file]").set_input_files([str(tmp_path / "notes.txt")])
    page.get_by_text("Invalid file type: notes.txt").first.wait_for()  # refused by the page, by its name
    (tmp_path / "notes.png").write_text("not a picture either")
    page.locator("#references input[type=file]").set_input_files([str(tmp_path / "notes.png")])
    page.wait_for_selector("#reference-status:has-text('notes.png is not an image PIL can read')")
    page.click("#generate")
    page.get_by_text("notes.png is not an image PIL can read").nth(1).wait_for()  # the refused request's message
    page.close()
    # a fresh page: the file box adds to what it holds
    page = browser.new_page()
    page.goto(server.url)
    (tmp_path / "bomb.png").write_bytes(bomb_png())  # 2 kB declaring 81 M pixels: refused from its header
    page.locator("#references input[type=file]").set_input_files([str(server.refs[0]), str(tmp_path / "bomb.png")])
    page.wait_for_selector("#reference-status:has-text('bomb.png is 9000 x 9000 = 81.0 M pixels')")
    page.close()


def open_with_example(context, url: str, prompt: str):
    page = context.new_page()
    page.goto(url)
    page.get_by_text(prompt, exact=True).click()
    page.wait_for_selector("#reference-status:has-text('3 references ready')")
    assert page.input_value("#prompt textarea") == prompt
    return page


def test_the_examples_row_loads_the_demo_groups_and_a_waiting_tab_sees_its_place(server, browser):
    # each tab in its own window: a background tab's input events wait for it to be shown
    first = open_with_example(browser.new_context(), server.url, SQUARE)
    assert not first.is_checked("#compare input")
    first.click("text=Settings")
    set_number(first, "steps", 100)
    set_number(first, "num-images", 6)
    first.click("#generate")
    first.get_by_text(re.compile(r"denoising")).first.wait_for(timeout=30_000)  # the per-step progress bar
    # the row: each example's references as a thumbnail, in demo_examples' order, the first compared
    second = open_with_example(browser.new_context(), server.url, SUBJECT.prompts[0])
    rows = sum(len(example.prompts) for example in demo_examples())
    assert len(wait_for_images(second, "#examples img", rows)) == rows and ".png" not in second.inner_text("#examples")
    assert second.get_by_text(SUBJECT.prompts[0], exact=True).count() == 1
    assert second.is_checked("#compare input")
    second.click("#generate")
    second.get_by_text(re.compile(r"queue: 1/1")).first.wait_for(timeout=30_000)
    first.wait_for_selector("#status:has-text('6 images')", timeout=120_000)
    second.wait_for_selector("#status:has-text('1 image with references and 1 without')", timeout=120_000)
    assert len(wait_for_images(second, "#outputs img", 2)) == 2
    # a random seed, drawn: the seed box shows it
    second.click("text=Settings")
    drawn = re.search(r"seed (\d+)", second.inner_text("#status")).group(1)
    assert second.input_value("#seed input") == drawn and second.is_disabled("#seed input")
    first.context.close()
    second.context.close()


def test_ctrl_c_stops_the_server(server):
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=30) == 0
    assert "serving on http://127.0.0.1" in server.log.read_text()


def test_sigterm_while_the_model_loads_exits_cleanly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "easyref", "serve", "--port", str(free_port()), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    for line in proc.stdout:
        if "using the bundled default model" in line:  # said just before the weights load
            break
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert proc.stdout.read().strip().splitlines()[-1] == "easyref: stopped before serving"
    assert not list(tmp_path.glob("easyref-*"))


def test_sigterm_during_a_generation_stops_cleanly_and_removes_the_temporary_folders(tmp_path):
    from gradio_client import Client, handle_file

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "easyref", "serve", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    for line in proc.stdout:
        if "serving on" in line:
            break
    assert sorted(p.name.split("-")[1] for p in tmp_path.glob("easyref-*")) == ["page", "serve"]
    refs = write_demo_references(tmp_path / "refs")
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
    job = client.submit(
        [handle_file(str(p)) for p in refs], STAR, "", 1.0, 100, 5.0, 3, False, 8, 64, 64, api_name="/generate"
    )
    wait_for_denoising(job)
    assert list(tmp_path.glob("easyref-page-*/*/*")), "the upload is in the page's folder"
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    log = proc.stdout.read()
    assert "terminate called" not in log and "Traceback" not in log, log
    assert not list(tmp_path.glob("easyref-*")), "the outputs, uploads and examples are gone"
