"""The shapes world's base model: a tiny SDXL-architecture text-to-image model trained from scratch.

This plays the part SDXL plays for EasyRef: a pretrained text-to-image base that the three EasyRef
stages then teach to follow references. It is pretrained here, in two plain steps, because no
weights can be downloaded:
1. the VAE (SDXL's `AutoencoderKL`, 64 px -> 4 x 16 x 16) on renders of the world;
2. the UNet and both CLIP text encoders, on target renders with full captions (subject named).
The result is an ordinary diffusers SDXL folder.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .loop import optimise
from .world import (
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    all_subjects,
    reference_scene,
    render,
    target_scene,
)

logger = logging.getLogger(__name__)

SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def world_words() -> list[str]:
    """Every word the world's captions, prompts and instructions use (the tokenizer's vocabulary)."""
    words = set(SHAPES) | set(COLOURS) | set(PATTERNS) | set(BACKGROUNDS)
    for position in POSITIONS:
        words |= set(position.split())
    words |= {"a", "an", "object", "on", "background", "at", "the", "in", "center", ","}
    return sorted(words)


def shapes_clip_tokenizer():
    """Word-level CLIP-style tokenizer: `<|startoftext|> words <|endoftext|>`, padded with end tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL, *world_words()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=24,  # the longest caption is 16 words; short sequences keep CPU training fast
    )


# UNet resolution levels, (down block, up block, channels) each; the third (4 x 4 latents) is what lets the
# UNet tell corners apart: a 2-level UNet trained 11,000 steps drew "center" right every time but put
# "top left" objects in a random corner (its convolutions see too little of the image's border)
UNET_LEVELS = (
    ("DownBlock2D", "UpBlock2D", 64),
    ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", 128),
    ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", 128),
)


