"""Decoupled cross-attention on a diffusers UNet, installed with diffusers' own IP-Adapter machinery.

Paper, Sec. 3.2 "reference representation injection": every cross-attention gets `to_k_ip` / `to_v_ip`
(initialised from `to_k` / `to_v`) over the projected reference tokens; output = text attention +
scale * reference attention (`IPAdapterAttnProcessor2_0`). The projection is
`IPAdapterFullImageProjection` inside `MultiIPAdapterImageProjection`, so the pipeline passes tokens as
`ip_adapter_image_embeds`. Stages 2-3 add a UNet LoRA on q/k/v/out of every attention (peft).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterFullImageProjection, MultiIPAdapterImageProjection

from .config import EasyRefConfig

logger = logging.getLogger(__name__)

LORA_ADAPTER_NAME = "easyref"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_STATE_ATTR = "_easyref_adapter_state"
_FILES_ATTR = "_easyref_weight_files"


@dataclass
class _OriginalUNetState:
    """What installing changed, so that `unload_adapter` can put it back exactly."""

    processors: dict
    encoder_hid_proj: torch.nn.Module | None
    encoder_hid_dim_type: str | None
    lora: bool = False
    extra: dict = field(default_factory=dict)
    # while the LoRA is fused, per adapted layer: peft's wrapper, taken out of the UNet so that a call
    # dispatches through nothing, and how to put the layer's own weight back bit for bit: the name under
    # which the UNet's `WeightFiles` reads it again, or, for a weight no file holds, a copy on the CPU
    fused: dict[str, tuple[torch.nn.Module, str | torch.Tensor]] | None = None


class TensorFile:
    """A safetensors file read one tensor at a time, each into memory of its own.

    safetensors' default reader maps the whole file, and every page a tensor read through it touched stays in
    the process's memory until the last such tensor is gone: converting a file's tensors one by one (fp32 on
    disk, bf16 in the model) ends up holding the whole file besides the converted copy. Reading each tensor
    with `pread` holds one tensor at a time. (safetensors before 0.8 has no `pread`: there each read maps the
    file on its own and copies the tensor out, which frees the map with the copy made.)"""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu", backend="pread")
            self._header = self._file
        except TypeError:  # an older safetensors without the `backend` choice: the map serves the header only
            self._file = None
            self._header = safe_open(str(self.path), framework="pt", device="cpu")

    def keys(self) -> list[str]:
        return list(self._header.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header.get_slice(key).get_shape())

    def read(self, key: str) -> torch.Tensor:
        if self._file is not None:
            return self._file.get_tensor(key)
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as file:
            return file.get_tensor(key).clone()


def file_stamp(path: Path) -> tuple[int, ...]:
    """What changes when a file is written again or replaced (its inode, size, modification time)."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class _FileWeight:
    """Where one UNet weight was read from, and the tensor that read it while it still holds that value."""

    def __init__(self, file: Path, stamp: tuple[int, ...], dtype: torch.dtype, tensor: torch.Tensor):
        self.file, self.stamp, self.dtype = file, stamp, dtype
        self.held_by(tensor)

    def held_by(self, tensor: torch.Tensor) -> None:
        # `_version` counts the tensor's in-place changes (an optimizer step, a merge, a copy_), so an equal
        # count on the same tensor means the value is still the file's (moves and dtype changes keep both)
        self._tensor, self._version = weakref.ref(tensor), tensor._version

    def holds(self, tensor: torch.Tensor) -> bool:
        return self._tensor() is tensor and tensor._version == self._version


