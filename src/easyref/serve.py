"""`easyref serve`: a gradio page over the same generation `easyref generate` runs.

The page takes the references, prompt and settings of `generate`, checks them with the same rules
(`generation.check_generate_args`, the library's image decoding), and writes the same files: each request
gets a folder under the server's output folder holding copies of its references, the PNGs (settings
recorded, so `easyref generate --from-metadata` makes them again) and the explain sheet. Those files
are what the page shows and what its download buttons hand out, byte for byte.

One generation runs at a time (the queue's concurrency limit is 1: a model on one device gains
nothing from two at once and would need twice the memory); requests that wait see their place. The
model runs in a worker thread under the server's own lock, so a cancelled request stops at its next
denoising step and the next request starts only after it has: no request shares a scheduler with
another, and none depends on what ran before it. A mistake in a request is shown in the page
(`gr.Error`) and the server goes on serving.

What the page serves: the files a request produced (its PNGs, explain sheet) and the demo group of the
examples row, each as gradio's copy in the server's private upload folder, and nothing else. The
output folder itself is never served, so files put there by anyone else stay private.
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
from pathlib import Path

import gradio as gr

from .errors import RunFailure, UserError, one_line
from .explain import explain_sheet
from .generation import (
    GENERATE_DEFAULTS,
    check_generate_args,
    explain_path,
    generation_record,
    run_pipeline,
    warn_about_limits,
    write_outputs,
)
from .images import ImageFileError, open_images
from .pipeline import default_size
from .safe_io import current_umask, describe_os_error
from .shapes.data import demo_group, demo_prompts, write_demo_references

logger = logging.getLogger(__name__)

# The page's own fonts: gradio's default theme asks Google Fonts, which a machine offline cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# a 64 px image from the bundled model, shown large: pixels, not a blur
CSS = "#outputs img, #preview img, #explain img { image-rendering: pixelated; }"
MAX_UPLOAD = "100mb"  # per file: gradio refuses a larger upload in the page, before it is stored
MAX_UI_IMAGES = 8  # the slider's end (`generate --num-images` goes to 16)
PREVIEW_SIDE = 256  # px: the references as the page shows them
EXPLAIN_NOTE = (
    "Each reference with the aggregation layer's attention from the 64 reference tokens to its image tokens "
    "(brighter: more), and the share of that attention it received. A reference that shares little with the "
    "others gets a smaller share."
)


class Stopped(Exception):
    """The generation was cancelled, or the server is stopping: it ends at its next step, writing nothing."""


class Server:
    """The loaded model and where requests write; `generate` is the page's one expensive call."""

    def __init__(self, pipe, parts, model_args: argparse.Namespace, out_dir: Path, handout_dir: Path):
        self.pipe, self.parts, self.model_args = pipe, parts, model_args
        self.out_dir, self.handout_dir = out_dir, handout_dir
        self.max_references = pipe.easyref_config.max_references
        self.size = default_size(pipe)
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
        """On upload: the references as the model will read them, or what is wrong with them."""
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
        progress=gr.Progress(),  # noqa: B008 - how gradio asks for a progress tracker
    ):
        """The request in a worker thread. Cancelled (a closed tab, the API's cancel), it is told to stop and
        awaited, so that the queue's slot is given back only once the model is free."""
        form = (files, prompt, negative_prompt, scale, steps, guidance, seed, random_seed, num_images, height, width)
        stop = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self._generate_or_refuse, form, progress, stop))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.gather(work, return_exceptions=True)
            logger.info("request cancelled; stopped at its next step")
            raise

    def _generate_or_refuse(self, form, progress, stop: threading.Event):
        try:
            with self._model:
                return self._generate(*form, progress=progress, stop=stop)
        except (UserError, RunFailure) as err:
            message = re.sub(r"--([a-z-]+)", lambda flag: flag.group(1).replace("-", " "), one_line(str(err)))
            logger.warning("request refused: %s", message)
            raise gr.Error(message, print_exception=False) from None
        except Stopped:
            raise gr.Error("stopped before it finished; nothing was written", print_exception=False) from None

    def _generate(
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
        progress,
        stop: threading.Event,
    ):
        self._check_running(stop)
        args = self.settings(
            prompt, negative_prompt, scale, steps, guidance, seed, random_seed, num_images, height, width
        )
        paths, references = self.references(files)
        notes = _warnings_of(lambda: warn_about_limits(self.pipe, args, self.parts.names()))
        progress(0, desc="reading the references")
        started = time.perf_counter()

        def on_step(_pipe, step, _timestep, tensors):
            self._check_running(stop)
            progress((step + 1, args.steps), desc="denoising", unit="steps")
            return tensors

        result = run_pipeline(self.pipe, references, args, args.seed, callback_on_step_end=on_step)
        self._check_running(stop)
        sheet = explain_sheet(references, result.reference_maps[0])
        folder = self._new_folder()
        args.out = folder / "easyref.png"
        try:
            kept = _keep_references(paths, folder / "references")
            params = generation_record(args, self.pipe, self.parts, kept, args.seed)
            written = write_outputs(list(result.images), references, args.out, params, grid=False, explained=sheet)
        except (OSError, RunFailure) as err:
            shutil.rmtree(folder, ignore_errors=True)  # all or nothing, as `generate` writes
            raise RunFailure(str(err) if isinstance(err, RunFailure) else describe_os_error(err)) from None
        seconds = time.perf_counter() - started
        logger.info("%s: %d image%s in %.1f s", folder, args.num_images, "s" if args.num_images > 1 else "", seconds)
        handed = self._hand_out(written)
        images = [str(handed[p]) for p in written if p != explain_path(args.out)]
        status = f"{len(images)} image{'s' if len(images) != 1 else ''} in {seconds:.1f} s, seed {args.seed}"
        status += "".join(f"\n\nNote: {note}" for note in notes)
        return images, [str(handed[p]) for p in written], str(handed[explain_path(args.out)]), args.seed, status

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
        self, prompt, negative_prompt, scale, steps, guidance, seed, random_seed, num_images, height, width
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
    """The page. `examples_dir` receives the demo group's references for the examples row."""
    # delete_cache: gradio's copies of uploads and outputs older than a day go, hourly and at exit
    with gr.Blocks(title="EasyRef", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown("# EasyRef\nGenerate images that keep what the reference images share, steered by the prompt.")
        with gr.Row():
            with gr.Column(scale=1):
                refs, preview, ref_status, prompt = _reference_and_prompt_fields(server)
                with gr.Accordion("Settings", open=False):
                    settings = _settings_fields(server.size)
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gallery, status, files, explained = _output_fields()
        _examples_row(refs, prompt, examples_dir)
        refs.change(server.preview, inputs=refs, outputs=[preview, ref_status], queue=False)
        inputs = [refs, prompt, *settings]
        seed = next(field for field in settings if field.elem_id == "seed")  # the seed used is written back
        outputs = [gallery, files, explained, seed, status]
        # one queue for both triggers: a concurrency limit is per event unless they share an id
        run.click(server.generate, inputs=inputs, outputs=outputs, api_name="generate", concurrency_id="generate")
        prompt.submit(server.generate, inputs=inputs, outputs=outputs, api_name=False, concurrency_id="generate")
    return app.queue(default_concurrency_limit=1)


def _reference_and_prompt_fields(server: Server):
    refs = gr.File(
        label=f"References (1 to {server.max_references} images)", file_count="multiple", elem_id="references"
    )
    preview = gr.Gallery(label="As the model reads them", columns=4, height=160, interactive=False, elem_id="preview")
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
        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
        random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="random-seed")
    count = gr.Slider(1, MAX_UI_IMAGES, value=1, step=1, label="Images", elem_id="num-images")
    with gr.Row():
        height = gr.Slider(8, max(size * 2, 64), value=size, step=8, label="Height", elem_id="height")
        width = gr.Slider(8, max(size * 2, 64), value=size, step=8, label="Width", elem_id="width")
    return [negative, scale, steps, guidance, seed, random_seed, count, height, width]


def _output_fields():
    with gr.Tabs():
        with gr.Tab("Images", id="images"):
            gallery = gr.Gallery(
                label="Outputs",
                columns=2,
                interactive=False,
                format="png",
                buttons=["download", "fullscreen"],
                elem_id="outputs",
            )
            status = gr.Markdown(elem_id="status")
            files = gr.File(
                label="PNG files (settings recorded in each)",
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


def _examples_row(refs, prompt, examples_dir: Path) -> None:
    group = demo_group()
    demo_refs = [str(p) for p in write_demo_references(examples_dir)]
    gr.Examples(
        [[demo_refs, text] for text in demo_prompts(group)],
        inputs=[refs, prompt],
        label="Examples: the demo group holds the same two subjects in every reference; each prompt names one",
    )


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