def build_pipeline(seed: int = 0, levels: int = 3):
    """Untrained SDXL-architecture components sized for 64 px images; `levels` 2 is the earlier base's UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = shapes_clip_tokenizer()
    text_config = _text_config(tokenizer)
    unet, vae = _unet(levels), _vae()  # in this order: the random draws follow it
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=shapes_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def _text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def _unet(levels: int):
    from diffusers import UNet2DConditionModel

    chosen = UNET_LEVELS[:levels]
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=tuple(down for down, _, _ in chosen),
        up_block_types=tuple(up for _, up, _ in reversed(chosen)),
        block_out_channels=tuple(width for _, _, width in chosen),
        layers_per_block=1,
        transformer_layers_per_block=(1,) * levels,
        attention_head_dim=tuple(width // 16 for _, _, width in chosen),
        use_linear_projection=True,
        cross_attention_dim=64,  # 32 + 32 from the two text encoders, as 768 + 1280 in SDXL
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=16,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),  # 4x downsampling keeps the UNet's work small on a CPU
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


# ---------------------------------------------------------------------- training data in memory
def _to_tensor(images) -> torch.Tensor:
    import numpy as np

    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def _vae_image(rng: random.Random):
    """A target or a cluttered reference: the VAE must reconstruct both."""
    subjects = all_subjects()
    subject = rng.choice(subjects)
    if rng.random() < 0.5:
        return render(target_scene(subject, rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS))))
    return render(reference_scene(subject, rng.randint(0, 2), rng, subjects))


def vae_batch(rng: random.Random, size: int) -> torch.Tensor:
    return _to_tensor([_vae_image(rng) for _ in range(size)])


class _Pool:
    """Renders made once and drawn from at random: drawing PIL shapes every step would dominate a GPU run."""

    def __init__(self, make, count: int, rng: random.Random, device: str):
        items = [make() for _ in range(count)]
        self.images = _to_tensor([image for image, _ in items]).to(device)
        self.texts = [text for _, text in items]
        self.gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def sample(self, size: int) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(0, len(self.texts), (size,), generator=self.gen)
        return self.images[index.to(self.images.device)], [self.texts[i] for i in index.tolist()]


# ---------------------------------------------------------------------- 1. the VAE
def train_vae(
    vae,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    device: str = "cpu",
    pool_size: int = 4096,
) -> list[float]:
    """Reconstruction (L1 + MSE) with a small KL term; returns the loss curve."""
    rng = random.Random(f"shapes-vae-{seed}")
    torch.manual_seed(seed)
    vae.to(device)
    pool = _Pool(lambda: (_vae_image(rng), ""), min(pool_size, steps * batch_size), rng, device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    vae.train()

    def loss_of_a_batch():
        x, _ = pool.sample(batch_size)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()

    losses = optimise("vae", steps, list(vae.parameters()), optimizer, scheduler, loss_of_a_batch, clip=None)
    vae.eval()
    return losses


@torch.no_grad()
def fit_scaling_factor(vae, seed: int = 1, batches: int = 4) -> float:
    """1 / std of the latents, so the diffusion model sees unit-variance inputs (SDXL's 0.13025 analogue)."""
    rng = random.Random(f"shapes-vae-scale-{seed}")
    device = next(vae.parameters()).device
    latents = torch.cat([vae.encode(vae_batch(rng, 64).to(device)).latent_dist.mean for _ in range(batches)])
    return float(1.0 / latents.std())


@torch.no_grad()
def sharpen_posterior(vae, log_std: float = -7.0) -> None:
    """Make the encoder's posterior (nearly) a point, as SDXL's VAE effectively is.

    Trained with a tiny KL weight, the shapes VAE keeps a posterior std of about 0.26 against unit
    latents. EasyRef's trainer samples the posterior (as the authors' does), and that much
    unpredictable noise in the diffusion target swamped the reference signal: stage losses sat near
    0.16 where the base, trained on posterior means, reached 0.016. The decoder was trained on
    samples, so it reads the mean just as well; only the logvar half of `quant_conv` changes.
    """
    channels = vae.config.latent_channels
    conv = vae.quant_conv
    if conv is None:
        raise ValueError("the VAE has no quant_conv to set the posterior's variance with")
    conv.weight[channels:] = 0.0
    conv.bias[channels:] = 2.0 * log_std


# ---------------------------------------------------------------------- 2. UNet + text encoders
# Share of captions that leave the subject out ("an object on a tan background, at the top left"):
# EasyRef's prompts take exactly that form, and a base that has never seen it placed the subject
# and chose the background poorly when the references had to supply the rest.
SUBJECTLESS_SHARE = 0.3
# Share that names one attribute only ("a striped object on ...", "a star on ..."): the form of the
# pick groups' prompts, which the base then knows as text before the references must supply the rest.
PARTIAL_SHARE = 0.2


def captioned_target(
    rng: random.Random, subjects, subjectless: float = SUBJECTLESS_SHARE, partial: float = PARTIAL_SHARE
):
    from .world import PICK_ATTRIBUTES, caption_for, pick_prompt, prompt_for

    subject = rng.choice(subjects)
    background, position = rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS))
    draw = rng.random()
    if draw < subjectless:
        text = prompt_for(background, position)
    elif draw < subjectless + partial:
        text = pick_prompt(subject, rng.choice(PICK_ATTRIBUTES), background, position)
    else:
        text = caption_for(subject, background, position)
    return render(target_scene(subject, background, position)), text


