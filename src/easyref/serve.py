"""`easyref serve`: a gradio page over the same generation `easyref generate` runs.

The page takes the references, prompt and settings of `generate`, checks them with the same rules
(`generation.check_generate_args`, the library's image decoding), and writes the same files: each request
gets a folder under the server's output folder holding copies of its references, the PNGs (settings
recorded, so `easyref generate --from-metadata` makes them again), with "Compare without references"
each image's twin made at scale 0, the explain sheet and a zip of them all. Those files are what the
page shows and what its download buttons hand out, byte for byte. The scheduler choice is
`generate --scheduler`'s (`generation.SCHEDULERS`), recorded as it records it.

One generation runs at a time (the queue's concurrency limit is 1: a model on one device gains
nothing from two at once and would need twice the memory); requests that wait see their place. The
model runs in a worker thread under the server's own lock, so a cancelled request stops at its next
denoising step and the next request starts only after it has: no request shares a scheduler with
another, and none depends on what ran before it. A mistake in a request is shown in the page
(`gr.Error`) and the server goes on serving.

What the page serves: the files a request produced (its PNGs, explain sheet, zip) and the demo groups of
the examples row (their references and thumbnails), each as gradio's copy in the server's private upload
folder, and nothing else. The output folder itself is never served, so files put there by anyone else
stay private.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import itertools
import logging
import logging.handlers
import math
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr

from .errors import RunFailure, UserError, one_line
from .explain import explain_sheet
from .generation import (
    GENERATE_DEFAULTS,
    SCHEDULERS,
    check_generate_args,
    explain_path,
    generation_record,
    run_pipeline,
    warn_about_limits,
    write_outputs,
)
from .images import ImageFileError, grid_sheet, open_images
from .pipeline import default_size
from .safe_io import current_umask, describe_os_error
from .shapes.data import demo_examples, write_demo_references

logger = logging.getLogger(__name__)

# The page's own fonts: gradio's default theme asks Google Fonts, which a machine offline cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# a 64 px image from the bundled model, shown large: pixels, not a blur. The galleries grow with what they
# hold (gradio's scroll box would hide the later rows) and show each image whole.
CSS = """
#outputs img, #preview img, #explain img, #examples img { image-rendering: pixelated; }
#outputs .grid-wrap, #preview .grid-wrap { overflow: visible; }
#outputs .caption-label { white-space: normal; }
"""
GROWS = "fit-content"  # a gallery's height: its rows, every one shown
MAX_UPLOAD = "100mb"  # per file: gradio refuses a larger upload in the page, before it is stored
MAX_UI_IMAGES = 8  # the slider's end (`generate --num-images` goes to 16)
PREVIEW_SIDE = 256  # px: the references as the page shows them
EXPLAIN_NOTE = (
    "Each reference under the aggregation layer's attention from the 64 reference tokens to its image tokens, "
    "in the heat scale of the bar at the bottom (dark: little, bright yellow: most), and the share of that "
    "attention it received. A reference that shares little with the others gets a smaller share."
)
# the page's names for `generate --scheduler`'s choices (`generation.SCHEDULERS`) other than `default`
SCHEDULER_LABELS = {
    "euler": "Euler",
    "euler-ancestral": "Euler ancestral",
    "dpm++2m": "DPM++ 2M",
    "ddim": "DDIM",
    "unipc": "UniPC",
}
WITH, WITHOUT = "easyref", "easyref_scale0"  # the request's file stems: as asked, and the references unused


class Stopped(Exception):
    """The generation was cancelled, or the server is stopping: it ends at its next step, writing nothing."""


class Server:
    """The loaded model and where requests write; `generate` is the page's one expensive call."""

    def __init__(self, pipe, parts, model_args: argparse.Namespace, out_dir: Path, handout_dir: Path):
        self.pipe, self.parts, self.model_args = pipe, parts, model_args
        self.out_dir, self.handout_dir = out_dir, handout_dir
        self.max_references = pipe.easyref_config.max_references
        self.size = default_size(pipe)
        self.scheduler = pipe.scheduler  # the model's own (`run_pipeline` puts it back after a request swaps it)
        self._requests = itertools.count(1)
        # gradio frees a cancelled request's queue slot at once while its thread runs on: this lock, not
        # the queue, is what keeps two generations off the one pipeline (and its scheduler's state)
        self._model = threading.Lock()
        self._previews = threading.Semaphore(1)  # previews run outside the queue: one decodes at a time
        self._closing = threading.Event()
        pipe.set_progress_bar_config(disable=True)  # the page shows the steps; the server's log stays one line each

    # ------------------------------------------------------------------ references
    def references(self, files) -> tuple[list[Path], list]:
        """The uploaded files as decoded references, or a UserError naming the file (by its own name,
        not the server's upload path). Every header is checked against the decoded-size bounds before
        any image is decoded."""
        paths = [Path(f) for f in (files or [])]
        if not paths:
            raise UserError(f"no reference images: drop 1 to {self.max_references} images under References")
        if len(paths) > self.max_references:
            raise UserError(f"{len(paths)} references given; this model takes at most {self.max_references}")
        try:
            images = open_images(paths, names=[path.name for path in paths])
        except ImageFileError as err:
            raise UserError(str(err)) from None
        return paths, images

    def preview(self, files):
        """On upload: the references as the model will read them (each whole), or what is wrong with them."""
        if not files:
            return [], ""
        with self._previews:
            try:
                paths, images = self.references(files)
            except UserError as err:
                return [], f"**Cannot use these references:** {one_line(str(err))}"
            for image in images:
                image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))  # the page shows them small: no large re-encode
        count = f"{len(images)} reference{'s' if len(images) != 1 else ''}"
        return [(image, path.name) for image, path in zip(images, paths)], f"{count} ready"

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        files,
        prompt,
        negative_prompt,
        scale,
        steps,
        guidance,
        seed,
        random_seed,
        num_images,
        height,
        width,
        compare=False,
        scheduler="default",
        progress=gr.Progress(),  # noqa: B008 - how gradio asks for a progress tracker
    ):
        """The request in a worker thread. Cancelled (a closed tab, the API's cancel), it is told to stop and
        awaited, so that the queue's slot is given back only once the model is free. `compare` and
        `scheduler` come last, with defaults, so that callers of the API before them keep working."""
        form = (files, prompt, negative_prompt, scale, steps, guidance, seed, random_seed, num_images, height, width)
        stop = threading.Event()
        work = asyncio.ensure_future(
            asyncio.to_thread(self._generate_or_refuse, form, bool(compare), scheduler, progress, stop)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.gather(work, return_exceptions=True)
            logger.info("request cancelled; stopped at its next step")
            raise

    def _generate_or_refuse(self, form, compare: bool, scheduler, progress, stop: threading.Event):
        try:
            with self._model:
                return self._generate(form, compare, scheduler, progress=progress, stop=stop)
        except (UserError, RunFailure) as err:
            message = re.sub(r"--([a-z-]+)", lambda flag: flag.group(1).replace("-", " "), one_line(str(err)))
            logger.warning("request refused: %s", message)
            raise gr.Error(message, print_exception=False) from None
        except Stopped:
            raise gr.Error("stopped before it finished; nothing was written", print_exception=False) from None

    def _generate(self, form, compare: bool, scheduler, progress, stop: threading.Event):
        self._check_running(stop)
        files, *settings = form
        args = self.settings(*settings, scheduler=scheduler)
        paths, references = self.references(files)
        notes = _warnings_of(lambda: warn_about_limits(self.pipe, args, self.parts.names()))
        # the same seed and settings with the references unused: scale 0 runs none of the reference path
        runs = [args, argparse.Namespace(**{**vars(args), "scale": 0.0, "explain": False})][: 1 + compare]
        progress(0, desc="reading the references")
        started = time.perf_counter()
        results = [self._run(run, references, progress, stop, i, len(runs)) for i, run in enumerate(runs)]
        sheet = explain_sheet(references, results[0].reference_maps[0])
        folder, batches = self._write(paths, references, runs, [r.images for r in results], sheet)
        seconds = time.perf_counter() - started
        logger.info("%s: %d image%s in %.1f s", folder, args.num_images, "s" if args.num_images > 1 else "", seconds)
        written = [path for batch in batches for path in batch]
        handed = self._hand_out(written)
        explained = str(handed[explain_path(folder / f"{WITH}.png")])
        status = _status(args, compare, seconds, notes)
        return _gallery(batches, handed, args.scale), [str(handed[p]) for p in written], explained, args.seed, status

    def _run(self, args, references, progress, stop: threading.Event, index: int, runs: int):
        """One pipeline call, its steps shown as part `index` of `runs`."""

        def on_step(_pipe, step, _timestep, tensors):
            self._check_running(stop)
            progress((index * args.steps + step + 1, runs * args.steps), desc="denoising", unit="steps")
            return tensors

        result = run_pipeline(self.pipe, references, args, args.seed, callback_on_step_end=on_step)
        self._check_running(stop)
        return result

    def _write(self, paths, references, runs, batches, sheet) -> tuple[Path, list[list[Path]]]:
        """The request's folder with its references, each run's PNGs (records written as `generate` writes
        them), the explain sheet and one zip of them all; all or nothing. Returns the folder and the files:
        first the zip, then each run's."""
        folder = self._new_folder()
        try:
            kept = _keep_references(paths, folder / "references")
            written = []
            for run, images, stem in zip(runs, batches, (WITH, WITHOUT)):
                run.out = folder / f"{stem}.png"
                params = generation_record(run, self.pipe, self.parts, kept, run.seed)
                explained = sheet if stem == WITH else None
                written.append(write_outputs(list(images), references, run.out, params, False, explained=explained))
            archive = _zip(folder / f"easyref-{folder.name}.zip", [p for batch in written for p in batch])
        except (OSError, RunFailure) as err:
            shutil.rmtree(folder, ignore_errors=True)  # all or nothing, as `generate` writes
            raise RunFailure(str(err) if isinstance(err, RunFailure) else describe_os_error(err)) from None
        return folder, [[archive], *written]

    def _hand_out(self, written: list[Path]) -> dict[Path, Path]:
        """Each file the request wrote, linked (or copied) into a folder of its own, named at random, in the
        page's folder: gradio serves what is there and nothing of the output folder, and one request's
        files cannot be found from another's names."""
        folder = self.handout_dir / "outputs" / secrets.token_hex(16)
        folder.mkdir(parents=True)
        handed = {}
        for path in written:
            handed[path] = folder / path.name
            try:
                os.link(path, handed[path])
            except OSError:  # another file system, or one without hard links
                shutil.copyfile(path, handed[path])
        return handed

    def _check_running(self, stop: threading.Event) -> None:
        if stop.is_set() or self._closing.is_set():
            raise Stopped

    def stop_running(self) -> None:
        """From now on every generation stops at its next step, and none starts."""
        self._closing.set()

    def close(self, timeout: float | None = None) -> bool:
        """Stop the running generation at its next step and wait for it; True once the model is free."""
        self.stop_running()
        if not self._model.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._model.release()
        return True

    def settings(
        self,
        prompt,
        negative_prompt,
        scale,
        steps,
        guidance,
        seed,
        random_seed,
        num_images,
        height,
        width,
        scheduler="default",
    ) -> argparse.Namespace:
        """The form as `generate`'s arguments, checked by the same rules."""
        if random_seed or seed is None:
            seed = int.from_bytes(os.urandom(4), "little") % 2**31
        args = argparse.Namespace(
            **vars(self.model_args),
            prompt=prompt or "",
            negative_prompt=negative_prompt or None,
            scale=float(scale),
            steps=_whole(steps, "steps"),
            guidance=float(guidance),
            seed=_whole(seed, "seed"),
            num_images=_whole(num_images, "number of images"),
            height=_whole(height, "height"),
            width=_whole(width, "width"),
            scheduler=scheduler,
            out=self.out_dir / "easyref.png",
            grid=False,
            explain=True,
        )
        check_generate_args(args)
        return args

    def _new_folder(self) -> Path:
        """The request's folder, made now with a name that cannot be foreseen (time, request number and a
        random part): a link or file put in the output folder beforehand is never written through."""
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._requests):04d}-"
        try:
            folder = Path(tempfile.mkdtemp(prefix=stamp, dir=self.out_dir))
            os.chmod(folder, 0o777 & ~current_umask())  # mkdtemp's 0700: outputs get ordinary permissions
        except OSError as err:
            raise RunFailure(f"no image was written: {describe_os_error(err)}") from None
        return folder