class WeightFiles:
    """Which of a UNet's weights still hold what a safetensors file gives them, recorded by the loader that
    read them (`easyref.pipeline`), so that `fuse_lora` keeps no copy of those: `unfuse_lora` reads them again.
    The read is converted as the load converted it (to the load's dtype, then to the weight's current one, as
    a kept copy would have been), so the weight comes back bit for bit."""

    def __init__(self):
        self._weights: dict[str, _FileWeight] = {}
        self._open: dict[Path, TensorFile] | None = None  # within `reading()`: each file opened once

    def add(self, name: str, file: Path, stamp: tuple[int, ...], tensor: torch.Tensor) -> None:
        """`tensor`, the UNet's weight `name`, was just read from `file` (as `file_stamp` found it before the
        read) under that name, then converted."""
        self._weights[name] = _FileWeight(file, stamp, tensor.dtype, tensor)

    def holds(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether `tensor` still holds the file's value, and the file still gives it."""
        record = self._weights.get(name)
        return record is not None and record.holds(tensor) and self._unchanged(record)

    def check(self, names) -> None:
        """Refuse, before anything is restored, where a file was written over since the load (a save into the
        same folder, say): it no longer holds the weights to put back."""
        for name in names:
            record = self._weights[name]
            if not self._unchanged(record):
                raise RuntimeError(
                    f"cannot put the UNet weight {name} back: {record.file} has changed since the pipeline "
                    "was loaded (load the pipeline again)"
                )

    def restore(self, name: str, tensor: torch.Tensor) -> None:
        """Put the file's value back into `tensor` (the weight `name`, fused or changed since)."""
        record = self._weights[name]
        with torch.no_grad():
            tensor.copy_(self._file(record.file).read(name).to(record.dtype))
        record.held_by(tensor)

    def _unchanged(self, record: _FileWeight) -> bool:
        try:
            return file_stamp(record.file) == record.stamp
        except OSError:
            return False

    def _file(self, path: Path) -> TensorFile:
        if self._open is None:
            return TensorFile(path)
        if path not in self._open:
            self._open[path] = TensorFile(path)
        return self._open[path]

    @contextmanager
    def reading(self):
        """Within the block, each file is opened once however many weights are restored from it."""
        self._open = {}
        try:
            yield
        finally:
            self._open = None


def weight_files(unet) -> WeightFiles | None:
    return getattr(unet, _FILES_ATTR, None)


def set_weight_files(unet, files: WeightFiles) -> None:
    setattr(unet, _FILES_ATTR, files)


class _Fixed(torch.nn.Module):
    """Stands in for a reference projection whose output for this call is already known."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output


class ReferenceAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter attention, with the reference keys and values computed once per generation.

    The reference tokens are fixed for a whole call, yet diffusers' processor projects them through
    `to_k_ip` / `to_v_ip` at every denoising step. Inside `reference_kv_once(unet)` (what the pipeline
    wraps each call in) the first step's projections are kept, keyed on the very token tensors they came
    from, and later steps reuse them; outside it, and under `torch.compile`, this is diffusers' processor.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_once = False
        # within a call: the token tensors, and stand-ins for to_k_ip / to_v_ip that return their projections
        self.kept: tuple | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if not (self.kv_once and isinstance(encoder_hidden_states, tuple)) or torch.compiler.is_compiling():
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        tokens = list(encoder_hidden_states[1])
        if (
            self.kept is None
            or len(self.kept[0]) != len(tokens)
            or any(a is not b for a, b in zip(self.kept[0], tokens))
        ):
            keys = torch.nn.ModuleList([_Fixed(k(t)) for k, t in zip(self.to_k_ip, tokens)])
            values = torch.nn.ModuleList([_Fixed(v(t)) for v, t in zip(self.to_v_ip, tokens)])
            self.kept = (tokens, keys, values)
        projections = self.to_k_ip, self.to_v_ip
        self.to_k_ip, self.to_v_ip = self.kept[1], self.kept[2]
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            self.to_k_ip, self.to_v_ip = projections


@contextmanager
def reference_kv_once(unet):
    """One generation: reference keys/values are projected at the first step only. The projection's output
    is kept too, so that every step hands the processors the same token tensors."""
    processors = [p for p in reference_processors(unet).values() if isinstance(p, ReferenceAttnProcessor)]
    kept: list = []

    def same_tokens(module, args, output):
        if kept and kept[0] is args[0]:
            return kept[1]
        kept[:] = [args[0], output]
        return output

    hook = unet.encoder_hid_proj.register_forward_hook(same_tokens) if unet.encoder_hid_proj is not None else None
    for proc in processors:
        proc.kv_once, proc.kept = True, None
    try:
        yield
    finally:
        for proc in processors:
            proc.kv_once, proc.kept = False, None
        if hook is not None:
            hook.remove()


def is_installed(unet) -> bool:
    return getattr(unet, _STATE_ATTR, None) is not None


def install_adapter(unet, config: EasyRefConfig, lora_init: bool | str = True) -> None:
    """Add reference cross-attention, projection and (if `config.lora_rank`) LoRA to `unet` in place.
    `lora_init`: how a new LoRA starts, as peft's `init_lora_weights` (True: its kaiming-uniform default;
    "gaussian": down-weights from N(0, (1/rank)^2), as the release trained it); loaded weights replace it."""
    if is_installed(unet):
        raise ValueError("an EasyRef adapter is already installed on this UNet; call unload_adapter first")
    if unet.config.cross_attention_dim != config.cross_attention_dim:
        raise ValueError(
            f"the adapter is for a UNet with cross_attention_dim {config.cross_attention_dim}, "
            f"but this UNet has {unet.config.cross_attention_dim}"
        )
    state = _OriginalUNetState(
        processors=dict(unet.attn_processors),
        encoder_hid_proj=unet.encoder_hid_proj,
        encoder_hid_dim_type=unet.config.encoder_hid_dim_type,
    )
    processors = {name: _reference_processor(unet, name, proc, config) for name, proc in state.processors.items()}
    unet.set_attn_processor(processors)
    projection = IPAdapterFullImageProjection(config.mllm_hidden_size, config.cross_attention_dim)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection]).to(unet.device, unet.dtype)
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    if config.lora_rank:
        _add_lora(unet, config, lora_init)
        state.lora = True
    setattr(unet, _STATE_ATTR, state)


def _attention_module(unet, processor_name: str) -> Attention:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def _reference_processor(unet, name: str, original, config: EasyRefConfig):
    attn = _attention_module(unet, name)
    if not attn.is_cross_attention:
        return original
    proc = ReferenceAttnProcessor(
        hidden_size=attn.to_k.out_features,
        cross_attention_dim=attn.to_k.in_features,
        num_tokens=(config.num_reference_tokens,),
        scale=1.0,
    )
    with torch.no_grad():
        proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
        proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
    return proc.to(attn.to_k.weight.device, attn.to_k.weight.dtype)


def _add_lora(unet, config: EasyRefConfig, init: bool | str = True) -> None:
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=LORA_TARGETS, init_lora_weights=init
    )
    unet.add_adapter(lora, adapter_name=LORA_ADAPTER_NAME)


def fuse_lora(unet) -> bool:
    """Fold the LoRA into the weights it adapts, so that a UNet call costs what a plain one does (for
    generation; training keeps it apart). peft's merged wrappers still cost a dispatch per call (3 us each,
    560 of them in SDXL), so the fused layers go into the UNet bare and the wrappers wait outside.
    Returns whether there was a LoRA to fuse."""
    state = _state(unet)
    if not state.lora or state.fused is not None:
        return False
    state.fused = {}
    for name, layer in _lora_layers(unet):  # one layer at a time: one merge temporary alive
        state.fused[name] = (layer, _own_weight(unet, name, layer.get_base_layer().weight))
        layer.merge(adapter_names=[LORA_ADAPTER_NAME])
    _set_lora_wrappers(unet, state, attached=False)
    return True


def _own_weight(unet, layer_name: str, weight: torch.Tensor) -> str | torch.Tensor:
    """How `unfuse_lora` gets this weight back: its name, where the file it was loaded from still gives it
    (a second copy of every adapted layer, 37% of SDXL's UNet, is not kept), else a copy on the CPU."""
    files, name = weight_files(unet), f"{layer_name}.weight"
    if files is not None and files.holds(name, weight):
        return name
    return weight.detach().to("cpu", copy=True)


def unfuse_lora(unet) -> None:
    """Undo `fuse_lora` exactly: the adapted layers get their own weights back (not a subtraction)."""
    state = _state(unet)
    if state.fused is None:
        return
    files = weight_files(unet) or WeightFiles()
    files.check(own for _, own in state.fused.values() if isinstance(own, str))
    _set_lora_wrappers(unet, state, attached=True)
    with torch.no_grad(), files.reading():
        for layer, own_weight in state.fused.values():
            weight = layer.get_base_layer().weight
            if isinstance(own_weight, str):
                files.restore(own_weight, weight)
            else:
                weight.copy_(own_weight.to(weight.device))
            layer.merged_adapters.clear()
    state.fused = None


def is_fused(unet) -> bool:
    return is_installed(unet) and _state(unet).fused is not None


def _set_lora_wrappers(unet, state: _OriginalUNetState, attached: bool) -> None:
    for name, (wrapper, _) in (state.fused or {}).items():
        unet.set_submodule(name, wrapper if attached else wrapper.get_base_layer())


@contextmanager
def _lora_visible(unet):
    """Within the block a fused UNet holds its LoRA wrappers again, so that peft finds the LoRA's tensors."""
    state = getattr(unet, _STATE_ATTR, None)
    if state is None:
        yield
        return
    _set_lora_wrappers(unet, state, attached=True)
    try:
        yield
    finally:
        _set_lora_wrappers(unet, state, attached=False)


def _lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in unet.named_modules() if isinstance(module, LoraLayer)]


