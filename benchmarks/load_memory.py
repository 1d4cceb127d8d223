"""Peak memory while loading a pipeline against what the loaded pipeline keeps (issue 27).

Run (from the repository root):

    .venv/bin/python benchmarks/load_memory.py                   # mid size, ~1 GB of weights, ~1 min
    .venv/bin/python benchmarks/load_memory.py --size test --phases
    PYTHONPATH=/other/checkout/src .venv/bin/python benchmarks/load_memory.py   # another easyref

The real case is SDXL base (fp32 on disk) + Qwen2-VL-2B (bf16) + a release with a finetuned MLLM trunk and
a UNet LoRA, loaded in bfloat16. This builds the same layout from random models scaled down (`SIZES`),
saves them as a user has them (SDXL and Qwen2-VL folders, a release file converted with `easyref convert`),
then, in a fresh process, loads `EasyRefPipeline.from_pretrained(base, mllm=..., adapter=...)` and reads
the process's peak RSS (VmHWM, reset just before the load) and its RSS after the load, each above the RSS
before it. `peak / kept` is what the issue asks to bring to <= 1.1.

The child process first loads tiny models once, so that the code the load imports is already in memory
and "kept" is weights, not modules. `--phases` shows where the peak comes from.

Measured on the 2-core machine (mid size, 1 thread): before issue 27, kept 933-943 MiB, peak 1.47-1.53 GiB
above the start, peak / kept 1.61-1.70 (the checkpoint file held from the start, 314 MiB; diffusers holding
the whole fp32 UNet file while converting it to bf16; a copy of every LoRA-adapted UNet weight, 110 MiB);
after, kept 852-862 MiB and peak / kept 1.00.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import _common  # noqa: E402

# UNet channels and transformer depths, text-encoder width, Qwen2-VL language and vision sizes, LoRA rank.
# `mid`: about 1 GB of bf16 weights kept, in the real parts' proportions; `test`: what the test loads.
SIZES = {
    "mid": dict(
        channels=(128, 256, 512), depths=(1, 2, 4), text=256, text_layers=12, text_vocab=49408,
        llm=512, llm_mlp=2816, llm_layers=20, vocab=32000, vision=384, vision_depth=12, rank=32,
    ),
    "test": dict(
        channels=(64, 128, 256), depths=(1, 2, 3), text=128, text_layers=4, text_vocab=8192,
        llm=256, llm_mlp=1408, llm_layers=10, vocab=16000, vision=192, vision_depth=6, rank=16,
    ),
}  # fmt: skip

# VmHWM is the peak RSS of this process image; writing 5 to clear_refs resets it to the current RSS
CHILD = """
import gc, json, sys, time, torch
from easyref import EasyRefPipeline
from easyref.tiny import save_tiny_qwen2vl, save_tiny_sdxl
torch.set_num_threads({threads})  # memory does not depend on it; on a busy machine one thread is quicker

def status(name):
    return int([l for l in open('/proc/self/status') if l.startswith(name + ':')][0].split()[1]) * 1024

warm = EasyRefPipeline.from_pretrained(
    save_tiny_sdxl({tmp!r} + '/sdxl'), mllm=save_tiny_qwen2vl({tmp!r} + '/qwen'),
    config_overrides=dict(lora_rank=4, has_trunk=True), dtype=torch.bfloat16)
warm.unfuse_lora()
del warm
gc.collect()
{phases}
before = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
start = time.perf_counter()
pipe = EasyRefPipeline.from_pretrained({base!r}, mllm={mllm!r}, adapter={adapter!r}, dtype=torch.bfloat16)
seconds = time.perf_counter() - start
gc.collect()
after, peak = status('VmRSS'), status('VmHWM')
weights = sum(t.numel() * t.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
              for t in list(m.parameters()) + list(m.buffers()))
