"""`easyref generate` at the real size on random weights: build the model folders once, then time and measure
the generate path phase by phase, in a child process whose memory is its own.

Run (from the repository root; nothing is downloaded, every weight is random):

    .venv/bin/python benchmarks/real_size.py                       # build once, then 1024 px, 2 steps, 3 refs, bf16
    .venv/bin/python benchmarks/real_size.py --refs 8
    .venv/bin/python benchmarks/real_size.py --baseline-src /tmp/base-wt/src   # before / after, side by side
    .venv/bin/python benchmarks/real_size.py --build-only          # only the folders (and their build table)
    .venv/bin/python benchmarks/real_size.py --config small --models /tmp/rs --size 64 --steps 1   # a check, seconds
    .venv/bin/python benchmarks/real_size.py --device cuda         # on a GPU machine

Built under `--models` (default runs/real-size), in bfloat16, once: a folder is reused when its marker file
(written last, so that a killed build is redone rather than half used) says it was built for this `--config`
from the folders it depends on.
- `sdxl/`: stabilityai/stable-diffusion-xl-base-1.0's architecture (UNet 2.57 B parameters, VAE, CLIP ViT-L and
  OpenCLIP bigG text encoders with their real vocabulary size) with byte-level tokenizers built in code;
- `qwen2vl/`: Qwen2-VL-2B-Instruct's (28 layers 1536 wide, vision tower 32 blocks 1280 wide, 151,936 tokens)
  with the tiny byte-level tokenizer that has Qwen2-VL's special tokens and chat template;
- `release/model.safetensors`: an EasyRef release in the authors' layout (LoRA rank 128, a finetuned trunk, and
  what the import drops: the frozen UNet, the lm_head, the duplicated processor tensors), written tensor by
  tensor; `adapter/`: that release through `easyref convert` (run in this process, its peak RSS measured).
Each module is built directly in bfloat16, saved and freed before the next, so that the build never holds two
real-size models.

The measured run is `easyref.cli.main(["generate", ...])`, the command line's own path, with the phases wrapped
at class level before anything loads: load (the whole `load_pipeline`: resolve, from_pretrained, .to(device)),
the vision tower per reference (per call), the MLLM (trunk layers and aggregation layer over the group), the
negative branch (black image + negative instruction; what runs inside it counts as it), the text encoders, each
UNet step, the VAE decode; `other` is the time between them (inputs, PNG writing). Per phase: wall time, the
process RSS at its end, and its peak RSS during it: the process's VmHWM, reset at every phase boundary through
/proc/self/clear_refs, with an RSS sample every 10 ms where that reset is not permitted; and how much of the RSS
is file-mapped (RssFile: weights still memory-mapped from their files, which are read when first used).
`--baseline-src DIR` measures another checkout's easyref in the same run, before the working tree's, and prints
both side by side. Each run gets a copy of its checkout's easyref taken as it starts (PYTHONPATH; others may edit
the tree during a run of minutes; its digest is printed) and the adapter folder as `easyref convert` left it
(generate stores the negative branch it computes beside the weights, which a later run would reuse). The model
files are dropped from the page cache before each run (posix_fadvise), so that each loads them from the disk;
`--keep-page-cache` leaves the cache as it is.

`--config small`: the same chain on the same code paths with cut-down models (SDXL's block layout at 1/10 width,
two 32-wide text encoders, the tiny test Qwen2-VL, LoRA rank 4): seconds, for tests/test_real_size_bench.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402

logger = logging.getLogger("benchmarks.real_size")

MARKER = ".real_size_built.json"
PROMPT = "the object of the references on a table in a garden, morning light"
SMALL_TEXT_WIDTH = 32
CLIP_VOCAB = 49408  # CLIP's real vocabulary: the embeddings keep their real size under the small tokenizer
SDXL_SCHEDULER = dict(  # stable-diffusion-xl-base-1.0's scheduler_config.json
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    prediction_type="epsilon",
    use_karras_sigmas=False,
)
GAP = "other (between phases)"
LOAD = "load (load_pipeline: from_pretrained + .to)"
MLLM = "MLLM (language model over the group)"
NEGATIVE = "negative branch (black image + negative instruction)"
TEXT = "text encoders (CLIP-L + bigG, prompt + negative)"
VAE = "VAE decode"


# ============================================================================ what is built
@dataclass(frozen=True)
class Spec:
    """The sizes the folders are built at: `real`, or `small` for a check in seconds."""

    name: str
    scale_down: bool  # SDXL's block layout at 1/10 width, two text-encoder layers, the tiny Qwen2-VL
    lora_rank: int

    def unet_config(self) -> dict:
        config = _common.sdxl_unet_config(self.scale_down)
        if self.scale_down:  # over the small text encoders: 2 x 32 wide, pooled 32 + 6 time ids x 256
            config.update(
                cross_attention_dim=2 * SMALL_TEXT_WIDTH,
                projection_class_embeddings_input_dim=SMALL_TEXT_WIDTH + 6 * 256,
            )
        return config

    def text_configs(self, tokenizer) -> tuple[dict, dict]:
        """CLIP ViT-L's and OpenCLIP bigG's text encoders (their real vocabulary size), or two small ones."""
        if not self.scale_down:
            return _common.sdxl_text_configs(CLIP_VOCAB)
        one, _ = _common.sdxl_text_configs(len(tokenizer), scale_down=True)
        width = SMALL_TEXT_WIDTH
        small = dict(one, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, projection_dim=width)
        return small, dict(small, hidden_act="gelu")

    def qwen(self):
        """(tokenizer with the chat template, Qwen2VLConfig whose special-token ids are the tokenizer's)."""
        if not self.scale_down:
            return _common.qwen2vl_2b_with_tiny_tokenizer()
        from easyref.tiny import QWEN_CHAT_TEMPLATE, tiny_qwen2vl_config, tiny_qwen_tokenizer

        tokenizer = tiny_qwen_tokenizer()
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        return tokenizer, tiny_qwen2vl_config(len(tokenizer), initializer_range=0.02)


SPECS = {"real": Spec("real", scale_down=False, lora_rank=128), "small": Spec("small", scale_down=True, lora_rank=4)}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters are created in `dtype` from the start: a float32 UNet first would need twice the memory."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def free_memory() -> None:
    gc.collect()
    _common._malloc_trim()


def save_module(make, folder: Path, seed: int) -> int:
    """Build one module in bfloat16, save it (safetensors), free it; returns its parameter count."""
    torch.manual_seed(seed)
    with default_dtype(torch.bfloat16), torch.no_grad():
        module = make()
    module.to(torch.bfloat16)  # a part a library built in another dtype (nothing to do otherwise)
    count = sum(p.numel() for p in module.parameters())  # shared (tied) tensors once
    module.save_pretrained(folder)
    del module
    free_memory()
    return count


def build_sdxl(folder: Path, spec: Spec) -> dict:
    """SDXL base 1.0's folder layout and architectures (`_common`'s configs), one component at a time."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from easyref.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    one, two = spec.text_configs(tokenizer)
    makers = {
        "unet": lambda: UNet2DConditionModel(**spec.unet_config()),
        "vae": lambda: AutoencoderKL(**_common.sdxl_vae_config(spec.scale_down)),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**one)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**two)),
    }
    params = {name: save_module(make, folder / name, seed) for seed, (name, make) in enumerate(makers.items())}
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(folder / name)
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(sdxl_model_index(), indent=2) + "\n")
    return {"params": sum(params.values()), "parts": params}


def sdxl_model_index() -> dict:
    """model_index.json as diffusers writes it for StableDiffusionXLPipeline."""
    import diffusers

    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_qwen2vl(folder: Path, spec: Spec) -> dict:
    """A Qwen2-VL-Instruct folder: model, tokenizer with chat template, image processor."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, config = spec.qwen()
    count = save_module(lambda: Qwen2VLForConditionalGeneration(config), folder, seed=10)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil().save_pretrained(folder)
    return {"params": count}


# ---------------------------------------------------------------------------- the release, in the authors' layout
_IP = re.compile(r"^unet\.(?P<attn>.+)\.processor\.to_(?P<kv>[kv])_ip\.weight$")
_LORA = re.compile(r"^unet\..+\.processor\.to_(q|k|v|out)_lora\.(?P<side>down|up)\.weight$")
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def release_layout(root: Path, spec: Spec) -> tuple[dict[str, tuple[tuple, torch.dtype]], dict[str, str]]:
    """Every key of the release file with its shape and dtype, and {duplicate key: the key it copies}.

    The names come from the tests' `to_release_state_dict` (the release's exact key names) run on modules built
    on the meta device: shapes only, so that no real-size weight is allocated for the layout."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    sys.path.insert(0, str(ROOT / "tests"))
    from model_checks import to_release_state_dict

    from easyref import EasyRefConfig, ReferenceEncoder
    from easyref.adapter import install_adapter

    qwen_config = AutoConfig.from_pretrained(root / "qwen2vl")
    unet_config = UNet2DConditionModel.load_config(root / "sdxl", subfolder="unet")
    config = EasyRefConfig(
        mllm_hidden_size=qwen_config.text_config.hidden_size,
        cross_attention_dim=unet_config["cross_attention_dim"],
        lora_rank=spec.lora_rank,
        has_trunk=True,
    )
    with torch.device("meta"), default_dtype(torch.bfloat16):
        unet = UNet2DConditionModel.from_config(unet_config)
        install_adapter(unet, config)
        encoder = ReferenceEncoder(config, Qwen2VLForConditionalGeneration(qwen_config), None, None)
    pipe = SimpleNamespace(unet=unet, reference_encoder=encoder, easyref_config=config)
    layout = {key: (tuple(t.shape), t.dtype) for key, t in to_release_state_dict(pipe).items()}
    aliases = {
        f"adapter_modules.{position}.to_{kv}_ip.weight": f"unet.{name}.to_{kv}_ip.weight"
        for position, name in enumerate(unet.attn_processors)
        for kv in "kv"
    }
    return layout, {dup: key for dup, key in aliases.items() if dup in layout}


class TensorSource:
    """A saved model folder's tensors by name, each read from its file when asked for. Plain reads, not
    safetensors' memory map: every mapped page read would stay in this process's RSS until the end."""

    def __init__(self, folder: Path):
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self._where.update({key: (path, 8 + size, entry) for key, entry in header.items()})

    def get(self, *names: str) -> torch.Tensor:
        """The first of `names` the folder holds (transformers has saved Qwen2-VL under two namings)."""
        for name in names:
            if name in self._where:
                return _read_tensor(*self._where[name])
        raise KeyError(f"none of {names} in the folder")


def _read_tensor(path: Path, data_start: int, entry: dict) -> torch.Tensor:
    start, end = entry["data_offsets"]
    data = bytearray(end - start)
    with open(path, "rb") as f:
        f.seek(data_start + start)
        f.readinto(data)
    dtype = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}[entry["dtype"]]
    return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


class ReleaseValues:
    """The value of each release tensor: what the authors' training module held, from the built folders.

    Frozen UNet tensors are SDXL's own; the reference k/v start from the UNet's to_k/to_v (as training
    starts them); the trunk and aggregation layer are Qwen2-VL's, perturbed by 1 % (a finetuned trunk that
    differs from the stock folder); the LoRA is nonzero, so that fusing it changes the weights."""

    def __init__(self, root: Path, aliases: dict[str, str], spec: Spec):
        from transformers import AutoConfig

        self.unet = TensorSource(root / "sdxl" / "unet")
        self.qwen = TensorSource(root / "qwen2vl")
        self.aliases = aliases
        self.rank = spec.lora_rank
        self.last_layer = AutoConfig.from_pretrained(root / "qwen2vl").text_config.num_hidden_layers - 1

    def __call__(self, key: str, shape: tuple) -> torch.Tensor:
        key = self.aliases.get(key, key)
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if m := _IP.match(key):
            return self.unet.get(f"{m['attn']}.to_{m['kv']}.weight")
        if m := _LORA.match(key):
            scale = 1 / self.rank if m["side"] == "down" else 1e-3  # down: the release's gaussian init
            return torch.randn(shape, generator=gen) * scale
        if key.startswith("unet."):
            return self.unet.get(key.removeprefix("unet."))
        if key.startswith("image_proj_model."):
            return projection_value(key, shape, gen)
        return self._mllm_value(key, shape, gen)

    def _mllm_value(self, key: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
        if key == "mllm_final_layer.reference_tokens":
            return 0.1 * torch.randn(shape, generator=gen)
        if key == "mllm_final_layer.norm.weight":
            return self.text("norm.weight")
        if key.startswith("mllm_final_layer.layers.0."):
            rest = key.removeprefix("mllm_final_layer.layers.0.")
            return finetuned(self.text(f"layers.{self.last_layer}.{rest}"), gen)
        if key == "multimodal_llm.lm_head.weight":
            return self.qwen.get("lm_head.weight", *(f"model.{p}embed_tokens.weight" for p in ("", "language_model.")))
        if key.startswith("multimodal_llm.model."):
            return finetuned(self.text(key.removeprefix("multimodal_llm.model.")), gen)
        if key.startswith("multimodal_llm.visual."):
            rest = key.removeprefix("multimodal_llm.visual.")
            return finetuned(self.qwen.get(f"visual.{rest}", f"model.visual.{rest}"), gen)
        raise KeyError(f"no value for release key {key}")

    def text(self, rest: str) -> torch.Tensor:
        return self.qwen.get(f"model.{rest}", f"model.language_model.{rest}")


def projection_value(key: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """image_proj_model.proj.{0,2} (Linear), .3 (LayerNorm): a usual initialisation."""
    if key.startswith("image_proj_model.proj.3."):
        return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    if key.endswith("bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[1])


def finetuned(tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The tensor moved by 1 % of each value (zeros stay zeros, norms stay near one)."""
    noise = torch.randn(tensor.shape, generator=gen)
    return (tensor.float() * (1 + 0.01 * noise)).to(tensor.dtype)