def _state(unet) -> _OriginalUNetState:
    state = getattr(unet, _STATE_ATTR, None)
    if state is None:
        raise ValueError("no EasyRef adapter is installed on this UNet")
    return state


@contextmanager
def reference_branch_off(unet):
    """For a call at reference scale 0: the UNet's own attention processors and no reference projection,
    so that nothing of the reference path runs (the LoRA, part of the finetuned UNet, stays)."""
    state = _state(unet)
    adapted, projection, kind = dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    unet.set_attn_processor(dict(state.processors))
    unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = None, None
    try:
        yield
    finally:
        unet.set_attn_processor(adapted)
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = projection, kind


def unload_adapter(unet) -> None:
    """Remove everything `install_adapter` added; the UNet computes exactly what it did before."""
    state = _state(unet)
    if state.lora:
        unfuse_lora(unet)
        unet.unload_lora()
    unet.set_attn_processor(state.processors)
    unet.encoder_hid_proj = state.encoder_hid_proj
    unet.config.encoder_hid_dim_type = state.encoder_hid_dim_type
    setattr(unet, _STATE_ATTR, None)


def reference_processors(unet) -> dict[str, IPAdapterAttnProcessor2_0]:
    return {n: p for n, p in unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}


def set_scale(unet, scale: float | dict) -> None:
    """Reference strength: one float, or diffusers' per-block dict ({"up": {"block_0": [0, 1, 0]}, ...}),
    applied by diffusers' own `set_ip_adapter_scale`, which only reads the pipeline's `unet`."""
    from diffusers.loaders import IPAdapterMixin

    if not reference_processors(unet):
        raise ValueError("no EasyRef adapter is installed on this UNet")
    IPAdapterMixin.set_ip_adapter_scale(_UNetHolder(unet), scale if isinstance(scale, dict) else float(scale))


