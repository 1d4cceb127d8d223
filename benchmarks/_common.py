"""Helpers shared by the benchmark scripts in this folder (not a benchmark itself).

Timing (median after warm-up), peak-memory probes (CUDA allocator or sampled process RSS on CPU),
parameter byte counts, Markdown tables, and the Qwen2-VL-2B-Instruct architecture as a config.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import torch

logger = logging.getLogger("benchmarks")

MIB = 1024**2
GIB = 1024**3


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # the libraries are chatty at INFO (and transformers warns about unused generation config etc.)
    for name in ("transformers", "diffusers", "accelerate", "PIL"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import diffusers
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()


def check_idle(threshold: float = 15.0) -> float:
    """System-wide CPU use over 1 s before a run; warn when other work would distort the timings."""
    import psutil

    busy = psutil.cpu_percent(interval=1.0)
    if busy > threshold:
        logger.warning("the CPU is %.0f%% busy before the run: other processes will distort the timings", busy)
    return busy


def start_run(args) -> tuple[torch.device, float | None]:
    """Logging, device and thread count from the common flags; CPU load before the run (CPU only)."""
    setup_logging(args.verbose)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    busy = check_idle() if device.type == "cpu" else None
    return device, busy


def parse_dtype(name: str) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; one of {', '.join(table)}")
    return table[name]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, warmup: int, device) -> tuple[float, list[float]]:
    """Run `fn` `warmup` times untimed, then `repeats` times; return (median seconds, all times)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


class Timings(dict):
    """name -> list of seconds, one per round; rounds are aligned across names."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of num/den measured in the same round (robust to slow drifts of the machine)."""
        return statistics.median(a / b for a, b in zip(self[num], self[den]))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device) -> Timings:
    """Seconds per call for each named callable, the callables taking turns in each round.

    Alternating keeps a side-by-side comparison fair when the machine's speed drifts (other load,
    clock changes): every variant sees the same conditions in each round.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = Timings({name: [] for name in fns})
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    logger.debug("times: %s", {k: [round(t, 4) for t in v] for k, v in times.items()})
    return times


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc) so that an RSS delta is not hidden by the allocator cache."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _RssSampler:
    """Polls the process RSS in a background thread; `peak` is the highest value seen."""

    def __init__(self, interval: float = 0.0005):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def peak_memory(fn: Callable[[], object], device) -> tuple[int, str]:
    """Extra memory `fn` needs at its peak, in bytes, and how it was measured.

    CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the call (exact).
    CPU: process RSS sampled every 0.5 ms above the RSS before the call, after `malloc_trim` (an
    approximation: short spikes between samples are missed; the call's result is kept alive
    until the measurement ends, as a caller would keep it).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return peak, "cuda max_memory_allocated"
    import gc

    import psutil

    gc.collect()
    _malloc_trim()
    before = psutil.Process().memory_info().rss
    with _RssSampler() as sampler:
        result = fn()
    del result
    return max(0, sampler.peak - before), "process RSS (sampled)"


def param_bytes(modules: Iterable[torch.nn.Module | torch.nn.Parameter]) -> tuple[int, int]:
    """(unique parameter count, bytes) over modules/parameters; a tensor shared by several is counted once."""
    seen: set[int] = set()
    count = nbytes = 0
    for item in modules:
        params = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            count += p.numel()
            nbytes += p.numel() * p.element_size()
    return count, nbytes


def fmt_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(device, busy: float | None = None) -> str:
    import os

    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_model()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"
    line = f"{where}; torch {torch.__version__}"
    if busy is not None:
        line += f"; CPU {busy:.0f}% busy before the run"
    return line


# --------------------------------------------------------------------------------------------
# Qwen2-VL-2B-Instruct's architecture (the config only; weights are random or never allocated)
# Token ids default to the real tokenizer's; pass the ids of the tokenizer actually used.
REAL_QWEN_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}