def write_safetensors(path: Path, layout: dict[str, tuple[tuple, torch.dtype]], value) -> None:
    """A safetensors file written one tensor at a time (`value(key, shape)` makes each): the release holds a
    UNet and an MLLM, and safetensors' own writer wants every tensor in memory at once."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (shape, dtype) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, (shape, dtype) in layout.items():
            tensor = value(key, shape).to(dtype).contiguous()
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{key}: made {tuple(tensor.shape)}, the layout says {shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def build_adapter(folder: Path, root: Path, spec: Spec) -> dict:
    """The release file written from the built folders, then `easyref convert` into `folder` (each step's time and
    peak RSS: the conversion reads only the tensors it keeps, the trunk and the adapter)."""
    from easyref.cli import main as easyref_main

    release = root / "release"
    shutil.rmtree(release, ignore_errors=True)
    release.mkdir(parents=True)
    reset_peak_rss()
    start = time.perf_counter()
    layout, aliases = release_layout(root, spec)
    write_safetensors(release / "model.safetensors", layout, ReleaseValues(root, aliases, spec))
    free_memory()
    written, written_peak = time.perf_counter() - start, peak_rss()
    reset_peak_rss()
    start = time.perf_counter()
    argv = ["convert", str(release), str(folder), "--base", str(root / "sdxl"), "--mllm", str(root / "qwen2vl")]
    if easyref_main(argv) != 0:
        raise RuntimeError("easyref convert failed (its error is above)")
    converted, converted_peak = time.perf_counter() - start, peak_rss()
    free_memory()
    return {
        "release_s": written,
        "release_peak": written_peak,
        "release_bytes": disk_bytes(release),
        "release_tensors": len(layout),
        "convert_s": converted,
        "convert_peak": converted_peak,
    }


# ---------------------------------------------------------------------------- building once
BUILDS = {"sdxl": build_sdxl, "qwen2vl": build_qwen2vl}
DEPENDS = {"adapter": ("sdxl", "qwen2vl")}


def read_marker(folder: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / MARKER).read_text())
    return None


def ensure_built(root: Path, spec: Spec) -> dict[str, dict]:
    """Each folder reused when its marker matches this spec and what it was made from, else built again."""
    records: dict[str, dict] = {}
    for name in ("sdxl", "qwen2vl", "adapter"):
        folder = root / name
        made_from = {dep: records[dep]["id"] for dep in DEPENDS.get(name, ())}
        record = read_marker(folder)
        if record and record.get("config") == spec.name and record.get("made_from", {}) == made_from:
            records[name] = dict(record, reused=True)
            continue
        logger.info("building %s (%s) ...", folder, spec.name)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        reset_peak_rss()
        start = time.perf_counter()
        info = build_adapter(folder, root, spec) if name == "adapter" else BUILDS[name](folder, spec)
        record = {
            "id": uuid.uuid4().hex,
            "config": spec.name,
            "made_from": made_from,
            "seconds": time.perf_counter() - start,
            "peak": peak_rss(),
            "bytes": disk_bytes(folder),
            "date": utc_now(),
            **info,
        }
        (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")  # last: the folder is complete
        records[name] = dict(record, reused=False)
        logger.info("built %s in %.0f s", folder, record["seconds"])
    return records


def build_table(records: dict[str, dict]) -> str:
    rows = []
    for name, r in records.items():
        when = f"reused (built {r['date']})" if r["reused"] else "now"
        params = count_text(r["params"]) if "params" in r else ""
        if name == "adapter":  # the release file and its conversion: two steps of one build
            release = [
                "release/ (authors' layout)",
                when,
                f"{r['release_s']:.0f}",
                fmt(r.get("release_peak", r["peak"])),
            ]
            rows.append([*release, fmt(r["release_bytes"]), ""])
            seconds, peak = r["convert_s"], r["convert_peak"]
            name = "adapter/ (easyref convert)"
            params = f"{r['release_tensors']} release tensors"
        else:
            seconds, peak, name = r["seconds"], r["peak"], f"{name}/"
        rows.append([name, when, f"{seconds:.0f}", fmt(peak), fmt(r["bytes"]), params])
    headers = ["folder", "built", "build s", "peak RSS of the build", "disk", "parameters"]
    return _common.markdown_table(headers, rows)


def count_text(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_references(folder: Path, count: int, size: int = 512) -> list[Path]:
    """`count` pictures of one red disc on varied noisy backgrounds (to random weights only their size matters)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        background = rng.integers(0, 256, 3)
        pixels = np.clip(background + rng.normal(0, 24, (size, size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        x, y = rng.integers(size // 8, size // 2, 2)
        radius = int(rng.integers(size // 8, size // 4))
        ImageDraw.Draw(image).ellipse([x, y, x + 2 * radius, y + 2 * radius], fill=(210, 40, 40))
        paths.append(folder / f"ref_{i}.png")
        image.save(paths[-1])
    return paths


# ============================================================================ memory probes
def _status_bytes(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM (the process's peak RSS) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    import psutil

    machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
    # steal: the hypervisor ran something else on this VM's cores; guest time is already within user
    busy = sum(getattr(machine, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))
    return busy, own.user + own.system


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt(n: float | None) -> str:
    return "" if n is None else _common.fmt_bytes(n)


# ============================================================================ the child: one measured generate
class PhaseClock:
    """Cuts a run into intervals at phase boundaries (each phase, and the time between phases) and writes, as
    each closes, its wall time, the RSS at its end and its peak RSS (one JSON line each, so that a run stopped
    part way still leaves its numbers)."""

    def __init__(self, log: Path, device: str):
        self._log = open(log, "a", buffering=1)
        self._cuda = device.startswith("cuda")
        self.exact_peaks = reset_peak_rss()
        self._lock = threading.Lock()
        self._sampled = _status_bytes("VmRSS")
        self._counts: dict[str, int] = {}
        self.active: str | None = None
        self.active_kind: str | None = None
        self.start = self._mark = time.perf_counter()
        self._cpu_mark = cpu_seconds()
        self.overall_peak = self._sampled
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        """Every 10 ms: the peak where VmHWM cannot be reset, and a check on it where it can."""
        while True:
            rss = _status_bytes("VmRSS")
            with self._lock:
                self._sampled = max(self._sampled, rss)
            time.sleep(0.01)

    def emit(self, **event) -> None:
        self._log.write(json.dumps(event) + "\n")

    def next(self, kind: str) -> int:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        return self._counts[kind]

    def _close(self, label: str) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        now, rss = time.perf_counter(), _status_bytes("VmRSS")
        with self._lock:
            peak = max(rss, self._sampled, peak_rss() if self.exact_peaks else 0)
            self._sampled = rss
        row = {"event": "row", "label": label, "seconds": now - self._mark, "rss_after": rss, "peak": peak}
        row["rss_file"] = _status_bytes("RssFile")  # weights still memory-mapped from their files
        cpu = cpu_seconds()  # other processes' CPU over the interval: on 2 cores one busy core slows torch 2x
        others = (cpu[0] - self._cpu_mark[0]) - (cpu[1] - self._cpu_mark[1])
        row["cpu_seconds"], self._cpu_mark = max(0.0, others), cpu
        if self._cuda:
            row["gpu_peak"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.emit(**row)
        self.overall_peak = max(self.overall_peak, peak)
        self._mark = now
        reset_peak_rss()

    @contextlib.contextmanager
    def phase(self, kind: str, label):
        """A phase; `label()` names it (numbered calls). One that starts inside another phase counts as
        that phase (the negative branch's own vision tower and MLLM) and is noted as nested."""
        if self.active is not None:
            start = time.perf_counter()
            try:
                yield
            finally:  # one kind inside itself (bigG's text model is a CLIPTextModel) is no news
                if kind != self.active_kind:
                    self.emit(event="nested", outer=self.active, inner=kind, seconds=time.perf_counter() - start)
            return
        self._close(GAP)
        self.active, self.active_kind = label(), kind
        self.emit(event="open", label=self.active, at=time.perf_counter() - self.start)
        try:
            yield
        finally:
            self._close(self.active)
            self.active = None

    def finish(self, code: int) -> None:
        self._close(GAP)
        seconds = time.perf_counter() - self.start
        rss, rss_file = _status_bytes("VmRSS"), _status_bytes("RssFile")
        self.emit(event="end", code=code, seconds=seconds, rss_after=rss, rss_file=rss_file, peak=self.overall_peak)


def wrap(owner, name: str, kind: str, label, clock: PhaseClock) -> bool:
    """`owner.name` (a class's method or a module's function) runs as the phase `kind`; False where it is missing
    (another checkout's code), and then that time counts as `other`."""
    original = getattr(owner, name, None)
    if original is None:
        return False

    @functools.wraps(original)
    def timed(*args, **kwargs):
        with clock.phase(kind, lambda: label(args, kwargs)):
            return original(*args, **kwargs)

    setattr(owner, name, timed)
    return True


def vision_label(clock: PhaseClock):
    """`vision tower, reference N` when each call reads one image (on a CPU), else the call and its image count."""

    def label(args, kwargs) -> str:
        grid = kwargs.get("grid_thw", args[2] if len(args) > 2 else None)
        images = 1 if grid is None else int(grid.shape[0])
        if images == 1:
            return f"vision tower, reference {clock.next('vision reference')}"
        return f"vision tower, call {clock.next('vision call')} ({images} images)"

    return label


def instrument(clock: PhaseClock) -> list[str]:
    """Wrap, at class level and before anything loads, what the generate path calls; returns what was not found."""
    import diffusers
    import transformers
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from easyref import cli, encoder

    fixed = lambda text: lambda args, kwargs: text  # noqa: E731
    unet_step = lambda args, kwargs: f"UNet step {clock.next('unet')}"  # noqa: E731
    targets = [
        (cli, "load_pipeline", "load", fixed(LOAD)),
        (modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel, "forward", "vision tower", vision_label(clock)),
        (encoder.ReferenceEncoder, "run_trunk", "MLLM", fixed(MLLM)),
        (encoder.ReferenceEncoder, "aggregate", "MLLM", fixed(MLLM)),
        (encoder.ReferenceEncoder, "encode_negative", "negative branch", fixed(NEGATIVE)),
        (transformers.CLIPTextModel, "forward", "text encoders", fixed(TEXT)),
        (transformers.CLIPTextModelWithProjection, "forward", "text encoders", fixed(TEXT)),
        (diffusers.UNet2DConditionModel, "forward", "UNet", unet_step),
        (diffusers.AutoencoderKL, "decode", "VAE decode", fixed(VAE)),
    ]
    return [f"{getattr(o, '__name__', o)}.{n}" for o, n, k, lab in targets if not wrap(o, n, k, lab, clock)]


def generate_argv(args) -> list[str]:
    models = args.models
    return [
        "generate",
        *("--base", str(models / "sdxl"), "--mllm", str(models / "qwen2vl"), "--adapter", str(args.adapter_dir)),
        *("--refs-dir", str(args.refs_dir), "--prompt", PROMPT, "--out", str(args.child_out.with_suffix(".png"))),
        *("--steps", str(args.steps), "--height", str(args.size), "--width", str(args.size), "--seed", "0"),
        *("--device", args.device, "--dtype", args.dtype),
    ]


def child_main(args) -> int:
    """One `easyref generate` through the command line's own entry point, every phase measured."""
    if args.threads:
        torch.set_num_threads(args.threads)
    # the libraries are imported before the clock starts: the load phase is the weights, not Python imports
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    import easyref
    import easyref.cli
    import easyref.pipeline  # noqa: F401

    clock = PhaseClock(args.child_out, args.device)
    missing = instrument(clock)
    clock.emit(
        event="meta",
        easyref=str(Path(easyref.__file__).parent),
        version=getattr(easyref, "__version__", "?"),
        threads=torch.get_num_threads(),
        rss_start=_status_bytes("VmRSS"),
        exact_peaks=clock.exact_peaks,
        missing=missing,
    )
    code = easyref.cli.main(generate_argv(args))
    clock.finish(code)
    # what the command left alive once it returned: garbage awaiting the collector, or something holding on
    free_memory()
    clock.emit(event="collected", rss=_status_bytes("VmRSS"), rss_file=_status_bytes("RssFile"))
    return code


# ============================================================================ the parent: runs and tables
def child_env(src: Path) -> dict:
    """The environment with `src` first on PYTHONPATH: its easyref wins over the editable install."""
    paths = [str(src)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def drop_page_cache(folder: Path) -> None:
    """Drop the model files from the page cache (no root needed), so that every run reads them from the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def wait_idle(limit: float, threshold: float = 10.0) -> float:
    """Wait, at most `limit` seconds, for 5 s in a row under `threshold` % of CPU use (other processes: on a shared
    2-core machine one busy core makes torch's two threads several times slower); the last reading."""
    import psutil

    deadline, busy = time.monotonic() + limit, psutil.cpu_percent(interval=1.0)
    quiet = int(busy <= threshold)
    while quiet < 5 and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
        quiet = quiet + 1 if busy <= threshold else 0
    if busy > threshold:
        logger.warning("the CPU is %.0f%% busy before the run: other processes will distort the timings", busy)
    return busy


def snapshot(src: Path, work: Path, name: str) -> tuple[Path, str]:
    """A copy of `src`'s easyref taken as the run starts, and a digest of its Python files: others may edit the
    tree during a run of many minutes, and a module imported late would then be another version."""
    target = work / f"{name}-src"
    shutil.copytree(src / "easyref", target / "easyref", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((target / "easyref").rglob("*.py")):
        digest.update(path.relative_to(target).as_posix().encode() + path.read_bytes())
    return target, digest.hexdigest()[:12]


def fresh_adapter(adapter: Path, target: Path) -> tuple[Path, list[str]]:
    """The adapter folder as `easyref convert` left it, for one run: generate stores the negative branch it
    computes beside the weights, and the next run would then skip it. The weights are hard-linked (nothing
    writes them), the small files copied; returns the folder and its files."""
    target.mkdir()
    names = sorted(p.name for p in adapter.iterdir() if p.is_file() and p.name != MARKER)
    for name in names:
        if name.endswith(".safetensors") and name != "negative.safetensors":
            try:
                os.link(adapter / name, target / name)
                continue
            except OSError:  # another file system: copied below
                pass
        shutil.copy2(adapter / name, target / name)
    return target, names


def run_child(args, src: Path, refs: Path, work: Path, name: str) -> dict:
    """One measured generate in a fresh process with (a snapshot of) `src`'s easyref; its events, parsed."""
    log = work / f"{name}.jsonl"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--child-out", str(log)]
    command += ["--models", str(args.models), "--refs-dir", str(refs), "--size", str(args.size)]
    command += ["--steps", str(args.steps), "--dtype", args.dtype, "--device", args.device]
    command += ["--threads", str(args.threads)] if args.threads else []
    adapter, adapter_files = fresh_adapter(args.models / "adapter", work / f"{name}-adapter")
    command += ["--adapter-dir", str(adapter)]
    if not args.keep_page_cache:
        drop_page_cache(args.models)
    busy = wait_idle(args.wait_idle) if args.device == "cpu" else None
    code_copy, digest = snapshot(src, work, name)
    logger.info("%s: easyref from %s (digest %s) ...", name, src, digest)
    started = utc_now()
    process = subprocess.Popen(
        command, env=child_env(code_copy), stdout=sys.stderr
    )  # its output is the log, not the table
    try:
        code, stopped = process.wait(timeout=args.timeout), False
    except subprocess.TimeoutExpired:
        process.kill()
        code, stopped = process.wait(), True
    run = parse_events(log)
    run.update(name=name, src=str(src), digest=digest, code=code, stopped=stopped, busy=busy, started=started)
    run["adapter_files"] = adapter_files
    return run


def parse_events(log: Path) -> dict:
    run: dict = {"rows": [], "nested": [], "open": None, "meta": {}, "end": None, "collected": None}
    if not log.exists():
        return run
    for line in log.read_text().splitlines():
        event = json.loads(line)
        kind = event.pop("event")
        if kind == "row":
            run["rows"].append(event)
            run["open"] = None
        elif kind == "open":
            run["open"] = event
        elif kind == "nested":
            run["nested"].append(event)
        else:
            run[kind] = event
    return run


def merge_rows(run: dict) -> dict[str, dict]:
    """Rows by label in order of first appearance (a label called several times summed; `other` last), then total."""
    merged: dict[str, dict] = {}
    for row in run["rows"]:
        if row["label"] == GAP and row["seconds"] < 1e-4:
            continue
        empty = {"seconds": 0.0, "calls": 0, "peak": 0, "gpu_peak": None, "others_cpu": 0.0}
        m = merged.setdefault(row["label"], empty)
        m["seconds"] += row["seconds"]
        m["others_cpu"] += row.get("cpu_seconds", 0.0)
        m["calls"] += 1
        m["rss_after"], m["rss_file"] = row["rss_after"], row.get("rss_file")
        m["peak"] = max(m["peak"], row["peak"])
        if "gpu_peak" in row:
            m["gpu_peak"] = max(m["gpu_peak"] or 0, row["gpu_peak"])
    if GAP in merged:
        merged[GAP] = merged.pop(GAP)
    end = run["end"]
    if end is not None:
        peaks = [m["gpu_peak"] for m in merged.values() if m["gpu_peak"] is not None]
        total = {"seconds": end["seconds"], "calls": 1, "rss_after": end["rss_after"], "peak": end["peak"]}
        total["rss_file"] = end.get("rss_file")
        total["others_cpu"] = sum(m["others_cpu"] for m in merged.values())
        merged["total"] = dict(total, gpu_peak=max(peaks) if peaks else None)
    return merged


def seconds_text(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.2f}" if s < 10 else f"{s:.1f}"


def others_text(m: dict) -> str:
    """Other processes' mean CPU use during the phase, in cores."""
    return f"{m['others_cpu'] / m['seconds']:.2f}" if m.get("seconds") else ""


def ratio_text(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def single_table(run: dict) -> str:
    merged = merge_rows(run)
    gpu = any(m["gpu_peak"] is not None for m in merged.values())
    rows = []
    for label, m in merged.items():
        row = [label, m["calls"], seconds_text(m["seconds"]), others_text(m)]
        row += [fmt(m["rss_after"]), fmt(m["rss_file"]), fmt(m["peak"])]
        rows.append(row + ([fmt(m["gpu_peak"])] if gpu else []))
    headers = ["phase", "calls", "wall s", "others' CPU (cores)", "RSS after", "of it file-mapped", "peak RSS during"]
    headers += ["GPU peak allocated"] if gpu else []
    return _common.markdown_table(headers, rows)


def side_by_side_table(before: dict, after: dict) -> str:
    b, a = merge_rows(before), merge_rows(after)
    labels = [x for x in a if x not in (GAP, "total")] + [x for x in b if x not in a and x not in (GAP, "total")]
    labels += [x for x in (GAP, "total") if x in a or x in b]
    gpu = any(m["gpu_peak"] is not None for m in [*a.values(), *b.values()])
    rows = []
    for label in labels:
        x, y = b.get(label, {}), a.get(label, {})
        row = [label, seconds_text(x.get("seconds")), seconds_text(y.get("seconds"))]
        row += [ratio_text(y.get("seconds"), x.get("seconds")), others_text(x), others_text(y)]
        row += [fmt(x.get("rss_after")), fmt(y.get("rss_after"))]
        row += [fmt(x.get("rss_file")), fmt(y.get("rss_file"))]
        row += [fmt(x.get("peak")), fmt(y.get("peak")), ratio_text(y.get("peak"), x.get("peak"))]
        if gpu:
            row += [fmt(x.get("gpu_peak")), fmt(y.get("gpu_peak"))]
        rows.append(row)
    headers = ["phase", "before s", "after s", "after/before time", "others' CPU: before", "others' CPU: after"]
    headers += ["RSS after: before", "RSS after: after"]
    headers += ["file-mapped: before", "file-mapped: after", "peak: before", "peak: after", "after/before peak"]
    headers += ["GPU peak: before", "GPU peak: after"] if gpu else []
    return _common.markdown_table(headers, rows)


def run_notes(run: dict) -> list[str]:
    """The lines under a table: which code, the load ratio, a stop, nested phases, phases not found."""
    meta, merged = run["meta"], merge_rows(run)
    notes = [f"{run['name']}: easyref of {run['src']} as it was at {run['started']} (digest {run['digest']})"]
    if run.get("adapter_files"):
        notes[-1] += f"; adapter/ as converted: {', '.join(run['adapter_files'])}"
    if meta:
        how = "VmHWM reset per phase" if meta.get("exact_peaks") else "RSS sampled every 10 ms"
        notes[-1] += f"; RSS with the libraries imported, before loading: {fmt(meta['rss_start'])}; peaks: {how}"
    load = merged.get(LOAD)
    if load:
        ratio = load["peak"] / load["rss_after"]
        notes.append(
            f"{run['name']}: load peak {fmt(load['peak'])} / RSS kept after load {fmt(load['rss_after'])} "
            f"= **{ratio:.2f}x** (the issue's target: <= 1.1x)"
        )
    if run["end"] and run["collected"]:
        notes.append(
            f"{run['name']}: RSS once the command returned {fmt(run['end']['rss_after'])}; after gc.collect() and "
            f"malloc_trim {fmt(run['collected']['rss'])}"
        )
    phases = {label: m for label, m in merged.items() if label != "total"}
    if phases:
        top = max(phases, key=lambda label: phases[label]["peak"])
        notes.append(f"{run['name']}: highest peak {fmt(phases[top]['peak'])}, in `{top}`")
    if run["stopped"] or run["code"]:
        where = f"; it was in `{run['open']['label']}`" if run["open"] else ""
        what = "stopped after the --timeout" if run["stopped"] else f"exited with code {run['code']}"
        notes.append(f"{run['name']}: **{what}**{where}; the rows above are what it finished")
    for n in run["nested"]:
        notes.append(f"{run['name']}: {n['inner']} ran inside `{n['outer']}` ({n['seconds']:.2f} s, counted there)")
    absent = [label for label in (LOAD, MLLM, NEGATIVE, TEXT, VAE) if label not in merged]
    if absent and run["end"] is not None:  # e.g. a negative branch stored with the adapter or cached
        notes.append(f"{run['name']}: did not run in this process: {', '.join(absent)}")
    if meta.get("missing"):
        notes.append(f"{run['name']}: not found in this code, counted as other: {', '.join(meta['missing'])}")
    return notes


def report(args, runs: list[dict]) -> str:
    machine = _common.machine_line(torch.device(args.device))
    busy = [r["busy"] for r in runs if r["busy"] is not None]
    lines = [
        f"### `easyref generate` at the {args.config} size, phase by phase (random weights)",
        "",
        f"{machine}; {utc_now()}; {args.size} x {args.size} px, {args.steps} steps, {args.refs} references, "
        f"{args.dtype}, {args.device}; guidance 5.0 (negative branch on); "
        + ("page cache kept" if args.keep_page_cache else "model files dropped from the page cache before each run")
        + (f"; CPU {max(busy):.0f}% busy before the runs" if busy else ""),
        "",
        side_by_side_table(*runs) if len(runs) == 2 else single_table(runs[0]),
        "",
    ]
    if len(runs) == 2:
        lines += [f"- {line}" for run in runs for line in run_notes(run)]
    else:
        lines += [f"- {line}" for line in run_notes(runs[0])]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", type=Path, default=ROOT / "runs" / "real-size", help="where the folders are built")
    p.add_argument("--config", choices=list(SPECS), default="real", help="real size, or small for a quick check")
    p.add_argument("--size", type=int, default=1024, help="output side in px")
    p.add_argument("--steps", type=int, default=2, help="denoising steps")
    p.add_argument("--refs", type=int, default=3, help="reference images (generated, written to disk)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the run (0: torch's default)")
    p.add_argument("--baseline-src", type=Path, help="another checkout's src/: measured first, shown side by side")
    p.add_argument("--wait-idle", type=float, default=0, help="wait up to this many seconds for an idle CPU per run")
    p.add_argument("--timeout", type=float, help="stop a run after this many seconds and report what it finished")
    p.add_argument("--build-only", action="store_true", help="build (or check) the folders and stop")
    p.add_argument("--keep-page-cache", action="store_true", help="do not drop the model files from the page cache")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--refs-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--adapter-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.models = args.models.resolve()
    if args.child:
        return child_main(args)
    _common.setup_logging(args.verbose)
    if args.baseline_src is not None and not (args.baseline_src / "easyref" / "__init__.py").is_file():
        raise SystemExit(f"--baseline-src {args.baseline_src} holds no easyref package")
    start = time.perf_counter()
    records = ensure_built(args.models, SPECS[args.config])
    print(f"### Model folders under {args.models} ({args.config} size, bfloat16)\n")
    print(build_table(records))
    print(f"\n(build or check: {time.perf_counter() - start:.0f} s)\n")
    if args.build_only:
        return 0
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="real-size-") as tmp:
        work = Path(tmp)
        refs = work / "refs"
        write_references(refs, args.refs)
        sources = [("before", args.baseline_src.resolve())] if args.baseline_src else []
        sources.append(("after", ROOT / "src"))
        runs = [run_child(args, src, refs, work, name) for name, src in sources]
    print(report(args, runs))
    return 0 if all(r["code"] == 0 and not r["stopped"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
