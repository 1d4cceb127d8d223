"""CLIP-I / CLIP-T / DINO-I: hand-checked arithmetic, and tiny random encoders loaded like real folders."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_models import save_tiny_clip, save_tiny_dino

from easyref.bench.metrics import (
    FeatureModels,
    ImageEmbeddings,
    cosine,
    mean_similarity,
    score_item,
)

# ----------------------------------------------------------------------------------------------
# Arithmetic


def test_cosine_hand_values():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [2.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 5.0], [3.0, 0.0], [4.0, 4.0], [-2.0, 0.0]])
    expected = torch.tensor([0.0, 0.6, 1.0, -1.0], dtype=torch.float64)  # orthogonal, 3-4-5, scaled, opposite
    assert torch.allclose(cosine(a, b), expected, atol=1e-12)


def test_cosine_broadcasts_one_against_many():
    out = cosine(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(out, torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_cosine_rejects_mismatched_sizes():
    with pytest.raises(ValueError):
        cosine(torch.ones(2, 3), torch.ones(2, 4))


def test_mean_similarity_averages_over_references():
    gen = torch.tensor([3.0, 4.0])
    refs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])  # 0.6, 0.8, 1.0
    assert mean_similarity(gen, refs) == pytest.approx(0.8, abs=1e-12)
    assert mean_similarity(gen.unsqueeze(0), refs[:1]) == pytest.approx(0.6, abs=1e-12)


def test_mean_similarity_rejects_empty_references():
    with pytest.raises(ValueError):
        mean_similarity(torch.ones(2), torch.ones(0, 2))


def _embs():
    return dict(
        gen_clip=torch.tensor([1.0, 0.0, 0.0]),
        ref_clip=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),  # 1, 0 -> 0.5
        text_clip=torch.tensor([3.0, 4.0, 0.0]),  # 0.6
        gen_dino=torch.tensor([0.0, 3.0]),
        ref_dino=torch.tensor([[4.0, 3.0], [0.0, 1.0], [-1.0, 0.0]]),  # 0.6, 1, 0 -> 1.6 / 3
    )


def test_score_item_without_target():
    scores = score_item(**_embs())
    assert set(scores) == {"clip_i", "clip_t", "dino_i"}
    assert scores["clip_i"] == pytest.approx(0.5, abs=1e-12)
    assert scores["clip_t"] == pytest.approx(0.6, abs=1e-12)
    assert scores["dino_i"] == pytest.approx(1.6 / 3, abs=1e-12)


def test_score_item_with_target():
    target_clip = torch.tensor([[1.0, 1.0, 0.0]])  # (1, D) accepted too
    scores = score_item(**_embs(), target_clip=target_clip, target_dino=torch.tensor([3.0, 4.0]))
    assert set(scores) == {"clip_i", "clip_t", "dino_i", "clip_i_target", "dino_i_target"}
    assert scores["clip_i_target"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert scores["dino_i_target"] == pytest.approx(0.8, abs=1e-12)


def test_score_item_negative_cosine_is_not_clamped():
    embs = _embs()
    embs["text_clip"] = torch.tensor([-1.0, 0.0, 0.0])
    assert score_item(**embs)["clip_t"] == pytest.approx(-1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Tiny encoders, saved and loaded back like a user's folders


@pytest.fixture(scope="module")
def tiny_feature_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_metrics")
    return {
        "clip": save_tiny_clip(root / "clip"),
        "vit": save_tiny_dino(root / "dino_vit", "vit"),
        "dinov2": save_tiny_dino(root / "dinov2", "dinov2", seed=2),
    }


@pytest.fixture(scope="module", params=["vit", "dinov2"])
def models(request, tiny_feature_dirs):
    return FeatureModels.from_pretrained(
        tiny_feature_dirs["clip"], tiny_feature_dirs[request.param], device="cpu", batch_size=2
    )


def _image(seed: int, size=(40, 48), mode="RGB") -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=gen))
    image = Image.new("RGB", size, colour)
    x, y = (int(v) for v in torch.randint(0, 20, (2,), generator=gen))
    ImageDraw.Draw(image).ellipse((x, y, x + 18, y + 22), fill=(255 - colour[0], colour[1] // 2, 200))
    return image.convert(mode)


def test_loading_uses_pil_processors_and_no_torchvision(models):
    assert type(models.clip_processor).__name__.endswith("Pil")
    assert type(models.dino_processor).__name__.endswith("Pil")
    assert models.max_text_tokens == 77


def test_vit_dino_folder_loads_without_pooler(tiny_feature_dirs):
    fm = FeatureModels.from_pretrained(tiny_feature_dirs["clip"], tiny_feature_dirs["vit"], device="cpu")
    assert type(fm.dino_model).__name__ == "ViTModel"
    assert fm.dino_model.pooler is None


def test_dinov2_folder_loads(tiny_feature_dirs):
    fm = FeatureModels.from_pretrained(tiny_feature_dirs["clip"], tiny_feature_dirs["dinov2"], device="cpu")
    assert type(fm.dino_model).__name__ == "Dinov2Model"


def test_embeddings_are_normalised_float32_cpu(models):
    images = [_image(i) for i in range(3)]
    for emb, dim in (
        (models.embed_images_clip(images), 16),
        (models.embed_images_dino(images), 24),
        (models.embed_texts_clip(["a red circle", "x", "a photo of a dog"]), 16),
    ):
        assert emb.shape == (3, dim) and emb.dtype == torch.float32 and emb.device.type == "cpu"
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_batching_matches_one_by_one(models):
    images = [_image(i) for i in range(5)]
    texts = ["a", "a much longer prompt about a cat", "b c", "the dog", "z"]
    for embed, items in (
        (models.embed_images_clip, images),
        (models.embed_images_dino, images),
        (models.embed_texts_clip, texts),
    ):
        batched = embed(items, batch_size=3)
        single = torch.cat([embed([item], batch_size=1) for item in items])
        assert torch.allclose(batched, single, atol=1e-5)


def test_identical_images_score_one(models):
    image = _image(7)
    scores = models.score(image, [image.copy(), image.copy()], "a picture")
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert scores["dino_i"] == pytest.approx(1.0, abs=1e-5)
    assert set(scores) == {"clip_i", "clip_t", "dino_i"}
    assert -1.0 <= scores["clip_t"] <= 1.0


def test_score_pairs_generated_with_each_reference_and_target(models):
    gen, other, target = _image(1), _image(2), _image(3)
    scores = models.score(gen, [gen, other], "a prompt", target=target)
    clip = models.embed_images_clip([gen, other, target])
    dino = models.embed_images_dino([gen, other, target])
    text = models.embed_texts_clip(["a prompt"])
    assert scores["clip_i"] == pytest.approx((1.0 + float(clip[0] @ clip[1])) / 2, abs=1e-5)
    assert scores["dino_i"] == pytest.approx((1.0 + float(dino[0] @ dino[1])) / 2, abs=1e-5)
    assert scores["clip_t"] == pytest.approx(float(clip[0] @ text[0]), abs=1e-5)
    assert scores["clip_i_target"] == pytest.approx(float(clip[0] @ clip[2]), abs=1e-5)
    assert scores["dino_i_target"] == pytest.approx(float(dino[0] @ dino[2]), abs=1e-5)


def test_images_in_other_modes_are_converted(models):
    emb = models.embed_images_clip([_image(4, mode="L"), _image(4, mode="RGBA")])
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()


def test_prompt_longer_than_77_tokens_is_truncated(models):
    long_prompt = "a very detailed photograph of a small dog " * 12  # ~500 byte tokens
    assert len(models.clip_tokenizer(long_prompt)["input_ids"]) > 77
    emb = models.embed_texts_clip([long_prompt, "short"])
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    # Only the first 77 tokens count: a different tail beyond them changes nothing.
    other_tail = models.embed_texts_clip([long_prompt + " and then something else entirely"])
    assert torch.allclose(emb[0], other_tail[0], atol=1e-5)


def test_image_files_are_embedded_once_and_cached(models, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        _image(10 + i).save(paths[-1])
    models.clear_cache()
    first = models.embed_image_files(paths)
    assert isinstance(first, ImageEmbeddings) and len(first) == 3
    assert len(models.reference_cache) == 3
    again = models.embed_image_files([paths[2], paths[0], paths[2]])
    assert len(models.reference_cache) == 3
    assert torch.equal(again.clip, first.clip[[2, 0, 2]]) and torch.equal(again.dino, first.dino[[2, 0, 2]])
    direct = models.embed_images([Image.open(p).convert("RGB") for p in paths])
    assert torch.allclose(first.clip, direct.clip, atol=1e-5) and torch.allclose(first.dino, direct.dino, atol=1e-5)

    gen = _image(20)
    target = models.embed_image_files(paths[:1])
    scores = models.score_embedded(gen, first, "a prompt", target=target)
    reference = models.score(gen, [Image.open(p).convert("RGB") for p in paths], "a prompt", Image.open(paths[0]))
    assert scores == pytest.approx(reference, abs=1e-5)
