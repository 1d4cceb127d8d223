"""Import of the authors' release format (hub `zongzhuofan/EasyRef`).

The release is one file, `model.safetensors`, holding the state dict of the authors' whole training
module (a training run's `.bin`/`.pt` of the same dict is read too, never unpickled). It was trained on SDXL base 1.0
(`stabilityai/stable-diffusion-xl-base-1.0`) and Qwen2-VL-2B-Instruct (`Qwen/Qwen2-VL-2B-Instruct`),
which the imported config records as its `base` and `mllm`. Its keys -> ours:
  image_proj_model.proj.{0,2,3}.*                 -> unet.encoder_hid_proj.image_projection_layers.0.{ff.net.0.proj,ff.net.2,norm}.*
                                                     (Linear - GELU - Linear - LayerNorm: diffusers' IPAdapterFullImageProjection)
  mllm_final_layer.{reference_tokens,layers.0.*,norm.weight}
                                                  -> aggregator.*  (64 x 1536 reference tokens, the aggregation layer)
  unet.<attn>.processor.to_{k,v}_ip.weight        -> unet.<attn>.processor.to_{k,v}_ip.0.weight  (every cross-attention)
  unet.<attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight   (the stage 2-3 UNet LoRA, rank 128, alpha = rank)
                                                  -> unet.lora.<attn>.{to_q,to_k,to_v,to_out.0}.lora_{A,B}.weight
  multimodal_llm.{model.layers,model.embed_tokens,model.norm,visual}.*
                                                  -> trunk.{layers,embed_tokens,norm,visual}.*
The `multimodal_llm.*` tensors are the MLLM trunk the authors finetuned in stages 2-3, under the
names transformers 4.45 gave them; for the released model they replace the stock Qwen2-VL trunk.
Because the file saves the whole training module it also holds tensors that are ignored, and
reported: the frozen base UNet (`unet.*` that is not a processor tensor; SDXL's own copy is used),
`adapter_modules.N.*` duplicates of the processor tensors (N = position in `unet.attn_processors`;
some copies have them, some not) and `multimodal_llm.lm_head.*` (never used for reference tokens).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointTensors,
    check_finite,
    is_easyref_checkpoint,
    read_own_checkpoint,
    write_checkpoint,
)
from .config import CONFIG_NAME, EasyRefConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

RELEASE_REPO = "zongzhuofan/EasyRef"  # the authors' weights on the Hugging Face hub
RELEASE_NAMES = ("model.safetensors", "easyref.bin", "model.bin", "pytorch_model.bin")
RELEASE_BASE = EasyRefConfig.base  # what the release was trained on; EasyRefConfig's defaults are the release's
RELEASE_MLLM = EasyRefConfig.mllm
_PROJ = {"0": "ff.net.0.proj", "2": "ff.net.2", "3": "norm"}
_LORA_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_LORA_SIDE = {"down": "lora_A", "up": "lora_B"}
_IP_RE = re.compile(r"^unet\.(?P<attn>.+)\.processor\.(?P<kv>to_[kv]_ip)\.weight$")
_LORA_RE = re.compile(r"^unet\.(?P<attn>.+)\.processor\.(?P<t>to_q|to_k|to_v|to_out)_lora\.(?P<s>down|up)\.weight$")
_TRUNK = {
    "multimodal_llm.model.layers.": "trunk.layers.",
    "multimodal_llm.model.embed_tokens.": "trunk.embed_tokens.",
    "multimodal_llm.model.norm.": "trunk.norm.",
    "multimodal_llm.visual.": "trunk.visual.",
}


def read_checkpoint(path: str | Path) -> tuple[EasyRefConfig, Mapping[str, torch.Tensor]]:
    """An adapter in either format: our checkpoint folder, or the authors' release (imported on the fly).

    From a safetensors file the tensors are a `CheckpointTensors`: only the header is read here, and each
    tensor is read, and refused if it holds NaN or Inf, when it is used, so that loading holds one at a
    time. A torch `.bin` is read (memory-mapped) and checked here."""
    path = Path(path)
    config, tensors = read_own_checkpoint(path) if is_easyref_checkpoint(path) else import_release(path)
    if not isinstance(tensors, CheckpointTensors):
        check_finite(tensors, path)
    return config, tensors


def find_release_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in RELEASE_NAMES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path}: no easyref_config.json + easyref.safetensors, and no release file ({', '.join(RELEASE_NAMES)})"
    )


def read_release_tensors(path: Path) -> Mapping[str, torch.Tensor]:
    """Read without unpickling anything: safetensors, or torch.load(weights_only=True) for .bin/.pt.

    Tensors are read when asked for: the release file holds the whole training module (the frozen base
    UNet and the language-model head too, most of its size), and the conversion takes only the adapter's
    and the trunk's tensors, so the rest is never brought into memory (safetensors by key, a torch file
    through a memory map)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            return _SafetensorsFile(path)
        data = _torch_load(path)
    except Exception as err:  # damaged or hostile files raise many different types
        raise CheckpointError(_read_error(path, err)) from None
    if isinstance(data, dict) and isinstance(data.get("module"), dict):  # DeepSpeed's wrapper
        data = data["module"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return data


def _read_error(path: Path, err: Exception) -> str:
    """One line for a file that could not be read. torch's own text runs to several lines and, for a pickle
    its weights-only reader refuses, advises loading it with weights_only=False: the one thing never to do
    with a file from a stranger, so that refusal gets a sentence of its own."""
    if isinstance(err, pickle.UnpicklingError):  # weights_only: an object other than tensors, or a damaged pickle
        return (
            f"{path} holds Python objects other than tensors, or is damaged (a pickle that could run code when "
            "loaded); only tensors are read from a release file: refused"
        )
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # the type says what the first line may not: `KeyError: '101'`, an `EOFError` with no text at all
    return f"cannot read {path}: {type(err).__name__}" + (f": {lines[0]}" if lines else "")


class _SafetensorsFile(Mapping):
    """A safetensors file as a read-only mapping; each tensor is read from the file on access."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _torch_load(path: Path):
    import torch

    try:  # a memory map pages in only the tensors that are read; files in the pre-zip format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def convert_release_tensors(
    tensors: Mapping[str, torch.Tensor], mllm: str = RELEASE_MLLM, base: str = RELEASE_BASE
) -> tuple[EasyRefConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Release state dict -> (config recording `base` and `mllm`, our tensors, {ignored key: reason})."""
    names, ignored = release_names(tensors)
    out = {new_key: tensors[key] for new_key, key in names.items()}  # a tensor not kept is never read
    return _infer_config(out, mllm, base), out, ignored


def release_names(keys) -> tuple[dict[str, str], dict[str, str]]:
    """Release keys -> ({our key: release key} for those kept, {ignored release key: reason})."""
    names: dict[str, str] = {}
    ignored: dict[str, str] = {}
    for key in keys:
        new_key, reason = _convert_key(key)
        if new_key is not None:
            names[new_key] = key
        elif reason is not None:
            ignored[key] = reason
        else:
            raise CheckpointError(f"unexpected tensor {key} in the release checkpoint")
    return names, ignored


def _convert_key(key: str) -> tuple[str | None, str | None]:
    if key.startswith("image_proj_model.proj."):
        index, _, rest = key.removeprefix("image_proj_model.proj.").partition(".")
        if index not in _PROJ:
            return None, None
        return f"unet.encoder_hid_proj.image_projection_layers.0.{_PROJ[index]}.{rest}", None
    if key.startswith("mllm_final_layer."):
        return "aggregator." + key.removeprefix("mllm_final_layer."), None
    if m := _IP_RE.match(key):
        return f"unet.{m['attn']}.processor.{m['kv']}.0.weight", None
    if m := _LORA_RE.match(key):
        return f"unet.lora.{m['attn']}.{_LORA_TARGET[m['t']]}.{_LORA_SIDE[m['s']]}.weight", None
    for old, new in _TRUNK.items():
        if key.startswith(old):
            return new + key.removeprefix(old), None
    if key.startswith("multimodal_llm.lm_head."):
        return None, "language-model head: never used for reference tokens"
    if key.startswith("unet."):
        return None, "frozen base UNet weight: the base model's own copy is used"
    if key.startswith("adapter_modules."):
        return None, "duplicate of a UNet processor tensor"
    return None, None


def _infer_config(tensors: dict[str, torch.Tensor], mllm: str, base: str) -> EasyRefConfig:
    try:
        tokens = tensors["aggregator.reference_tokens"]
        proj_out = tensors["unet.encoder_hid_proj.image_projection_layers.0.ff.net.2.weight"]
    except KeyError as err:
        raise CheckpointError(f"release checkpoint is missing tensor {err.args[0]}") from None
    ranks = {t.shape[0] for k, t in tensors.items() if k.startswith("unet.lora.") and k.endswith("lora_A.weight")}
    if len(ranks) > 1:
        raise CheckpointError(f"release checkpoint mixes LoRA ranks {sorted(ranks)}")
    return EasyRefConfig(
        mllm=mllm,
        base=base,
        num_reference_tokens=tokens.shape[0],
        mllm_hidden_size=tokens.shape[1],
        cross_attention_dim=proj_out.shape[0],
        lora_rank=ranks.pop() if ranks else 0,
        has_trunk=any(k.startswith("trunk.") for k in tensors),
        attention_mode="official",
    )


def import_release(
    path: str | Path, mllm: str = RELEASE_MLLM, base: str = RELEASE_BASE
) -> tuple[EasyRefConfig, Mapping[str, torch.Tensor]]:
    """The release as a checkpoint in our names; from a safetensors file, read when used (`read_checkpoint`)."""
    source = find_release_file(Path(path))
    if source.suffix == ".safetensors":
        release = CheckpointTensors.open(source)
        names, ignored = release_names(release)
        tensors = CheckpointTensors.open(source, source=Path(path), names=names)
        config = _infer_config(tensors.stand_ins(), mllm, base)  # from the header's shapes
    else:
        config, tensors, ignored = convert_release_tensors(read_release_tensors(source), mllm, base)
    log_ignored(ignored)
    return config, tensors


def log_ignored(ignored: dict[str, str]) -> None:
    by_reason: dict[str, int] = {}
    for reason in ignored.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    for reason, count in sorted(by_reason.items()):
        logger.info("ignored %d release tensors: %s", count, reason)


def convert_release(
    src: str | Path, dst: str | Path, mllm: str = RELEASE_MLLM, base: str = RELEASE_BASE
) -> tuple[EasyRefConfig, dict[str, str]]:
    """`easyref convert`: release file -> our checkpoint folder. Returns the config and what was ignored."""
    source = find_release_file(Path(src))
    dst = Path(dst)
    _check_not_overwriting(source, dst)
    config, tensors, ignored = convert_release_tensors(read_release_tensors(source), mllm, base)
    check_finite(tensors, source)
    dst.mkdir(parents=True, exist_ok=True)
    write_checkpoint(dst, config, {k: v.contiguous() for k, v in tensors.items()})
    return config, ignored


def _check_not_overwriting(source: Path, dst: Path) -> None:
    """The converted files may replace an earlier conversion, never the release file being read."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"output {dst} exists and is not a folder")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        target = dst / name
        if target.exists() and target.samefile(source):
            raise CheckpointError(f"output {target} is the release file being converted; choose another output folder")