def _whole(value, name: str) -> int:
    if not math.isfinite(float(value)) or float(value) != int(value):
        raise UserError(f"{name} must be a whole number, got {value}")
    return int(value)


def _keep_references(paths: list[Path], folder: Path) -> list[Path]:
    """Copies beside the outputs, so the record's references outlive the upload cache. The folder and each
    copy are new files (exclusive creation): nothing already there is followed or replaced."""
    folder.mkdir()
    kept = []
    for i, path in enumerate(paths):
        kept.append(folder / f"{i + 1:02d}-{path.name}")
        with open(path, "rb") as source, open(kept[-1], "xb") as copy:
            shutil.copyfileobj(source, copy)
    return kept


def _zip(path: Path, files: list[Path]) -> Path:
    """One download for the batch: the files as they are, stored (PNGs are compressed already)."""
    with open(path, "xb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        for file in files:
            archive.write(file, file.name)
    return path


def _gallery(batches: list[list[Path]], handed: dict[Path, Path], scale: float) -> list:
    """The images to show: as asked, or (compared) each beside its twin made without the references."""
    images = [[str(handed[p]) for p in batch if p.stem != f"{WITH}_explain"] for batch in batches[1:]]
    if len(images) == 1:
        return images[0]
    captions = (f"with references (scale {scale:g})", "without (scale 0)")
    return [(path, caption) for pair in zip(*images) for path, caption in zip(pair, captions)]


def _fit_outputs(shown: list | None):
    """After a generation: as many columns as keep each of up to 16 images at a useful size, and the seed
    box shown (it holds the seed used, drawn at random or not). A step of its own: the API's outputs stay
    values."""
    columns = 2 if len(shown or []) <= 4 else 4
    return gr.Gallery(columns=columns), gr.Number(visible=True)


def _status(args, compare: bool, seconds: float, notes: list[str]) -> str:
    count = f"{args.num_images} image{'s' if args.num_images != 1 else ''}"
    made = f"{count} with references and {args.num_images} without" if compare else count
    status = f"{made} in {seconds:.1f} s, seed {args.seed}"
    return status + "".join(f"\n\nNote: {note}" for note in notes)


def _warnings_of(call) -> list[str]:
    """The warning lines `call` logs (what the model will not follow), to show in the page too."""
    collect = logging.handlers.BufferingHandler(capacity=1000)
    collect.setLevel(logging.WARNING)
    root = logging.getLogger("easyref")
    root.addHandler(collect)
    try:
        call()
    finally:
        root.removeHandler(collect)
    return [record.getMessage() for record in collect.buffer]


# ---------------------------------------------------------------------------- the page
def build_app(server: Server, examples_dir: Path) -> gr.Blocks:
    """The page. `examples_dir` receives the demo groups' references for the examples row."""
    # delete_cache: gradio's copies of uploads and outputs older than a day go, hourly and at exit
    with gr.Blocks(title="EasyRef", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown("# EasyRef\nGenerate images that keep what the reference images share, steered by the prompt.")
        with gr.Row():
            with gr.Column(scale=1):
                refs, preview, ref_status, prompt = _reference_and_prompt_fields(server)
                with gr.Accordion("Settings", open=False):
                    settings = _settings_fields(server.size)
                    scheduler = _scheduler_field(server.scheduler)
                compare = gr.Checkbox(
                    value=False,
                    label="Compare without references: each image beside the one the same seed makes at scale 0",
                    elem_id="compare",
                )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gallery, status, files, explained = _output_fields()
        _examples_row(examples_dir, outputs=[refs, prompt, compare])
        refs.change(server.preview, inputs=refs, outputs=[preview, ref_status], queue=False)
        seed, random_seed = (next(f for f in settings if f.elem_id == name) for name in ("seed", "random-seed"))
        random_seed.change(_seed_box, inputs=random_seed, outputs=seed, queue=False, api_visibility="private")
        inputs = [refs, prompt, *settings, compare, scheduler]
        outputs = [gallery, files, explained, seed, status]  # the seed used is written back
        # one queue for both triggers: a concurrency limit is per event unless they share an id
        for made in (
            run.click(server.generate, inputs=inputs, outputs=outputs, api_name="generate", concurrency_id="generate"),
            prompt.submit(server.generate, inputs=inputs, outputs=outputs, api_name=False, concurrency_id="generate"),
        ):
            made.success(_fit_outputs, inputs=gallery, outputs=[gallery, seed], queue=False, api_visibility="private")
    return app.queue(default_concurrency_limit=1)


def _reference_and_prompt_fields(server: Server):
    refs = gr.File(
        label=f"References (1 to {server.max_references} images)",
        file_count="multiple",
        file_types=["image"],  # the picker offers images; what arrives is still decoded and checked here
        elem_id="references",
    )
    preview = gr.Gallery(
        label="As the model reads them",
        columns=6,  # fewer fill the row (fit_columns); the model's most in a few rows
        height=GROWS,
        object_fit="contain",  # each reference whole, as the model reads it: a wide one is not cropped
        format="png",  # a small reference's pixels as they are: webp would blur them
        interactive=False,
        elem_id="preview",
    )
    ref_status = gr.Markdown(elem_id="reference-status")
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
    return refs, preview, ref_status, prompt


def _settings_fields(size: int) -> list:
    """In `Server.generate`'s argument order after the references and the prompt."""
    negative = gr.Textbox(label="Negative prompt (empty: the model's)", elem_id="negative")
    scale = gr.Slider(
        0, 2, value=GENERATE_DEFAULTS["scale"], step=0.05, label="Reference strength (scale)", elem_id="scale"
    )
    steps = gr.Slider(1, 100, value=GENERATE_DEFAULTS["steps"], step=1, label="Steps", elem_id="steps")
    guidance = gr.Slider(0, 20, value=GENERATE_DEFAULTS["guidance"], step=0.5, label="Guidance", elem_id="guidance")
    with gr.Row():
        # hidden while the seed is drawn at random until a generation shows the one it drew (gradio's number
        # box shows an empty value as 0, which no image here was made with)
        seed = gr.Number(
            value=0, precision=0, minimum=0, label="Seed", interactive=False, visible=False, elem_id="seed"
        )
        random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="random-seed")
    count = gr.Slider(1, MAX_UI_IMAGES, value=1, step=1, label="Images", elem_id="num-images")
    with gr.Row():
        height = gr.Slider(8, max(size * 2, 64), value=size, step=8, label="Height", elem_id="height")
        width = gr.Slider(8, max(size * 2, 64), value=size, step=8, label="Width", elem_id="width")
    return [negative, scale, steps, guidance, seed, random_seed, count, height, width]


def _scheduler_field(default) -> gr.Dropdown:
    own = f"The model's own ({type(default).__name__})"
    return gr.Dropdown(
        [(own if name == "default" else SCHEDULER_LABELS.get(name, name), name) for name in SCHEDULERS],
        value="default",
        label="Scheduler",
        elem_id="scheduler",
    )


def _seed_box(random_seed: bool) -> gr.Number:
    """Random: the box goes (until a generation shows the seed it drew); chosen: it can be typed in."""
    return gr.Number(interactive=not random_seed, visible=not random_seed)


def _output_fields():
    with gr.Tabs():
        with gr.Tab("Images", id="images"):
            gallery = gr.Gallery(
                label="Outputs",
                columns=2,
                height=GROWS,
                object_fit="contain",
                interactive=False,
                format="png",
                buttons=["download", "fullscreen"],
                elem_id="outputs",
            )
            status = gr.Markdown(elem_id="status")
            files = gr.File(
                label="The batch as one zip, and each PNG (settings recorded in each)",
                file_count="multiple",
                interactive=False,
                elem_id="files",
            )
        with gr.Tab("What it took from each reference", id="explain", elem_id="explain-tab"):
            gr.Markdown(EXPLAIN_NOTE)
            explained = gr.Image(
                type="filepath", label="Reference attention", interactive=False, format="png", elem_id="explain"
            )
    return gallery, status, files, explained


COMPARED = {"subject"}  # the examples whose point is the comparison with and without the references


def _examples_row(examples_dir: Path, outputs: list) -> None:
    """One row per (example, prompt), in `demo_examples`' order: its references as one thumbnail, the prompt
    and what it shows. A click loads the references, the prompt and whether to compare."""
    rows = []
    for example in demo_examples():
        paths = [str(p) for p in write_demo_references(examples_dir / example.name, example.group)]
        thumbnail = _thumbnail(paths, examples_dir / f"{example.name}.png")
        rows += [(paths, prompt, example.name in COMPARED, thumbnail, example.note) for prompt in example.prompts]
    table = gr.Dataset(
        components=["image", "textbox", "textbox"],
        samples=[[thumbnail, prompt, note] for _, prompt, _, thumbnail, note in rows],
        headers=["References", "Prompt", "What it shows"],
        type="index",
        label="Examples",
        elem_id="examples",
    )
    table.click(lambda i: rows[i][:3], inputs=table, outputs=outputs, queue=False, api_visibility="private")


def _thumbnail(paths: list[str], out: Path) -> str:
    """The references in a square grid: the examples row shows a square crop of its images."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    side = math.ceil(math.sqrt(len(images)))
    rows = [images[i : i + side] for i in range(0, len(images), side)]
    grid_sheet(rows, max(image.width for image in images)).save(out)
    return str(out)


def serve(pipe, parts, args: argparse.Namespace) -> int:
    """Serve until interrupted. Outputs go to --out-dir, or a temporary folder removed at exit; uploads,
    the examples and what the page hands out live in a private temporary folder, removed at exit."""
    out_dir = _folder(args.out_dir, "easyref-serve-")
    page_dir = _page_folder()
    model_args = argparse.Namespace(**{k: getattr(args, k) for k in ("base", "mllm", "adapter", "device", "dtype")})
    server = Server(pipe, parts, model_args, out_dir, handout_dir=page_dir)
    # Ctrl+C, `kill`, systemd and docker stop all end it the same way; SIGINT is set too because a
    # process started in the background by a script inherits it ignored
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, functools.partial(_interrupt, server))
    app = None
    try:
        app = build_app(server, page_dir / "examples")
        logger.info("outputs go to %s", out_dir)
        # quiet: gradio's own banner tells to set `share=True` in launch(), which is --share here.
        # No allowed_paths: gradio then serves only its upload folder, where the page puts what it hands out.
        app.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            theme=THEME,
            css=CSS,
            ssr_mode=False,
            footer_links=["api"],
            show_error=True,
            max_file_size=MAX_UPLOAD,
            prevent_thread_lock=True,
            quiet=True,
        )
        logger.info(
            "serving on %s (Ctrl+C stops)%s", app.local_url, "" if args.share else "; --share for a public link"
        )
        if app.share_url:
            logger.info("public link: %s", app.share_url)
        app.block_thread()  # returns on Ctrl+C, having closed the server
    except KeyboardInterrupt:  # stopped while starting
        if app is not None:
            app.close()
    _stop(server)
    return 0


STOP_WAIT_S = 300  # a step of a full-size model on a CPU takes tens of seconds; its VAE decode minutes


def _stop(server: Server) -> None:
    """The running generation ends at its next step before the process exits: torch's threads must not
    be running when the interpreter tears down (that aborts the process)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: logger.info("stopping: waiting for the running generation to end"))
    if server.close(timeout=STOP_WAIT_S):
        return
    logger.warning("the running generation did not stop within %d s; exiting without it", STOP_WAIT_S)
    atexit._run_exitfuncs()  # the temporary folders, which os._exit would skip
    os._exit(0)


def _interrupt(server: Server, signum, frame):
    server.stop_running()  # at once: the page's open connections then close before gradio waits on them
    raise KeyboardInterrupt


def _folder(given: Path | None, prefix: str) -> Path:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given.resolve()
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _page_folder() -> Path:
    """A folder of this server's own for gradio's uploads and cache (inside GRADIO_TEMP_DIR when set):
    gradio serves every file in its upload folder, so it must hold this page's files only, and it goes
    at exit with the uploads in it."""
    parent = os.environ.get("GRADIO_TEMP_DIR")
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="easyref-page-", dir=parent or None)).resolve()
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = str(folder)  # read as each component is built, and by the upload route
    return folder
