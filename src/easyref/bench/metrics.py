"""CLIP-I, CLIP-T and DINO-I: the image-fidelity and prompt-fidelity scores MRBench reports.

Definitions (DreamBooth, Ruiz et al. 2023; IP-Adapter, Ye et al. 2023; EasyRef, Zong et al. 2025):

* CLIP-I: cosine between the CLIP image embedding (the projected ``image_embeds`` of ``CLIPModel``)
  of the generated image and that of each reference, averaged over the group's references.
* CLIP-T: cosine between the generated image's CLIP image embedding and the CLIP text embedding
  (projected) of the prompt. Raw cosine: no x100 scaling and no clamp at 0 (that is CLIPScore, a
  different number; the EasyRef paper's CLIP-T values, e.g. 0.726, are raw cosines).
* DINO-I: cosine between the DINO ViT CLS embeddings of the generated image and each reference,
  averaged.

When a group also has a target image (the held-out member it was built around), the same image
scores are reported against it separately as ``clip_i_target`` and ``dino_i_target``.

The arithmetic (``cosine``, ``mean_similarity``, ``score_item``) is pure tensor code; ``FeatureModels``
loads the two encoders through transformers and turns PIL images and prompts into embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from easyref.images import open_image, to_rgb

from . import DEFAULT_CLIP, DEFAULT_DINO

logger = logging.getLogger(__name__)

# The CLIP model of IP-Adapter-style evaluation (IP-Adapter reports CLIP-I/CLIP-T with ViT-L/14).
# EasyRef's public repository ships no evaluation code and its paper does not name the checkpoint,
# so this is the conventional choice, not a verified copy of the authors' setup.
# DreamBooth's DINO metric: self-supervised ViT-S/16, which (unlike CLIP) is not trained to ignore
# appearance differences between instances of a class, so it rewards subject/identity fidelity.
# (The names themselves, DEFAULT_CLIP and DEFAULT_DINO, live in the torch-free `easyref.bench`.)

SCORE_KEYS = ("clip_i", "clip_t", "dino_i")
TARGET_KEYS = ("clip_i_target", "dino_i_target")


# ----------------------------------------------------------------------------------------------
# Arithmetic


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (..., D) tensors (broadcast against each other) -> (...)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding sizes differ: {a.shape[-1]} vs {b.shape[-1]}")
    # float64: identical embeddings then score 1 to ~1e-12, so exact-match checks are meaningful.
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    return (a * b).sum(dim=-1)


def mean_similarity(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine between one generated embedding (D,) and each of N reference embeddings (N, D)."""
    generated = _as_vector(generated, "generated embedding")
    if references.ndim == 1:
        references = references.unsqueeze(0)
    if references.ndim != 2 or references.shape[0] == 0:
        raise ValueError(f"reference embeddings must be (N >= 1, D), got {tuple(references.shape)}")
    return float(cosine(generated.unsqueeze(0), references).mean())


def score_item(
    gen_clip: torch.Tensor,
    ref_clip: torch.Tensor,
    text_clip: torch.Tensor,
    gen_dino: torch.Tensor,
    ref_dino: torch.Tensor,
    target_clip: torch.Tensor | None = None,
    target_dino: torch.Tensor | None = None,
) -> dict[str, float]:
    """Scores of one generated image from its embeddings.

    ``gen_*``, ``text_clip`` and ``target_*`` are single embeddings, (D,) or (1, D); ``ref_*`` are
    (N, D). ``clip_i_target`` / ``dino_i_target`` appear only when the matching target is given.
    """
    scores = {
        "clip_i": mean_similarity(gen_clip, ref_clip),
        "clip_t": mean_similarity(gen_clip, _as_vector(text_clip, "text embedding").unsqueeze(0)),
        "dino_i": mean_similarity(gen_dino, ref_dino),
    }
    if target_clip is not None:
        scores["clip_i_target"] = mean_similarity(gen_clip, _as_vector(target_clip, "target").unsqueeze(0))
    if target_dino is not None:
        scores["dino_i_target"] = mean_similarity(gen_dino, _as_vector(target_dino, "target").unsqueeze(0))
    return scores