def qwen2vl_2b_config(
    token_ids: dict | None = None,
    tie_word_embeddings: bool = True,
    num_hidden_layers: int = 28,
    vision_depth: int = 32,
):
    """Qwen2-VL-2B-Instruct: text 1536 wide, 28 layers, 12/2 heads, MLP 8960, theta 1e6, M-RoPE [16,24,24],
    vocab 151936, tied embeddings; vision depth 32, width 1280, 16 heads, merger to 1536, patch 14, merge 2."""
    from transformers import Qwen2VLConfig

    ids = dict(REAL_QWEN_TOKEN_IDS, **(token_ids or {}))
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=12,
            num_key_value_heads=2,
            hidden_act="silu",
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            rms_norm_eps=1e-6,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"],
            pad_token_id=ids["pad_token_id"],
        ),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=1280,
            hidden_size=1536,
            num_heads=16,
            mlp_ratio=4,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=tie_word_embeddings,
    )


def sdxl_unet_config(scale_down: bool = False) -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0's UNet (2.57 B parameters); `scale_down` keeps its block
    layout with 1/10 the width and one transformer layer per block (for a quick CPU check of a script)."""
    widths = (32, 64, 128) if scale_down else (320, 640, 1280)
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 1) if scale_down else (1, 2, 10),
        attention_head_dim=(2, 4, 8) if scale_down else (5, 10, 20),  # diffusers' name for the head count
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )


def sdxl_vae_config(scale_down: bool = False) -> dict:
    """SDXL's VAE (scaling factor 0.13025, 8x downsampling)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64) if scale_down else (128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def sdxl_text_configs(vocab_size: int, scale_down: bool = False) -> tuple[dict, dict]:
    """CLIP ViT-L/14 text (768 wide, 12 layers) and OpenCLIP bigG text (1280 wide, 32 layers, projection)."""
    one = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    two = dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
        hidden_act="gelu",
    )
    if scale_down:
        one.update(num_hidden_layers=2)
        two.update(num_hidden_layers=2)
    common = dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return {**one, **common}, {**two, **common}


def qwen2vl_2b_with_tiny_tokenizer(num_hidden_layers: int = 28, vision_depth: int = 32):
    """(tokenizer, config): the tiny byte-level tokenizer with a chat template, and the 2B architecture
    whose special-token ids are that tokenizer's (so prompts built with it are valid inputs)."""
    from easyref.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
            ("bos_token_id", QWEN_SPECIAL_TOKENS[0]),
            ("eos_token_id", "<|im_end|>"),
            ("pad_token_id", QWEN_SPECIAL_TOKENS[0]),
        )
    }
    return tokenizer, qwen2vl_2b_config(ids, num_hidden_layers=num_hidden_layers, vision_depth=vision_depth)


class AuthorsWorker:
    """A worker script running in the authors' venv, driven over a pipe: one JSON request, one JSON reply."""

    def __init__(self, python, script, repo):
        import subprocess

        self.process = subprocess.Popen(
            [str(python), str(script), "serve", str(repo.resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **request) -> dict:
        import json

        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the authors' worker stopped (its error is above)")
        return json.loads(line)

    def close(self) -> None:
        import json

        if self.process.poll() is not None:
            return
        self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.process.stdin.close()
        self.process.wait(timeout=60)


LEGACY_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
)
LEGACY_VISION_KEYS = ("depth", "embed_dim", "hidden_size", "num_heads", "mlp_ratio", "patch_size")
LEGACY_VISION_KEYS += ("spatial_merge_size", "temporal_patch_size")


def legacy_qwen2vl_config(config, seed: int, **token_ids) -> dict:
    """A Qwen2-VL config as transformers 4.45 spells it (flat, `rope_scaling` of type mrope), for the
    authors' workers to build a model folder in the layout the release has; `token_ids`: bos/eos/pad."""
    text, vision = config.text_config, config.vision_config
    return {
        **{key: getattr(text, key) for key in LEGACY_TEXT_KEYS},
        **token_ids,
        "rope_theta": text.rope_parameters["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": text.rope_parameters["mrope_section"]},
        "tie_word_embeddings": config.tie_word_embeddings,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_config": {key: getattr(vision, key) for key in LEGACY_VISION_KEYS} | {"in_chans": 3},
        "seed": seed,
    }
