"""`EasyRefPipeline`: an SDXL pipeline conditioned on groups of reference images (paper, Fig. 2).

The pipeline owns the SDXL components plus a registered `reference_encoder`, so `.to()` and
`enable_model_cpu_offload()` move the MLLM too. Each call: (1) check inputs, (2) encode every group
once, (3) take the cached negative branch, (4) hand the tokens to the diffusers base pipeline as
`ip_adapter_image_embeds` (negative first) and let it denoise.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from .adapter import (
    fuse_lora,
    install_adapter,
    is_installed,
    reference_branch_off,
    reference_kv_once,
    set_scale,
    unfuse_lora,
    unload_adapter,
)
from .checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    NegativeStore,
    apply_checkpoint,
    negative_store_for,
    save_checkpoint,
)
from .config import EasyRefConfig
from .devices import cpu_decode_upcast, fast_cpu_layout
from .encoder import ReferenceEncoder
from .prompting import check_prompt
from .release import read_checkpoint

logger = logging.getLogger(__name__)

# diffusers SDXL pipelines that accept `ip_adapter_image_embeds` and share these components
BASE_PIPELINES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLControlNetInpaintPipeline",
)
# Every from_pretrained of a model folder: weights from safetensors only (a pickled .bin can run code when
# read) and no code from the folder (`easyref.resolve.check_contents` refuses such folders up front).
SAFE_LOADING = {"use_safetensors": True, "trust_remote_code": False}


@dataclass
class EasyRefPipelineOutput(BaseOutput):
    """Generated images and the reference tokens they were conditioned on (reusable as `reference_embeds`)."""

    images: Any
    reference_embeds: torch.Tensor
    # with return_reference_maps: per prompt, per reference, where the reference tokens looked (`easyref.explain`)
    reference_maps: list[list[torch.Tensor]] | None = None


class EasyRefPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "reference_encoder->text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["controlnet"]

    def __init__(
        self,
        reference_encoder: ReferenceEncoder,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        controlnet=None,
        base_pipeline: str = "StableDiffusionXLPipeline",
    ):
        super().__init__()
        if base_pipeline not in BASE_PIPELINES:
            raise ValueError(f"base_pipeline must be one of {', '.join(BASE_PIPELINES)}, got {base_pipeline!r}")
        self.register_modules(
            reference_encoder=reference_encoder,
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            controlnet=controlnet,
        )
        self.register_to_config(base_pipeline=base_pipeline)
        if not is_installed(unet):
            install_adapter(unet, reference_encoder.config)
        self._negative_cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        base: str | Path | None = None,
        mllm: str | Path | None = None,
        adapter: str | Path | None = None,
        config: EasyRefConfig | None = None,
        dtype: torch.dtype | None = None,
        base_pipeline: str = "StableDiffusionXLPipeline",
        config_overrides: dict | None = None,
        revision: str | None = None,
        **base_kwargs,
    ) -> EasyRefPipeline:
        """An SDXL, a Qwen2-VL-Instruct and an EasyRef checkpoint (ours or the release's), each named
        by `"default"` (the bundled model's), a folder, or a hub id (`owner/name`, `owner/name@rev`).

        `from_pretrained("default")`, or no names at all, is the bundled model; `adapter=` alone loads
        the base and MLLM the checkpoint records; names given explicitly win (`easyref.resolve`).
        Hub ids are read from the Hugging Face cache, and downloaded when not there and the hub
        answers. `revision`, `cache_dir` and `local_files_only` apply as in diffusers.
        `config_overrides` changes settings that do not shape weights (e.g. `reference_image_size`,
        `instruction`, `max_references`) after the checkpoint's config is read.
        """
        from .resolve import resolve_parts

        parts = resolve_parts(
            base,
            mllm,
            adapter,
            config=config,
            revision=revision,
            local_files_only=base_kwargs.pop("local_files_only", False),
            cache_dir=base_kwargs.pop("cache_dir", None),
        )
        pipe = cls.from_parts(parts, config, dtype, base_pipeline, config_overrides, **base_kwargs)
        pipe.negative_store = negative_store_for(parts)  # the negative branch stored with the adapter
        return pipe

    @classmethod
    def from_parts(
        cls,
        parts,
        config: EasyRefConfig | None = None,
        dtype: torch.dtype | None = None,
        base_pipeline: str = "StableDiffusionXLPipeline",
        config_overrides: dict | None = None,
        fuse_lora: bool = True,
        **base_kwargs,
    ) -> EasyRefPipeline:
        """Load `easyref.resolve.Parts` (names already resolved to local paths). `fuse_lora`: fold the UNet
        LoRA into its weights, so that denoising costs what plain SDXL's does (`unfuse_lora` and `unload`
        undo it exactly)."""
        dtype = base_kwargs.pop("torch_dtype", dtype)  # the older name, still common in user code
        if base_pipeline not in BASE_PIPELINES:
            raise ValueError(f"base_pipeline must be one of {', '.join(BASE_PIPELINES)}, got {base_pipeline!r}")
        tensors = None
        if parts.adapter is not None:  # read lazily: each tensor is read from the file as it is loaded
            config, tensors = read_checkpoint(parts.adapter.path)
        if config is not None:
            check_fit(config, parts)  # a checkpoint for another base or MLLM, refused before their weights load
        sdxl = _load_sdxl(parts.base.path, base_pipeline, dtype, base_kwargs)
        if config is None:
            config = _config_for(parts, sdxl.unet)
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        # a checkpoint with a finetuned trunk holds every weight of the MLLM that is used: its own are not read
        own_weights = tensors is None or not config.has_trunk
        try:
            encoder = ReferenceEncoder.from_pretrained(
                parts.mllm.path, config, dtype=dtype, weights=own_weights, **SAFE_LOADING
            )
        except ValueError as err:  # the MLLM's width against the checkpoint's, a tokenizer without chat template
            raise CheckpointError(f"the EasyRef checkpoint does not fit the MLLM {parts.mllm.name}: {err}") from None
        pipe = cls.from_components(sdxl, encoder, tensors, base_pipeline=base_pipeline)
        if fuse_lora:
            pipe.fuse_lora()
        return pipe

    @classmethod
    def from_components(
        cls, sdxl_pipe, encoder: ReferenceEncoder, tensors: Mapping | None = None, base_pipeline: str | None = None
    ) -> EasyRefPipeline:
        """Wrap an existing diffusers SDXL pipeline (its modules are shared, not copied). `tensors`: an EasyRef
        checkpoint's (`easyref.release.read_checkpoint`), loaded into the encoder and the adapted UNet."""
        components = {k: v for k, v in sdxl_pipe.components.items() if k in _component_names()}
        unet = components["unet"]
        try:
            install_adapter(unet, encoder.config)
            if tensors is not None:
                apply_checkpoint(encoder.config, tensors, encoder, unet)
        except ValueError as err:
            if is_installed(unet):
                unload_adapter(unet)
            if isinstance(err, DamagedCheckpointError):  # says what is wrong with the file already
                raise
            raise CheckpointError(f"the EasyRef checkpoint does not fit this model: {err}") from None
        encoder.to(unet.device, unet.dtype)
        name = base_pipeline or type(sdxl_pipe).__name__
        return cls(reference_encoder=encoder, base_pipeline=name, **components)

    def save_adapter(self, directory: str | Path) -> Path:
        """Write this pipeline's EasyRef weights as a self-describing checkpoint."""
        return save_checkpoint(directory, self.reference_encoder.config, self.reference_encoder, self.unet)

    # ------------------------------------------------------------------ adapter control
    @property
    def easyref_config(self) -> EasyRefConfig:
        return self.reference_encoder.config

    def set_scale(self, scale: float | dict) -> None:
        set_scale(self.unet, scale)

    def fuse_lora(self) -> bool:
        """Fold the UNet LoRA into its weights (what `from_pretrained` does): no LoRA cost per UNet call.
        Returns whether there was a LoRA to fuse."""
        return fuse_lora(self.unet)

    def unfuse_lora(self) -> None:
        """Put the adapted layers' own weights back (bit for bit), e.g. before training this UNet."""
        unfuse_lora(self.unet)

    def unload(self):
        """Remove the adapter; returns the plain diffusers pipeline over the user's restored UNet."""
        unload_adapter(self.unet)
        self._negative_cache.clear()
        restore_layout(self)  # the user's UNet and VAE as they came, channels-last or not
        return self._base_pipeline(plain=True)

    def clear_reference_cache(self) -> None:
        """Forget the cached negative branch (call after changing the encoder's weights): it is computed again,
        and the one stored with the adapter (`negative_store`) is neither read nor written from then on."""
        self._negative_cache.clear()
        self.negative_store = None

    # ------------------------------------------------------------------ device, dtype and layout
    # On a CPU without fast kernels for a bfloat16 or float16 pipeline, the UNet's and VAE's convolutions run
    # channels-last and the VAE decodes in float32 (`prefer_fast_layout`, `_decoding_in_float32`): set by `to()`
    # and checked at every call; `fast_layout = False` keeps the layout you give them. float32, a CPU with the
    # kernels (bfloat16 with AVX-512) and every GPU run as before: float32 pixels are unchanged.
    fast_layout = True

    def to(self, *args, **kwargs):
        pipe = super().to(*args, **kwargs)
        prefer_fast_layout(pipe)
        return pipe

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_references(
        self, groups: Sequence[Sequence[Image.Image]], prompts: Sequence[str], return_maps: bool = False
    ):
        """All groups in one MLLM pass -> (B, num_reference_tokens, hidden); with `return_maps`, also
        each reference's attention map from the same pass (`easyref.explain`)."""
        return self.reference_encoder(groups, prompts, return_maps=return_maps)

    # where the negative branch is stored with the adapter (`easyref.checkpoint.NegativeStore`): set by
    # `from_pretrained` for an adapter folder of ours; None: computed once per process, as before
    negative_store: NegativeStore | None = None

    @torch.no_grad()
    def negative_reference_tokens(self) -> torch.Tensor:
        """The black-image branch -> (1, n, hidden): computed once per device/dtype and cached, or read from
        the adapter folder's `negative.safetensors` when it holds one made from the same weights, config,
        versions, dtype and kind of device (the same values, bit for bit); a computed one is stored there
        for the next process where the folder may be written."""
        key = (str(self.reference_encoder.device), self.reference_encoder.dtype)
        if key not in self._negative_cache:
            self._negative_cache[key] = self._stored_or_computed_negative()
        return self._negative_cache[key]

    def _stored_or_computed_negative(self) -> torch.Tensor:
        encoder, store = self.reference_encoder, self.negative_store
        if store is not None:
            # the device it would be computed on (under CPU offload, the GPU, not where the weights wait)
            stored = store.load(encoder.config, encoder.dtype, self._execution_device)
            if stored is not None:
                return stored.to(self._execution_device)
        tokens = encoder.encode_negative()
        if store is not None:
            store.save(encoder.config, tokens)
        return tokens

    # ------------------------------------------------------------------ call
    def check_inputs(
        self,
        references,
        prompt,
        negative_prompt,
        scale,
        num_images_per_prompt,
        reference_embeds,
        generator,
        seed,
        guidance_scale: float = 5.0,
    ) -> tuple[list[list[Image.Image]] | None, list[str], list[str]]:
        """Normalise and validate everything the EasyRef layer adds; one clear ValueError per mistake."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        groups = None
        if reference_embeds is not None:
            if references is not None:
                raise ValueError(
                    "pass either references or reference_embeds, not both: to reuse tokens, give them alone, "
                    "as in pipe(prompt=prompt, reference_embeds=out.reference_embeds)"
                )
            _check_embeds(reference_embeds, len(prompts), self.easyref_config)
        else:
            for i, text in enumerate(prompts):
                check_prompt(text, self.reference_encoder.tokenizer, "prompt" if len(prompts) == 1 else f"prompt {i}")
            groups = _as_groups(references)
            groups, prompts = _broadcast(groups, prompts)
            for i, group in enumerate(groups):
                if len(group) > self.easyref_config.max_references:
                    raise ValueError(
                        f"reference group {i} has {len(group)} images; at most "
                        f"{self.easyref_config.max_references} are allowed"
                    )
        negatives = _negatives(negative_prompt, len(prompts), self.easyref_config.negative_prompt)
        _check_scale(scale)
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        return groups, prompts, negatives

    @torch.no_grad()
    def __call__(
        self,
        references=None,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        scale: float | dict = 1.0,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 30,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        reference_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_reference_maps: bool = False,
        **pipeline_kwargs,
    ) -> EasyRefPipelineOutput:
        """Generate images that keep what each reference group shares, steered by its prompt.
        `return_reference_maps`: also return where the reference tokens looked in each reference."""
        # 1. inputs
        groups, prompts, negatives = self.check_inputs(
            references,
            prompt,
            negative_prompt,
            scale,
            num_images_per_prompt,
            reference_embeds,
            generator,
            seed,
            guidance_scale,
        )
        if return_reference_maps and groups is None:
            raise ValueError("return_reference_maps needs references, not reference_embeds")
        n = num_images_per_prompt
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        prefer_fast_layout(self)  # a no-op once the layout is right (e.g. set by `to()`)
        # at scale 0 the references change nothing: neither encoding nor the reference branch runs, so the
        # call costs what SDXL's does (unless the maps are asked for)
        maps, embeds, reference = None, None, reference_embeds
        if not _is_zero(scale) or return_reference_maps:
            # 2. reference tokens: once per call, all groups in one pass
            tokens, maps = self._reference_tokens(groups, prompts, reference_embeds, return_reference_maps)
            # 3. repeat per image ourselves: diffusers tiles ip embeds but interleaves prompts
            tokens = tokens.to(self._execution_device, self.unet.dtype).repeat_interleave(n, dim=0)
            embeds, reference = self._with_negative_branch(tokens, guidance_scale), tokens[::n].detach()
            self.set_scale(scale)
        # 4. denoise with the diffusers base pipeline
        images = self._denoise(
            embeds,
            prompt=[p for p in prompts for _ in range(n)],
            negative_prompt=[p for p in negatives for _ in range(n)],
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=generator,
            height=height,
            width=width,
            output_type=output_type,
            **pipeline_kwargs,
        )
        return EasyRefPipelineOutput(images=images, reference_embeds=reference, reference_maps=maps)

    def _reference_tokens(self, groups, prompts, reference_embeds, return_maps: bool):
        if reference_embeds is not None:
            return reference_embeds, None
        if return_maps:
            return self.encode_references(groups, prompts, return_maps=True)
        return self.encode_references(groups, prompts), None

    def _with_negative_branch(self, tokens: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The tokens with the negative branch's in front when classifier-free guidance runs."""
        if guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None:
            negative = self.negative_reference_tokens().to(tokens.device, tokens.dtype)
            return torch.cat([self.easyref_config.mode.tile_negative(negative, tokens), tokens])
        return tokens

    def _denoise(self, embeds: torch.Tensor | None, output_type: str, **kwargs):
        """`embeds` None: without the reference branch (scale 0), the UNet as plain SDXL runs it."""
        base = self._base_pipeline()
        # PIL conversion would turn NaN into black pixels: take arrays, check them, convert after
        kwargs["output_type"] = "np" if output_type == "pil" else output_type
        with _decoding_in_float32(self.vae, cpu_decode_upcast(self._execution_device, self.vae.dtype)):
            if embeds is None:
                with reference_branch_off(self.unet):
                    result = base(**kwargs)
            else:  # (2 * B * n, 1 image, tokens, hidden), negative half first
                with reference_kv_once(self.unet):
                    result = base(ip_adapter_image_embeds=[embeds.unsqueeze(1)], **kwargs)
        images = result.images
        _check_finite_images(images)
        return base.image_processor.numpy_to_pil(images) if output_type == "pil" else images

    def _base_pipeline(self, plain: bool = False):
        """The diffusers pipeline over this pipeline's own modules (built per call, nothing copied, so a
        component swapped on this pipeline, a scheduler say, is the one used); `plain`: diffusers' own
        class, as `unload` hands it back."""
        cls = getattr(diffusers, self.config.base_pipeline)
        cls = cls if plain else _rows_as_given(cls)
        wanted = inspect.signature(cls.__init__).parameters
        components = {k: v for k, v in self.components.items() if k in wanted}
        extra = {k: None for k in ("image_encoder", "feature_extractor") if k in wanted}
        base = cls(**components, **extra)
        base.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return base


class _ReferenceRowsAsGiven:
    """diffusers tiles precomputed `ip_adapter_image_embeds` by the batch size, as it expects one embedding
    for the whole batch; EasyRef's tokens already hold one row per image (negative half first under
    classifier-free guidance), so they reach the UNet as given."""

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device, *args, **kwargs):
        if ip_adapter_image_embeds is None:
            return super().prepare_ip_adapter_image_embeds(ip_adapter_image, None, device, *args, **kwargs)
        return [embeds.to(device) for embeds in ip_adapter_image_embeds]