print(json.dumps(dict(before=before, after=after, peak=peak, weights=weights, seconds=seconds)))
"""

# --phases: RSS (anonymous / file-backed) and the peak so far at the entry and exit of each loading step
PHASES = """
import functools
def _wrap(owner, name):
    real = getattr(owner, name)
    def show(tag):
        anon, file = status('RssAnon'), status('RssFile')
        print(f'{tag:<48} anon {anon / 2**20:7.0f} MiB  file {file / 2**20:7.0f} MiB  '
              f'peak {status("VmHWM") / 2**20:7.0f} MiB', file=sys.stderr)
    @functools.wraps(real)
    def wrapped(*args, **kwargs):
        show('> ' + getattr(owner, '__name__', '') + '.' + name)
        try:
            return real(*args, **kwargs)
        finally:
            show('< ' + getattr(owner, '__name__', '') + '.' + name)
    setattr(owner, name, wrapped)
import diffusers, transformers, easyref.pipeline as P, easyref.encoder as E, easyref.checkpoint as C
import easyref.adapter as A
STEPS = [(P, 'read_checkpoint'), (P, '_read_unet'), (diffusers.StableDiffusionXLPipeline, 'from_pretrained'),
         (diffusers.UNet2DConditionModel, 'from_pretrained'), (transformers.CLIPTextModel, 'from_pretrained'),
         (E.ReferenceEncoder, 'from_pretrained'), (P, 'install_adapter'), (P, 'apply_checkpoint'),
         (C, '_load_trunk'), (A, 'load_adapter_state_dict'), (P, 'fuse_lora'), (E.ReferenceEncoder, 'to')]
for owner, name in STEPS:
    if hasattr(owner, name):  # the steps another checkout has
        _wrap(owner, name)
"""


def build(folder: Path, size: str, cli: bool = True) -> dict[str, Path]:
    """SDXL (fp32) and Qwen2-VL (bf16) folders, a bf16 release file with trunk + LoRA, and its conversion:
    by `easyref convert` as a user converts it, or (`cli=False`, quicker) by `easyref.release.convert_release`
    alone, which writes the same weights (the command also stores the negative branch, read only when
    generating)."""
    from easyref.cli import main
    from easyref.release import convert_release

    s = SIZES[size]
    paths = {"base": _save_sdxl(folder / "sdxl", s), "mllm": _save_qwen2vl(folder / "qwen", s)}
    release = folder / "release"
    release.mkdir()
    _save_release(release / "model.safetensors", paths["base"], paths["mllm"], s["rank"])
    paths["adapter"] = folder / "converted"
    if not cli:
        convert_release(release, paths["adapter"], mllm=str(paths["mllm"]), base=str(paths["base"]))
        return paths
    argv = ["convert", str(release), str(paths["adapter"]), "--base", str(paths["base"])]
    if main([*argv, "--mllm", str(paths["mllm"])]) != 0:
        raise RuntimeError("easyref convert failed")
    return paths


def _save_sdxl(path: Path, s: dict) -> Path:
    """A scaled SDXL: three UNet levels (the last two with attention), two CLIP text encoders, a small VAE."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from easyref.tiny import tiny_clip_tokenizer

    torch.manual_seed(0)
    text = CLIPTextConfig(
        hidden_size=s["text"], intermediate_size=4 * s["text"], num_attention_heads=s["text"] // 64,
        num_hidden_layers=s["text_layers"], vocab_size=s["text_vocab"], projection_dim=s["text"],
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        block_out_channels=s["channels"], layers_per_block=2, sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=[c // 64 for c in s["channels"]], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=32, transformer_layers_per_block=s["depths"],
        projection_class_embeddings_input_dim=6 * 32 + s["text"], cross_attention_dim=2 * s["text"],
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="leading"),
    )  # fmt: skip
    pipe.save_pretrained(path)  # fp32, as SDXL base is published
    return path


