"""The models of one training stage: loading, stage-by-stage trainables, the noise-prediction forward."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import adapter_state_dict, install_adapter
from ..checkpoint import CheckpointError, apply_checkpoint, split_groups
from ..config import EasyRefConfig
from ..encoder import ReferenceEncoder
from ..parameter_groups import frozen_encoder_modules, trainable_parameters
from ..prompting import RELEASE_ROW_LENGTH, MLLMInputs, prepare_inputs
from ..release import read_checkpoint
from .config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class StageModels:
    """Loaded once per run; `encoder` and `unet` carry the trainables, the rest stays frozen."""

    model_config: EasyRefConfig
    encoder: ReferenceEncoder
    unet: nn.Module
    vae: nn.Module
    text_pipe: object  # a StableDiffusionXLPipeline sharing the text encoders, used for `encode_prompt`
    noise_scheduler: object


def load_stage_models(config: TrainConfig) -> StageModels:
    """SDXL + Qwen2-VL from `default`, folders or hub ids, the adapter installed, the previous stage loaded."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from ..resolve import resolve

    # names first: a hub id that is not cached fails here in one line, before any weights load
    base = resolve(config.base, "base", label=f"base {config.base}")
    mllm = resolve(config.mllm, "mllm", label=f"mllm {config.mllm}")
    previous = read_checkpoint(config.init_from) if config.init_from else None
    sdxl = StableDiffusionXLPipeline.from_pretrained(base.path)
    sdxl.set_progress_bar_config(disable=True)
    model_config = _model_config(config, base, mllm, previous[0] if previous else None, sdxl.unet)
    torch.manual_seed(config.seed)  # reference tokens and LoRA start from the same values on every process
    encoder = ReferenceEncoder.from_pretrained(mllm.path, model_config)
    unet = sdxl.unet
    install_adapter(unet, model_config, lora_init=lora_init(config))
    if previous:
        load_previous_stage(previous[0], previous[1], model_config, encoder, unet)
    scheduler = DDPMScheduler.from_config(sdxl.scheduler.config)
    return StageModels(model_config, encoder, unet, sdxl.vae, sdxl, scheduler)


def lora_init(config: TrainConfig) -> bool | str:
    """How a LoRA this run creates starts (peft's `init_lora_weights`): down-weights from N(0, (1/rank)^2)
    as the release's LoRA layers drew them (diffusers' `LoRALinearLayer`), or peft's kaiming-uniform default;
    up-weights start at zero either way, so the adapted UNet starts as the plain one."""
    return "gaussian" if config.replicate_release else True


def mllm_pad_length(config: TrainConfig) -> int | None:
    """The fixed MLLM row length of this stage's batches: the release's in its single-reference stages
    (1-2) when replicating it, else None (rows as long as the longest, as in stage 3 and at inference)."""
    return RELEASE_ROW_LENGTH if config.replicate_release and config.stage in (1, 2) else None


def recorded_name(part) -> str:
    """How a checkpoint names a part it was trained with: `default` and hub ids as given (they mean the
    same model on any machine, wherever its cache or this package lives); a folder as an absolute path
    (a relative one would mean nothing from another working folder)."""
    if part.source == "local":
        return os.path.abspath(os.path.expanduser(part.name))
    return part.name


def _provenance(base, mllm) -> dict:
    """The files this run actually read (for hub ids, the snapshot folder names the commit): a record only."""
    return {"resolved": {"base": os.path.abspath(base.path), "mllm": os.path.abspath(mllm.path)}}


def _training_record(config: TrainConfig, previous: EasyRefConfig | None) -> dict:
    """The training choices behind the weights, stage by stage (`extra["training"]`, carried on from the
    previous stage): they change what the weights learnt, not how the model is loaded or run."""
    earlier = previous.extra.get("training") if previous else None
    earlier = earlier if isinstance(earlier, dict) else {}
    return {"training": {**earlier, f"stage{config.stage}": {"replicate_release": config.replicate_release}}}


def _model_config(config: TrainConfig, base, mllm, previous: EasyRefConfig | None, unet) -> EasyRefConfig:
    """The run's model settings (`TrainConfig.model_settings`) over what the parts and the stage decide; the
    checkpoint records the base and MLLM it was trained with (`recorded_name`), and where they were read."""
    settings = config.model_settings(new_model=previous is None)
    rank = settings.pop("lora_rank", 0)
    decided = {
        "base": recorded_name(base),
        "mllm": recorded_name(mllm),
        "max_references": max(
            previous.max_references if previous else EasyRefConfig.max_references, config.max_references
        ),
        "extra": {
            **(previous.extra if previous else {}),
            **_provenance(base, mllm),
            **_training_record(config, previous),
        },
    }
    if previous is None:
        from transformers import AutoConfig

        return EasyRefConfig(
            **decided,
            **settings,
            mllm_hidden_size=AutoConfig.from_pretrained(mllm.path).text_config.hidden_size,
            cross_attention_dim=unet.config.cross_attention_dim,
            lora_rank=rank if config.trains_trunk else 0,
            has_trunk=config.trains_trunk,
        )
    for part in ("base", "mllm"):
        if getattr(previous, part) != decided[part]:
            logger.warning(
                "init_from was trained with %s %s; this stage uses %s", part, getattr(previous, part), decided[part]
            )
    if previous.lora_rank and config.lora_rank and config.lora_rank != previous.lora_rank:
        logger.warning("lora_rank %d ignored: the previous stage trained rank %d", config.lora_rank, previous.lora_rank)
    lora_rank = previous.lora_rank or (config.lora_rank if config.trains_trunk else 0)
    return dataclasses.replace(
        previous, **decided, **settings, lora_rank=lora_rank, has_trunk=config.trains_trunk or previous.has_trunk
    )