class _UNetHolder:
    def __init__(self, unet):
        self.unet = unet


def adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's own tensors, under their UNet names (k/v per cross-attention, projection, LoRA)."""
    if not is_installed(unet):
        raise ValueError("no EasyRef adapter is installed on this UNet")
    out = {}
    for name, proc in reference_processors(unet).items():
        for key, tensor in proc.state_dict().items():
            out[f"{name}.{key}"] = tensor
    for key, tensor in unet.encoder_hid_proj.state_dict().items():
        out[f"encoder_hid_proj.{key}"] = tensor
    if getattr(unet, _STATE_ATTR).lora:
        from peft.utils import get_peft_model_state_dict

        with _lora_visible(unet):
            lora = get_peft_model_state_dict(unet, adapter_name=LORA_ADAPTER_NAME)
        out.update({f"lora.{key}": tensor for key, tensor in lora.items()})
    return out


def adapter_named_parameters(unet) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The adapter's parameters under their UNet names, by part: `reference_attention` (k/v per
    cross-attention), `projection`, `lora` (empty without LoRA)."""
    return {
        "reference_attention": [
            (f"{name}.{n}", p) for name, proc in reference_processors(unet).items() for n, p in proc.named_parameters()
        ],
        "projection": [(f"encoder_hid_proj.{n}", p) for n, p in unet.encoder_hid_proj.named_parameters()],
        "lora": _lora_named_parameters(unet),
    }


def _lora_named_parameters(unet) -> list[tuple[str, torch.nn.Parameter]]:
    with _lora_visible(unet):
        return [(n, p) for n, p in unet.named_parameters() if f".{LORA_ADAPTER_NAME}." in n and "lora_" in n]


def adapter_parameters(unet) -> list[torch.nn.Parameter]:
    """Every trainable adapter parameter (k/v, projection, LoRA)."""
    return [p for part in adapter_named_parameters(unet).values() for _, p in part]


def load_adapter_state_dict(unet, tensors: Mapping[str, torch.Tensor]) -> None:
    """Strictly load `adapter_state_dict`-style tensors; a missing, extra or mis-shaped one is an error.
    A fused LoRA is unfused for the load and fused again with the new weights. Tensors are taken one at a
    time, so that a mapping that reads each from a file (`easyref.checkpoint.CheckpointTensors`) holds one."""
    expected = adapter_state_dict(unet)
    _check_keys(expected, tensors, "adapter")
    fused = is_fused(unet)
    unfuse_lora(unet)
    _load_checked(expected, tensors)
    if fused:
        fuse_lora(unet)


def _load_checked(expected: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    # `adapter_state_dict`'s tensors are the parameters themselves (peft's LoRA state dict included), so a
    # copy into each is what loading them through the modules' or peft's state dicts does
    with torch.no_grad():
        for key in tensors:
            expected[key].copy_(tensors[key])


def _check_keys(expected: dict, given: Mapping, what: str) -> None:
    """Names and shapes; a mapping that reads its tensors on access is asked for shapes alone."""
    stand_ins = getattr(given, "stand_ins", None)
    given = stand_ins() if stand_ins is not None else given
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ValueError(f"{what} checkpoint is missing tensor {missing[0]} ({len(missing)} missing in all)")
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise ValueError(f"{what} checkpoint has unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    for key, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{what} tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