def _save_qwen2vl(path: Path, s: dict) -> Path:
    """A scaled Qwen2-VL-Instruct folder in bf16 (as Qwen2-VL-2B is published)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from easyref.tiny import save_tiny_qwen2vl, tiny_qwen2vl_config

    save_tiny_qwen2vl(path)  # tokenizer, chat template and image processor; the model is replaced below
    values = tiny_qwen2vl_config(s["vocab"], initializer_range=0.02).to_dict()
    text, vision = values["text_config"], values["vision_config"]
    text.pop("layer_types", None)  # derived from the depth, which changes
    text.update(hidden_size=s["llm"], intermediate_size=s["llm_mlp"], num_hidden_layers=s["llm_layers"])
    text.update(num_attention_heads=s["llm"] // 64, num_key_value_heads=2)
    text["rope_parameters"]["mrope_section"] = [8, 12, 12]  # sums to half the head width (64)
    vision.update(embed_dim=s["vision"], depth=s["vision_depth"], num_heads=6, mlp_ratio=4, hidden_size=s["llm"])
    config = Qwen2VLConfig(**values)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _save_release(path: Path, base: Path, mllm: Path, rank: int) -> None:
    """The authors' layout (`tests/model_checks.to_release_state_dict`) with a trained-looking LoRA and a
    finetuned trunk, in bf16, without the frozen base UNet (the conversion drops it anyway)."""
    from model_checks import perturb_trunk, to_release_state_dict
    from safetensors.torch import save_file

    from easyref import EasyRefPipeline
    from easyref.adapter import adapter_parameters

    pipe = EasyRefPipeline.from_pretrained(
        base, mllm=mllm, config_overrides=dict(lora_rank=rank, has_trunk=True), fuse_lora=False
    )
    with torch.no_grad():
        for param in adapter_parameters(pipe.unet):
            param.add_(0.02 * torch.randn_like(param))
    perturb_trunk(pipe)
    tensors = to_release_state_dict(pipe, with_duplicates=False)
    kept = {k: v.to(torch.bfloat16) for k, v in tensors.items() if not k.startswith("unet.") or ".processor." in k}
    save_file(kept, str(path))


def measure(paths: dict[str, Path], phases: bool = False, threads: int = 1) -> dict[str, int]:
    """Load in a fresh process (the caller's PYTHONPATH decides which easyref): RSS before, after, peak."""
    with tempfile.TemporaryDirectory() as tmp:
        code = CHILD.format(
            tmp=tmp,
            threads=threads,
            phases=PHASES if phases else "",
            **{k: str(v) for k, v in paths.items()},
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        raise RuntimeError(f"the loading process failed:\n{out.stderr[-4000:]}")
    if phases:
        sys.stderr.write("".join(line + "\n" for line in out.stderr.splitlines() if " MiB " in line))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["kept"] = result["after"] - result["before"]
    result["extra_peak"] = result["peak"] - result["before"]
    result["ratio"] = result["extra_peak"] / result["kept"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="mid")
    p.add_argument("--folder", type=Path, help="build into (or reuse) this folder instead of a temporary one")
    p.add_argument("--phases", action="store_true", help="print RSS at the entry and exit of each loading step")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the loading process")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    _common.setup_logging(args.verbose)
    import easyref

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        names = {"base": folder / "sdxl", "mllm": folder / "qwen", "adapter": folder / "converted"}
        paths = names if names["adapter"].is_dir() else build(folder, args.size)
        rows = []
        for _ in range(args.repeats):
            r = measure(paths, args.phases, args.threads)
            sizes = [_common.fmt_bytes(r[k]) for k in ("weights", "before", "kept", "extra_peak")]
            rows.append([*sizes, f"{r['ratio']:.2f}", f"{r['seconds']:.1f}"])
    torch.set_num_threads(args.threads)  # the loading process's, for the line below
    print(f"### Loading a {args.size}-size pipeline (bf16) with a converted release (trunk + LoRA)\n")
    print(f"easyref from {Path(easyref.__file__).parent}; {_common.machine_line(torch.device('cpu'))}\n")
    headers = ["weights held", "RSS before", "kept (RSS after - before)", "peak - before", "peak / kept", "load s"]
    print(_common.markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