@functools.cache
def _rows_as_given(cls: type) -> type:
    return type(cls.__name__, (_ReferenceRowsAsGiven, cls), {"__module__": __name__})


def prefer_fast_layout(pipe) -> bool:
    """Put the convolution networks of a pipeline (UNet, VAE, ControlNet) channels-last where that is their
    fast layout: on a CPU without fast kernels for their bfloat16 or float16 (`devices.fast_cpu_layout`;
    `benchmarks/cpu_dtype.py`). Elsewhere a layout this function set is put back (float32, GPUs and CPUs with
    the kernels run as they always did); one you set yourself is left alone. Returns whether they are
    channels-last now. `EasyRefPipeline` calls it from `to()` and at every call; for a diffusers pipeline,
    call it after placing it."""
    convolutional = [m for m in (getattr(pipe, n, None) for n in ("unet", "vae", "controlnet")) if m is not None]
    if not convolutional or not getattr(pipe, "fast_layout", True):
        return False
    wanted = fast_cpu_layout(pipe._execution_device, convolutional[0].dtype)
    if not wanted and not getattr(pipe, "_set_channels_last", False):
        return False
    layout = torch.channels_last if wanted else torch.contiguous_format
    for module in convolutional:
        weight = next((p for p in module.parameters() if p.dim() == 4), None)
        if weight is not None and not weight.is_contiguous(memory_format=layout):
            module.to(memory_format=layout)
    pipe._set_channels_last = wanted
    return wanted


