"""The generation methods MRBench compares, behind one interface and one set of settings.

- `easyref`: `EasyRefPipeline` (SDXL + Qwen2-VL reading the whole reference group at once).
- `ip-adapter-mean` / `ip-adapter-concat`: the paper's two tuning-free baselines over a plain
  diffusers SDXL pipeline with an IP-Adapter (default `h94/IP-Adapter`, `sdxl_models/ip-adapter_sdxl.safetensors`
  with its ViT-bigG encoder `sdxl_models/image_encoder`). Every reference is encoded alone by the
  CLIP image encoder; *mean* averages the embeddings into one image prompt, *concat* keeps one image
  prompt per reference, so the UNet attends to all their tokens side by side.
- `sdxl`: the same SDXL with the prompt only, the floor every reference method should beat.

Every method takes the same `GenerationSettings` and seeds each image with its own CPU
`torch.Generator`, so an image depends on its seed and prompt only, not on the batch it ran in
or the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from ..config import DEFAULT_NEGATIVE_PROMPT
from ..devices import resolve_device_dtype
from . import (  # noqa: F401  (METHOD_NAMES is part of this module's interface)
    DEFAULT_IMAGE_ENCODER_FOLDER,
    DEFAULT_IP_ADAPTER,
    DEFAULT_IP_ADAPTER_SUBFOLDER,
    DEFAULT_IP_ADAPTER_WEIGHTS,
    METHOD_NAMES,
)

logger = logging.getLogger(__name__)

IP_ADAPTER_MODES = ("mean", "concat")
UNTRAINED_SEED = 0  # the random reference path of `easyref` without an adapter checkpoint


@dataclass
class GenerationSettings:
    """What every method is run with; `dataclasses.asdict` of it goes into the bench record.

    `height`/`width` None: the base model's default resolution. `negative_prompt`: the same text for
    every method (default: the EasyRef release's negative prompt); None means no negative prompt,
    i.e. the empty string, again for every method.
    """

    steps: int = 30
    guidance: float = 5.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT

    def negative(self) -> str:
        return self.negative_prompt or ""


@runtime_checkable
class Method(Protocol):
    """A way to generate images for one reference group."""

    name: str

    def describe(self) -> dict:
        """JSON-serialisable account of what was loaded (recorded next to the results)."""

    def generate(
        self,
        references: Sequence[Image.Image],
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: GenerationSettings,
    ) -> list[Image.Image]:
        """One image per (prompt, seed), all conditioned on the same `references`."""


# ---------------------------------------------------------------------------------------------------
# shared helpers


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: the noise is the same whatever the batch or device."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def check_request(references, prompts, seeds, needs_references: bool = True) -> tuple[list, list[str], list[int]]:
    prompts, seeds = list(prompts), list(seeds)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts (one seed per image)")
    references = list(references or [])
    if needs_references and not references:
        raise ValueError("this method needs at least one reference image")
    if not all(isinstance(r, Image.Image) for r in references):
        raise ValueError("references must be PIL images")
    return references, prompts, seeds


def _sdxl_call(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings, **extra) -> list[Image.Image]:
    """The denoising call shared by the diffusers-based methods (negative prompt as a string for all)."""
    result = pipe(
        prompt=prompts,
        negative_prompt=[settings.negative()] * len(prompts),
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=settings.height,
        width=settings.width,
        generator=generators(seeds),
        output_type="pil",
        **extra,
    )
    return list(result.images)


def _uses_cfg(pipe, settings: GenerationSettings) -> bool:
    """diffusers' own rule (`do_classifier_free_guidance`), decided before the call."""
    return settings.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None


def _load_sdxl(base, dtype: torch.dtype):
    """`base`: `default`, a folder or a hub id (`easyref.resolve`) -> (pipeline, what the name resolved to)."""
    from diffusers import StableDiffusionXLPipeline

    from ..resolve import resolve

    found = resolve(base, "base", label=f"--base {base}")
    pipe = StableDiffusionXLPipeline.from_pretrained(found.path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, found


def _described(pipe, device, dtype) -> dict:
    """What every method's record holds beside its models: where and how it ran, and the image side
    used when a run sets no height/width."""
    from ..pipeline import default_size

    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "default_size": default_size(pipe)}


# ---------------------------------------------------------------------------------------------------
# methods


class EasyRefMethod:
    """EasyRef: `EasyRefPipeline.from_pretrained(base, mllm=..., adapter=...)`; the MLLM reads the group.

    Names as everywhere (`easyref.resolve`): `base="default"` alone is the bundled model, an adapter
    alone brings the base and MLLM its config records.
    """

    name = "easyref"

    def __init__(
        self,
        base: str | Path | None = None,
        mllm: str | Path | None = None,
        adapter: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        scale: float = 1.0,
        config_overrides: dict | None = None,
    ):
        from ..pipeline import EasyRefPipeline
        from ..resolve import CLI_LABELS, resolve_parts

        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.parts = resolve_parts(base, mllm, adapter, labels=CLI_LABELS)
        self.scale = float(scale)
        if self.parts.adapter is None:
            logger.warning("easyref method without an adapter checkpoint: its reference path is untrained")
        # without a checkpoint the reference path starts from random weights: drawn from a fixed seed, so
        # every process of a sharded or resumed run has the same ones (the global RNG is left as it was)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            pipe = EasyRefPipeline.from_parts(self.parts, dtype=self.dtype, config_overrides=config_overrides)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        logger.info("loaded easyref: %s", self.parts.names())

    def describe(self) -> dict:
        return {
            "method": self.name,
            **self.parts.names(),  # base, mllm and adapter as given or as the adapter records them
            "resolved": self.parts.record(),  # their paths on this machine and hub commits
            "scale": self.scale,
            **_described(self.pipe, self.device, self.dtype),
            "easyref_config": self.pipe.easyref_config.to_dict(),
        }

    def check_group(
        self, reference_sizes: Sequence[tuple[int, int]], prompts: Sequence[str], what: str = "group"
    ) -> None:
        """Refuse, before anything is generated, a group the pipeline would refuse mid-run: a prompt with
        the MLLM's control tokens or too many tokens (`prompting.check_prompt`, as `generate` does), more
        references than the checkpoint allows, or a reference Qwen2-VL cannot resize (aspect ratio past
        200:1). One ValueError, one line."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        from ..config import PATCH_FACTOR
        from ..prompting import check_prompt

        tokenizer = self.pipe.reference_encoder.tokenizer
        for i, prompt in enumerate(prompts):
            check_prompt(prompt, tokenizer, f"{what} prompt {i}")
        limit = self.pipe.easyref_config.max_references
        if len(reference_sizes) > limit:
            raise ValueError(f"{what} has {len(reference_sizes)} reference images; at most {limit} are allowed")
        for i, (width, height) in enumerate(reference_sizes):
            try:
                smart_resize(height, width, factor=PATCH_FACTOR)  # the resize rule of `prompting.normalize_image`
            except ValueError as err:
                raise ValueError(f"{what} reference {i} ({width} x {height} px): {err}") from None

    def generate(self, references, prompts, seeds, settings: GenerationSettings) -> list[Image.Image]:
        references, prompts, seeds = check_request(references, prompts, seeds)
        # the MLLM reads instruction + prompt with the group, so each prompt gets its own tokens; the
        # pipeline encodes all (group, prompt) pairs in one pass
        result = self.pipe(
            [references] * len(prompts),
            prompts,
            negative_prompt=[settings.negative()] * len(prompts),
            scale=self.scale,
            guidance_scale=settings.guidance,
            num_inference_steps=settings.steps,
            generator=generators(seeds),
            height=settings.height,
            width=settings.width,
            output_type="pil",
        )
        return list(result.images)


class IPAdapterMethod:
    """Plain diffusers SDXL + IP-Adapter, with the group merged by averaging or concatenation.

    `ip_adapter`: a hub id or local folder holding `subfolder/weight_name`; `image_encoder_folder`
    follows diffusers' rule (a bare name is inside `subfolder`, a path with "/" is from the root).
    Both the plain IP-Adapter (pooled CLIP image embedding) and IP-Adapter Plus (penultimate CLIP
    hidden states) are handled.
    """

    def __init__(
        self,
        base: str | Path,
        ip_adapter: str | Path = DEFAULT_IP_ADAPTER,
        weight_name: str = DEFAULT_IP_ADAPTER_WEIGHTS,
        subfolder: str | None = DEFAULT_IP_ADAPTER_SUBFOLDER,
        image_encoder_folder: str = DEFAULT_IMAGE_ENCODER_FOLDER,
        mode: str = "mean",
        scale: float = 1.0,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        if mode not in IP_ADAPTER_MODES:
            raise ValueError(f"mode must be one of {', '.join(IP_ADAPTER_MODES)}, got {mode!r}")
        self.name = f"ip-adapter-{mode}"
        self.mode, self.scale = mode, float(scale)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.base, self.ip_adapter, self.weight_name = str(base), str(ip_adapter), weight_name
        self.subfolder = subfolder or ""
        self.encoder_subfolder = _image_encoder_subfolder(self.subfolder, image_encoder_folder)
        self.pipe = self._load()
        logger.info("loaded %s: %s + %s/%s", self.name, base, ip_adapter, weight_name)

    def _load(self):
        from diffusers.models.embeddings import ImageProjection
        from transformers import CLIPVisionModelWithProjection

        from ..resolve import resolve

        pipe, self.resolved_base = _load_sdxl(self.base, self.dtype)
        # a cached hub snapshot loads from its folder: no update checks, nothing to retry
        weights = "/".join(x for x in (self.subfolder, self.weight_name) if x)
        self.resolved_ip_adapter = resolve(self.ip_adapter, label=f"--ip-adapter {self.ip_adapter}", probe=weights)
        root = self.resolved_ip_adapter.path
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            root, subfolder=self.encoder_subfolder, dtype=self.dtype
        )
        # registered before `load_ip_adapter`, which then loads neither; the processor is the one
        # diffusers would build (CLIP resize + centre crop to the encoder's size), but the PIL
        # backend explicitly, since the default CLIPImageProcessor wants torchvision
        pipe.register_modules(image_encoder=encoder, feature_extractor=_clip_processor(encoder.config.image_size))
        pipe.load_ip_adapter(root, subfolder=self.subfolder, weight_name=self.weight_name)
        pipe.set_ip_adapter_scale(self.scale)
        pipe.to(self.device)
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        # diffusers' own switch: ImageProjection reads pooled embeddings, the others hidden states
        self.hidden_states = not isinstance(projection, ImageProjection)
        return pipe

    def describe(self) -> dict:
        encoder = self.pipe.image_encoder.config
        return {
            "method": self.name,
            "base": self.base,
            "ip_adapter": self.ip_adapter,
            "subfolder": self.subfolder,
            "weight_name": self.weight_name,
            "image_encoder": self.encoder_subfolder,
            "image_encoder_size": encoder.image_size,
            "image_features": "hidden_states[-2]" if self.hidden_states else "image_embeds",
            "mode": self.mode,
            "scale": self.scale,
            "resolved": {"base": self.resolved_base.record(), "ip_adapter": self.resolved_ip_adapter.record()},
            **_described(self.pipe, self.device, self.dtype),
        }

    @torch.no_grad()
    def reference_embeds(self, references: Sequence[Image.Image], count: int, cfg: bool) -> list[torch.Tensor]:
        """`ip_adapter_image_embeds` for `count` prompts sharing `references` (one adapter -> one tensor).

        mean: (count, 1, emb) - the references' embeddings averaged into one image prompt.
        concat: (count, n_refs, emb) - one image prompt per reference; diffusers projects each and
        the attention reads all their tokens side by side. Plus adapters have (tokens, emb) per image.
        With CFG the negative half comes first (diffusers chunks it off), as diffusers builds it:
        zeros for pooled embeddings, the encoder's features of an all-zero image for hidden states.
        """
        positive, negative = self._encode(references)
        if self.mode == "mean":
            positive, negative = positive.mean(0, keepdim=True), negative[:1]
        rows = positive.unsqueeze(0).expand(count, *positive.shape)
        if cfg:
            rows = torch.cat([negative.unsqueeze(0).expand(count, *positive.shape), rows])
        return [rows.to(self.pipe.unet.dtype)]

    def _encode(self, references: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each reference alone through the image encoder -> (n_refs, ...) features and their negatives."""
        encoder = self.pipe.image_encoder
        pixels = self.pipe.feature_extractor(list(references), return_tensors="pt").pixel_values
        pixels = pixels.to(encoder.device, encoder.dtype)
        if self.hidden_states:
            features = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            negative = encoder(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
            return features, negative.expand_as(features)
        features = encoder(pixels).image_embeds
        return features, torch.zeros_like(features)

    def generate(self, references, prompts, seeds, settings: GenerationSettings) -> list[Image.Image]:
        references, prompts, seeds = check_request(references, prompts, seeds)
        embeds = self.reference_embeds(references, len(prompts), _uses_cfg(self.pipe, settings))
        # one row per prompt, so diffusers' tiling by num_images_per_prompt (1) leaves them as they are
        return _sdxl_call(self.pipe, prompts, seeds, settings, ip_adapter_image_embeds=embeds)


class PromptOnlyMethod:
    """Plain SDXL from the prompt alone (references ignored): the floor of the comparison."""

    name = "sdxl"

    def __init__(
        self,
        base: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        self.base = str(base)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        pipe, self.resolved_base = _load_sdxl(base, self.dtype)
        self.pipe = pipe.to(self.device)
        logger.info("loaded prompt-only sdxl from %s", base)

    def describe(self) -> dict:
        return {
            "method": self.name,
            "base": self.base,
            "resolved": {"base": self.resolved_base.record()},
            **_described(self.pipe, self.device, self.dtype),
        }

    def generate(self, references, prompts, seeds, settings: GenerationSettings) -> list[Image.Image]:
        _, prompts, seeds = check_request(references, prompts, seeds, needs_references=False)
        return _sdxl_call(self.pipe, prompts, seeds, settings)


def _image_encoder_subfolder(subfolder: str, image_encoder_folder: str) -> str:
    """diffusers' `load_ip_adapter` rule: a bare folder name lives inside `subfolder`."""
    if "/" in image_encoder_folder:
        return Path(image_encoder_folder).as_posix()
    return Path(subfolder, image_encoder_folder).as_posix()


def _clip_processor(size: int):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size=size, crop_size=size)


def check_group(
    method, reference_sizes: Sequence[tuple[int, int]], prompts: Sequence[str], what: str = "group"
) -> None:
    """What `method` would refuse in a group (references as (width, height)), refused before any
    generation; methods without such limits pass everything."""
    check = getattr(method, "check_group", None)
    if check is not None:
        check(reference_sizes, prompts, what)


# ---------------------------------------------------------------------------------------------------
# factory

_FACTORIES: dict[str, Callable[..., Any]] = {
    "easyref": EasyRefMethod,
    "ip-adapter-mean": lambda **options: IPAdapterMethod(mode="mean", **options),
    "ip-adapter-concat": lambda **options: IPAdapterMethod(mode="concat", **options),
    "sdxl": PromptOnlyMethod,
}


def load_method(name: str, **options) -> Method:
    """Build a method by its bench name: one of `METHOD_NAMES`; `options` go to its constructor."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_NAMES)}")
    return _FACTORIES[name](**options)