def train_base(
    pipe,
    steps: int,
    batch_size: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    subjects=None,
    device: str = "cpu",
    pool_size: int = 8192,
) -> list[float]:
    """Epsilon-prediction training of the UNet and both text encoders on captioned target renders."""
    from diffusers import DDPMScheduler

    from ..train.models import denoising_loss
    from .world import subjects_in

    subjects = subjects or subjects_in("held-in")
    rng = random.Random(f"shapes-base-{seed}")
    gen = torch.Generator().manual_seed(seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200))
    pipe.to(device)
    for m in modules:
        m.train()
    pipe.vae.requires_grad_(False)
    side = pipe.vae.config.sample_size
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32, device=device).expand(batch_size, -1)
    pool = _Pool(lambda: captioned_target(rng, subjects), min(pool_size, steps * batch_size), rng, device)

    def loss_of_a_batch():
        pixels, captions = pool.sample(batch_size)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels.to(device)).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        # captions dropped 10% of the time, so classifier-free guidance has an unconditional branch to use
        keep = (torch.rand(batch_size, generator=gen) > 0.1).float().to(device)
        if keep.min() < 1:
            empty, _, empty_pooled, _ = pipe.encode_prompt(
                [""] * batch_size, device=device, do_classifier_free_guidance=False
            )
            embeds = keep[:, None, None] * embeds + (1 - keep[:, None, None]) * empty
            pooled = keep[:, None] * pooled + (1 - keep[:, None]) * empty_pooled
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen).to(device)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        predict = lambda noisy: pipe.unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        return denoising_loss(predict, noise_scheduler, latents, noise, t)

    losses = optimise("base", steps, params, optimizer, scheduler, loss_of_a_batch)
    for m in modules:
        m.eval()
    return losses


def build_base_model(
    out: str | Path,
    vae_steps: int,
    base_steps: int,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    levels: int = 3,
    vae_from: str | Path | None = None,
    chunk: int | None = None,
) -> Path:
    """Train the VAE (or take a finished one from the SDXL folder `vae_from`), then the UNet + text
    encoders; save an SDXL folder (written elsewhere, then renamed). `chunk`: train the UNet in runs of
    this many steps, each continuing the saved folder (what a build spread over sessions does)."""
    from diffusers import AutoencoderKL

    pipe = build_pipeline(seed, levels)
    record = {"vae_steps": vae_steps, "batch_size": batch_size, "seed": seed, "levels": levels}
    if vae_from:  # already trained, sharpened and scaled
        pipe.vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae")
        record["vae_from"] = str(vae_from)
    else:
        record["vae_final_loss"] = _tail_mean(train_vae(pipe.vae, vae_steps, batch_size, seed=seed, device=device))
        sharpen_posterior(pipe.vae)
        pipe.vae.register_to_config(scaling_factor=fit_scaling_factor(pipe.vae))
    first = min(base_steps, chunk or base_steps)
    base_losses = train_base(pipe, first, batch_size, seed=seed, device=device)
    record.update(
        base_steps=first, base_final_loss=_tail_mean(base_losses), scaling_factor=pipe.vae.config.scaling_factor
    )
    out = _save_base(pipe, Path(out), record)
    while first < base_steps:
        first = min(base_steps, first + chunk)
        continue_base_model(out, first, batch_size, device=device)
    return out


def continue_base_model(folder: str | Path, base_steps: int, batch_size: int = 32, device: str = "cpu") -> Path:
    """Train a saved base's UNet + text encoders on until `base_steps` in all (the VAE stays as it is).

    The optimizer starts afresh (with its warm-up); the data stream is seeded by the steps already
    done, so a continuation never replays the batches of the run before it.
    """
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    record = json.loads((folder / "training.json").read_text())
    done = record["base_steps"]
    if base_steps <= done:
        return folder
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    losses = train_base(pipe, base_steps - done, batch_size, seed=record["seed"] + done, device=device)
    record.setdefault("base_runs", [done]).append(base_steps - done)
    record.update(
        base_steps=base_steps,
        base_final_loss=_tail_mean(losses),
        subjectless_share=SUBJECTLESS_SHARE,
        partial_share=PARTIAL_SHARE,
    )
    return _save_base(pipe, folder, record)


def _tail_mean(losses: list[float], n: int = 50) -> float:
    return sum(losses[-n:]) / max(1, len(losses[-n:]))


def _save_base(pipe, out: Path, record: dict) -> Path:
    import shutil

    from ..safe_io import replace_folder

    pipe.to("cpu")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    replace_folder(tmp, out)  # a build killed while saving keeps the previous base whole
    return out