def load_previous_stage(previous: EasyRefConfig, tensors: dict, model_config: EasyRefConfig, encoder, unet) -> None:
    """Load a previous stage's checkpoint; what that stage could not have had (the LoRA a later stage
    adds, the trunk stage 1 never trained) keeps its fresh values. Everything else must fit exactly."""
    groups = split_groups(tensors)
    filled = dict(tensors)
    if not previous.lora_rank:
        for key, value in adapter_state_dict(unet).items():
            if key.startswith("lora."):
                filled.setdefault(f"unet.{key}", value)
    if not groups["trunk"] and model_config.has_trunk:
        filled.update({f"trunk.{k}": v for k, v in encoder.trunk_state_dict().items()})
    try:
        apply_checkpoint(model_config, filled, encoder, unet)
    except CheckpointError as err:
        raise CheckpointError(f"init_from checkpoint does not fit this stage's model: {err}") from None


def select_trainables(models: StageModels, stage: int) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze what the stage trains (`easyref.parameter_groups`)."""
    encoder, unet = models.encoder, models.unet
    for module in (encoder, unet, models.vae, models.text_pipe.text_encoder, models.text_pipe.text_encoder_2):
        module.requires_grad_(False)
    named = trainable_parameters(encoder, unet, stage)
    for _, param in named:
        param.requires_grad_(True)
    return named


def cast_frozen(models: StageModels, dtype: torch.dtype, stage: int) -> None:
    """Hold wholly frozen modules in the mixed-precision dtype to save memory; the VAE stays fp32
    (SDXL's VAE overflows in fp16) and the UNet keeps fp32 base weights beside its fp32 adapter."""
    models.text_pipe.text_encoder.to(dtype)
    models.text_pipe.text_encoder_2.to(dtype)
    for module in frozen_encoder_modules(models.encoder, stage):
        module.to(dtype)


class TrainingModel(nn.Module):
    """Reference tokens from the MLLM, then the adapted UNet's noise prediction (what DDP wraps)."""

    def __init__(self, encoder: ReferenceEncoder, unet: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.unet = unet

    def forward(self, inputs: MLLMInputs, noisy_latents, timesteps, prompt_embeds, pooled_embeds, time_ids):
        tokens = self.encoder.encode(inputs)  # (B, n, D)
        return self.denoise(tokens, noisy_latents, timesteps, prompt_embeds, pooled_embeds, time_ids)

    def denoise(self, tokens, noisy_latents, timesteps, prompt_embeds, pooled_embeds, time_ids):
        # Under autocast the UNet is fp32 and this is a no-op; DeepSpeed instead casts the whole
        # model to bf16/fp16 and runs without autocast, so the inputs must follow the UNet's dtype.
        dtype = self.unet.dtype
        added = {
            "text_embeds": pooled_embeds.to(dtype),
            "time_ids": time_ids.to(dtype),
            "image_embeds": [tokens.unsqueeze(1).to(dtype)],
        }
        out = self.unet(
            noisy_latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype), added_cond_kwargs=added
        )
        return out.sample


def denoising_loss(predict, scheduler, latents, noise, timesteps) -> torch.Tensor:
    """The diffusion objective, for every model trained here: `predict(noisy_latents)` against the
    scheduler's target (the noise for epsilon prediction, the velocity for v-prediction), MSE in fp32."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    return nn.functional.mse_loss(predict(noisy).float(), target.float())


def prediction_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the base model's scheduler")


class MLLMInputBuilder:
    """Tokenises and preprocesses reference groups in the data-loader workers (picklable)."""

    def __init__(self, encoder: ReferenceEncoder, pad_to: int | None = None):
        """`pad_to`: rows of exactly this many tokens (`mllm_pad_length`), None: as long as the longest."""
        self.config = encoder.config
        self.tokenizer = encoder.tokenizer
        self.image_processor = encoder.image_processor
        self.pad_to = pad_to

    def __call__(self, groups, texts) -> MLLMInputs:
        return prepare_inputs(groups, texts, self.tokenizer, self.image_processor, self.config, pad_to=self.pad_to)