def _as_vector(embedding: torch.Tensor, what: str) -> torch.Tensor:
    if embedding.ndim == 2 and embedding.shape[0] == 1:
        return embedding[0]
    if embedding.ndim != 1:
        raise ValueError(f"{what} must be one embedding, (D,) or (1, D), got {tuple(embedding.shape)}")
    return embedding


# ----------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ImageEmbeddings:
    """CLIP and DINO embeddings of the same N images, row i of each belonging to image i."""

    clip: torch.Tensor  # (N, D_clip), L2-normalised float32 on the CPU
    dino: torch.Tensor  # (N, D_dino), likewise

    def __len__(self) -> int:
        return self.clip.shape[0]


class FeatureModels:
    """The CLIP and DINO encoders behind the metrics, with batched, normalised embedding methods.

    Defaults: CLIP ``openai/clip-vit-large-patch14`` (the ViT-L/14 that IP-Adapter-style CLIP-I/CLIP-T
    evaluation uses; EasyRef's released code has no evaluation script naming another) and DINO
    ``facebook/dino-vits16`` (DreamBooth's DINO metric). Any ``CLIPModel`` folder and any DINO
    ``ViTModel`` or ``Dinov2Model`` folder works; the embedding is the CLS token of the last hidden
    state for both (already layer-normed in both architectures).

    Image preprocessing always uses transformers' PIL backend, so torchvision is never needed and the
    numbers do not change with whether torchvision happens to be installed.
    """

    def __init__(
        self,
        clip_model,
        clip_tokenizer,
        clip_processor,
        dino_model,
        dino_processor,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.clip_model = clip_model.to(self.device, dtype).eval()
        self.clip_tokenizer = clip_tokenizer
        self.clip_processor = clip_processor
        self.dino_model = dino_model.to(self.device, dtype).eval()
        self.dino_processor = dino_processor
        self.max_text_tokens = _max_text_tokens(clip_tokenizer, clip_model)
        self.reference_cache: dict[str, ImageEmbeddings] = {}

    @classmethod
    def from_pretrained(
        cls,
        clip: str | Path = DEFAULT_CLIP,
        dino: str | Path = DEFAULT_DINO,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        **hub_kwargs,
    ) -> FeatureModels:
        """Load both encoders from local folders or hub ids (``hub_kwargs``, e.g. ``local_files_only``,
        go to every ``from_pretrained``). ``device`` defaults to CUDA when available."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info("loading CLIP from %s and DINO from %s on %s (%s)", clip, dino, device, dtype)
        clip_model = CLIPModel.from_pretrained(clip, dtype=dtype, **hub_kwargs)
        clip_tokenizer = AutoTokenizer.from_pretrained(clip, **hub_kwargs)
        # backend="pil": without it transformers picks the torchvision processor whenever
        # torchvision is importable, and that backend resizes slightly differently.
        clip_processor = AutoImageProcessor.from_pretrained(clip, backend="pil", **hub_kwargs)
        dino_model = _load_dino(dino, dtype, hub_kwargs)
        dino_processor = AutoImageProcessor.from_pretrained(dino, backend="pil", **hub_kwargs)
        return cls(clip_model, clip_tokenizer, clip_processor, dino_model, dino_processor, device, dtype, batch_size)

    # -- embeddings --------------------------------------------------------------------------

    @torch.no_grad()
    def embed_images_clip(self, images: Sequence[Image.Image], batch_size: int | None = None) -> torch.Tensor:
        """(N, D) normalised CLIP image embeddings (the projected ``image_embeds``)."""
        return self._batched(images, batch_size, self._clip_image_batch)

    @torch.no_grad()
    def embed_texts_clip(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """(N, D) normalised CLIP text embeddings; prompts past CLIP's 77 tokens are truncated."""
        return self._batched(list(texts), batch_size, self._clip_text_batch)

    @torch.no_grad()
    def embed_images_dino(self, images: Sequence[Image.Image], batch_size: int | None = None) -> torch.Tensor:
        """(N, D) normalised DINO CLS embeddings."""
        return self._batched(images, batch_size, self._dino_image_batch)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int | None = None) -> ImageEmbeddings:
        return ImageEmbeddings(self.embed_images_clip(images, batch_size), self.embed_images_dino(images, batch_size))

    def embed_image_files(self, paths: Sequence[str | Path]) -> ImageEmbeddings:
        """Embeddings of image files, cached by resolved path so a group's references (and targets)
        are embedded once however many methods and seeds are scored against them; each file alone."""
        keys = [str(Path(p).resolve()) for p in paths]
        missing = list(dict.fromkeys(k for k in keys if k not in self.reference_cache))
        for key in missing:
            # one file per call: an embedding depends on its image only, not on which other files happened
            # to be missing with it (else a resumed run, which starts with another cache, scores differently)
            self.reference_cache[key] = self.embed_images([open_image(key)])
        rows = [self.reference_cache[k] for k in keys]
        return ImageEmbeddings(torch.cat([r.clip for r in rows]), torch.cat([r.dino for r in rows]))

    def clear_cache(self) -> None:
        self.reference_cache.clear()

    # -- scores ------------------------------------------------------------------------------

    def score(
        self,
        generated: Image.Image,
        references: Sequence[Image.Image],
        prompt: str,
        target: Image.Image | None = None,
    ) -> dict[str, float]:
        """Scores of one generated image against its group's references (and target, if any)."""
        target_embs = self.embed_images([target]) if target is not None else None
        return self.score_embedded(generated, self.embed_images(references), prompt, target_embs)

    def score_embedded(
        self,
        generated: Image.Image,
        references: ImageEmbeddings,
        prompt: str,
        target: ImageEmbeddings | None = None,
    ) -> dict[str, float]:
        """``score`` with the references (and target) already embedded, e.g. by ``embed_image_files``."""
        gen = self.embed_images([generated])
        text = self.embed_texts_clip([prompt])
        return score_item(
            gen.clip[0],
            references.clip,
            text[0],
            gen.dino[0],
            references.dino,
            target_clip=target.clip if target is not None else None,
            target_dino=target.dino if target is not None else None,
        )

    # -- internals ---------------------------------------------------------------------------

    def _batched(self, items: Sequence, batch_size: int | None, embed: Callable[[list], torch.Tensor]) -> torch.Tensor:
        if len(items) == 0:
            raise ValueError("nothing to embed")
        size = batch_size or self.batch_size
        chunks = [embed(list(items[i : i + size])) for i in range(0, len(items), size)]
        # Normalise in float32 on the CPU so fp16/bf16 runs give comparable unit vectors.
        return F.normalize(torch.cat(chunks).float().cpu(), dim=-1)

    def _pixels(self, processor, images: list[Image.Image]) -> torch.Tensor:
        pixels = processor(images=[to_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def _clip_image_batch(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self._pixels(self.clip_processor, images)
        return self.clip_model.get_image_features(pixel_values=pixels).pooler_output

    def _clip_text_batch(self, texts: list[str]) -> torch.Tensor:
        # Truncation keeps the end-of-text token last, which is where CLIP pools the text embedding.
        tokens = self.clip_tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        if int(tokens["attention_mask"].sum(dim=1).max()) >= self.max_text_tokens:
            logger.debug("prompt(s) at CLIP's %d-token limit; any words past it are ignored", self.max_text_tokens)
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self.clip_model.get_text_features(**tokens).pooler_output

    def _dino_image_batch(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self._pixels(self.dino_processor, images)
        return self.dino_model(pixel_values=pixels).last_hidden_state[:, 0]


def _load_dino(source: str | Path, dtype: torch.dtype, hub_kwargs: dict):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(source, **hub_kwargs)
    extra = {}
    if config.model_type == "vit":
        # DINO ViT checkpoints have no pooler weights; building one would only add random layers
        # (and a missing-weights warning) that the CLS embedding never uses.
        extra["add_pooling_layer"] = False
    return AutoModel.from_pretrained(source, config=config, dtype=dtype, **extra, **hub_kwargs)


def _max_text_tokens(tokenizer, clip_model) -> int:
    # Some tokenizer folders carry a huge sentinel model_max_length; the position table is the real limit.
    positions = clip_model.config.text_config.max_position_embeddings
    return min(int(getattr(tokenizer, "model_max_length", positions) or positions), positions)