def restore_layout(pipe) -> None:
    """Undo `prefer_fast_layout`: the standard layout back where it set channels-last."""
    if getattr(pipe, "_set_channels_last", False):
        for name in ("unet", "vae", "controlnet"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(memory_format=torch.contiguous_format)
        pipe._set_channels_last = False


@contextmanager
def _decoding_in_float32(vae, upcast: bool):
    """The VAE decodes in float32 inside the block, as diffusers' SDXL pipelines do for a float16 VAE with
    `force_upcast` (`upcast_vae`, then cast back); here for a CPU that has no fast kernels for the VAE's
    low-precision dtype (`devices.cpu_decode_upcast`). The weights are cast for the decode and back (exactly:
    every low-precision value is a float32 value); a float16 VAE that diffusers upcasts is left to it."""
    if not upcast or (vae.dtype == torch.float16 and vae.config.force_upcast):
        yield
        return
    own = vae.__dict__.get("decode")  # an instance attribute already there (a wrapper of someone's) or None
    decode, dtype = vae.decode, vae.dtype

    def decode_in_float32(latents, *args, **kwargs):
        vae.to(torch.float32)
        try:
            return decode(latents.to(torch.float32), *args, **kwargs)
        finally:
            vae.to(dtype)

    vae.decode = decode_in_float32
    try:
        yield
    finally:
        if own is None:
            del vae.decode
        else:
            vae.decode = own


def default_size(pipe) -> int:
    """The side, in pixels, of an image made without height/width: diffusers' SDXL rule (the UNet's
    sample size times the VAE's downscaling), for EasyRefPipeline and diffusers' SDXL pipelines alike."""
    return pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _load_sdxl(folder, base_pipeline: str, dtype: torch.dtype | None, base_kwargs: dict):
    """The diffusers SDXL pipeline of `folder`, its UNet read by `_read_unet` where it can be."""
    kwargs = _safe(base_kwargs)
    unet = _read_unet(Path(folder), dtype) if set(kwargs) <= _PLAIN_LOADING else None
    if unet is not None:
        kwargs["unet"] = unet
    return getattr(diffusers, base_pipeline).from_pretrained(folder, dtype=dtype, **kwargs)


# loading kwargs under which diffusers' UNet load is a plain read of its one safetensors file (components
# passed in are not read at all); with any other (a variant, a device map, a quantization) diffusers reads it
_PLAIN_LOADING = {
    *SAFE_LOADING,
    *("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "controlnet"),
}
UNET_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _read_unet(folder: Path, dtype: torch.dtype | None):
    """SDXL's UNet read from its file tensor by tensor, each converted to `dtype` as diffusers converts it; or
    None where the folder is not the plain layout (diffusers then loads it, and says what is wrong).

    diffusers maps the whole file and converts tensor by tensor, and every page read stays in memory until
    the last tensor is converted: for SDXL's fp32 UNet loaded as bf16, 9.6 GiB of file besides the 4.8 GiB
    kept, the peak of the whole load. Here one tensor is read at a time. The UNet also records where each
    weight came from (`easyref.adapter.WeightFiles`), so that fusing the LoRA keeps no copy of the weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from .adapter import TensorFile, WeightFiles, file_stamp, set_weight_files
    from .checkpoint import set_tensor

    file = folder / "unet" / UNET_WEIGHTS_NAME
    if _model_index_entry(folder, "unet") != ["diffusers", "UNet2DConditionModel"] or not file.is_file():
        return None
    with init_empty_weights():  # parameters without memory, buffers as usual
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    expected, weights, stamp = unet.state_dict(), TensorFile(file), file_stamp(file)
    if sorted(weights.keys()) != sorted(expected) or any(weights.shape(k) != v.shape for k, v in expected.items()):
        return None  # renamed keys of an older diffusers, a partial file: diffusers' own load handles them
    files = WeightFiles()
    for key, empty in expected.items():
        files.add(key, file, stamp, set_tensor(unet, key, _as_diffusers_loads(weights.read(key), dtype, empty)))
    unet.register_to_config(_name_or_path=os.path.join(str(folder), "unet"))
    set_weight_files(unet, files)
    return unet.eval()


def _as_diffusers_loads(tensor: torch.Tensor, dtype: torch.dtype | None, empty: torch.Tensor) -> torch.Tensor:
    """A tensor converted as diffusers' `load_model_dict_into_meta` converts it: floating point ones to
    `dtype` when one is given, every one to the model's own dtype (its empty tensor's) when not."""
    if dtype is None:
        return tensor.to(empty.dtype)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _model_index_entry(folder: Path, name: str):
    import json

    try:
        return json.loads((folder / "model_index.json").read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None


def _component_names() -> set[str]:
    params = inspect.signature(EasyRefPipeline.__init__).parameters
    return set(params) - {"self", "reference_encoder", "base_pipeline"}


def _config_for(parts, unet) -> EasyRefConfig:
    logger.warning("no EasyRef checkpoint given: the reference path starts from random weights")
    return EasyRefConfig(
        mllm=parts.mllm.name,
        base=parts.base.name,
        mllm_hidden_size=mllm_hidden_size(parts.mllm.path),
        cross_attention_dim=unet.config.cross_attention_dim,
    )


def mllm_hidden_size(folder) -> int:
    """The language model's width, from the MLLM's config alone."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=False).text_config.hidden_size


def _safe(kwargs: dict) -> dict:
    """A caller's loading kwargs with `SAFE_LOADING` in force; asking for pickles or folder code is refused."""
    for key, value in SAFE_LOADING.items():
        if kwargs.get(key, value) != value:
            raise ValueError(
                f"{key}={kwargs[key]!r} is not supported: EasyRefPipeline loads safetensors weights only and "
                "runs no code from a model folder"
            )
    return {**kwargs, **SAFE_LOADING}


def check_fit(config: EasyRefConfig, parts) -> None:
    """The widths a checkpoint was made for against the base's and the MLLM's configs (no weights read):
    one CheckpointError naming the part to change, instead of a failure after gigabytes have loaded."""
    import json

    unet_config = Path(parts.base.path) / "unet" / "config.json"
    try:
        cross = json.loads(unet_config.read_text()).get("cross_attention_dim")
        hidden = mllm_hidden_size(parts.mllm.path)
    except (OSError, ValueError, AttributeError):  # not there or unreadable: the loaders will say what is wrong
        return
    if isinstance(cross, int) and cross != config.cross_attention_dim:
        raise CheckpointError(
            f"the EasyRef checkpoint does not fit the base {parts.base.name}: it was made for cross_attention_dim "
            f"{config.cross_attention_dim}, the base has {cross} (give the base it was trained on: {config.base})"
        )
    if hidden != config.mllm_hidden_size:
        raise CheckpointError(
            f"the EasyRef checkpoint does not fit the MLLM {parts.mllm.name}: it was made for mllm_hidden_size "
            f"{config.mllm_hidden_size}, the MLLM has {hidden} (give the MLLM it was trained on: {config.mllm})"
        )


def _as_groups(references) -> list[list[Image.Image]]:
    if references is None:
        raise ValueError("references are required (or pass reference_embeds)")
    if isinstance(references, Image.Image):
        references = [references]
    references = list(references)
    if not references:
        raise ValueError("at least one reference image is required")
    if all(isinstance(r, Image.Image) for r in references):
        return [references]
    groups = []
    for i, group in enumerate(references):
        group = [group] if isinstance(group, Image.Image) else list(group)
        if not group:
            raise ValueError(f"reference group {i} is empty")
        if not all(isinstance(im, Image.Image) for im in group):
            raise ValueError(f"reference group {i} must hold PIL images only")
        groups.append(group)
    return groups


def _broadcast(groups: list, prompts: list[str]) -> tuple[list, list[str]]:
    """One group with many prompts, or many groups with one prompt, is broadcast; otherwise lengths match."""
    if len(groups) == len(prompts):
        return groups, prompts
    if len(groups) == 1:
        return groups * len(prompts), prompts
    if len(prompts) == 1:
        return groups, prompts * len(groups)
    raise ValueError(f"got {len(groups)} reference groups but {len(prompts)} prompts")


def _negatives(negative_prompt, count: int, default: str) -> list[str]:
    if negative_prompt is None:
        return [default] * count
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = list(negative_prompt)
    if len(negatives) != count:
        raise ValueError(f"got {len(negatives)} negative prompts for {count} prompts")
    return negatives


def _is_zero(scale) -> bool:
    return not isinstance(scale, dict) and scale == 0


def _check_scale(scale) -> None:
    if isinstance(scale, dict):
        return
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0 or a per-block dict, got {scale!r}")


class NonFiniteOutputError(RuntimeError):
    """Generation produced NaN or Inf (overflowing weights or dtype): no image is returned."""


def _check_finite_images(images) -> None:
    array = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    if not bool(torch.isfinite(array).all()):
        raise NonFiniteOutputError(
            "generation produced NaN/Inf values (the model overflowed; try --dtype float32 or bfloat16); "
            "no image was written"
        )


def _check_embeds(embeds, count: int, config: EasyRefConfig) -> None:
    if not isinstance(embeds, torch.Tensor):
        raise ValueError(f"reference_embeds must be a tensor (one row per prompt), got {type(embeds).__name__}")
    config.mode.check_tokens_shape(tuple(embeds.shape), count, config.num_reference_tokens, config.mllm_hidden_size)
