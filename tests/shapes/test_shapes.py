"""The shapes world: determinism, splits, the written datasets, the base model's pieces."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from easyref.shapes import world
from easyref.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    Subject,
    all_subjects,
    make_groups,
    render,
    subjects_in,
    target_scene,
)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_groups_and_renders_are_deterministic():
    a = make_groups("held-in", 5, 3, 2, seed=7)
    b = make_groups("held-in", 5, 3, 2, seed=7)
    c = make_groups("held-in", 5, 3, 2, seed=8)
    assert [g.prompt for g in a] == [g.prompt for g in b]
    for ga, gb in zip(a, b):
        for sa, sb in zip([*ga.references, ga.target], [*gb.references, gb.target]):
            assert np.array_equal(pixels(render(sa)), pixels(render(sb)))
    assert [g.subject for g in a] != [g.subject for g in c] or [g.prompt for g in a] != [g.prompt for g in c]


def test_splits_are_disjoint_and_held_out_is_zero_shot():
    held_in, held_out = set(subjects_in("held-in")), set(subjects_in("held-out"))
    assert held_in.isdisjoint(held_out) and held_in | held_out == set(all_subjects())
    assert len(all_subjects()) == len(SHAPES) * len(COLOURS) * len(PATTERNS)
    # every single attribute value is seen in training; only the combinations are new
    for attribute, values in (("shape", SHAPES), ("colour", COLOURS), ("pattern", PATTERNS)):
        assert {getattr(s, attribute) for s in held_in} == set(values)
    for group in make_groups("held-out", 20, 3, 2, seed=0):
        assert group.subject in held_out
        assert all(d.subject in held_out for ref in group.references for d in ref.distractors)


def test_groups_share_the_subject_and_the_prompt_never_names_it():
    for group in make_groups("held-in", 30, 4, 2, seed=1):
        assert all(ref.subject.subject == group.subject for ref in group.references)
        assert all(d.subject != group.subject for ref in group.references for d in ref.distractors)
        words = set(group.prompt.replace(",", " ").split())
        assert not words & ({group.subject.shape, group.subject.colour, group.subject.pattern})
        assert group.background in group.prompt and group.target.background == group.background


def test_render_draws_the_subject_where_and_how_asked():
    subject = Subject("square", "red", "solid")
    for position, (cx, cy) in POSITIONS.items():
        image = pixels(render(target_scene(subject, "white", position)))
        red = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] < 80)
        ys, xs = np.nonzero(red)
        assert abs(xs.mean() / 64 - cx) < 0.03 and abs(ys.mean() / 64 - cy) < 0.03
        assert tuple(image[0, 0]) == BACKGROUNDS["white"] or tuple(image[63, 63]) == BACKGROUNDS["white"]
    solid, striped = (
        pixels(render(target_scene(Subject("square", "blue", p), "black", "center"))) for p in ("solid", "striped")
    )
    centre = (slice(24, 40), slice(24, 40))
    spread = lambda image: image[centre].reshape(-1, 3).std(axis=0).max()  # per channel, over pixels
    assert spread(solid) < 1 and spread(striped) > 20  # the pattern is visible


def test_written_dataset_reads_through_the_training_pipeline(tmp_path):
    from easyref.shapes.data import write_training_data
    from easyref.train.data import DataSettings, TrainDataset, load_records

    paths = write_training_data(tmp_path, groups=12, min_refs=2, max_refs=3, distractors=(0, 2), seed=0)
    for stage, name in ((1, "pairs"), (2, "faces"), (3, "groups")):
        records = load_records(paths[name])
        settings = DataSettings(
            stage=stage,
            resolution=64,
            bucket_stride=16,
            crop="center",
            image_drop_rate=0,
            text_drop_rate=0,
            both_drop_rate=0,
        )
        sample = TrainDataset(records, tmp_path, settings, strict=True)[(0, 0)]
        assert sample.pixel_values.shape == (3, 64, 64)
        assert "object" in sample.text and not any(s in sample.text for s in SHAPES)
        if stage == 2:  # the "face" crop is the subject: mostly one colour, not the background
            crop = pixels(sample.references[0])
            assert crop.shape[0] >= 20
    base = load_records(paths["base"])
    assert any(s in base[0]["text"] for s in SHAPES)  # only the base model's captions name the subject
    assert all(world.split_of(s) == "held-in" for s in all_subjects() if s.key in " ".join(r["text"] for r in base))


def test_shapes_tokenizer_is_word_level_and_saves(tmp_path):
    from transformers import AutoTokenizer

    from easyref.shapes.base import shapes_clip_tokenizer

    tok = shapes_clip_tokenizer()
    ids = tok("a red striped star on a white background, at the top left").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert len(ids) == 2 + 13  # one id per word and per comma, plus start and end
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("a red star").input_ids == tok("a red star").input_ids


def test_base_model_trains_and_loads_as_an_sdxl_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from easyref.shapes.base import build_base_model

    torch.manual_seed(0)
    out = build_base_model(tmp_path / "base", vae_steps=2, base_steps=2, batch_size=2)
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor != 0.18215  # fitted to the world's latents
    with torch.no_grad():
        posterior = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist
    assert posterior.std.max() < 1e-2  # the saved VAE's posterior is sharpened
    image = pipe(
        "a red solid circle on a white background, in the center",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pil",
    ).images[0]
    assert image.size == (64, 64)


def test_a_base_reuses_a_finished_vae_and_trains_in_chunks(tmp_path):
    import json

    from safetensors.torch import load_file

    from easyref.shapes.base import build_base_model

    first = build_base_model(tmp_path / "first", vae_steps=1, base_steps=1, batch_size=2, levels=2)
    second = build_base_model(tmp_path / "second", vae_steps=1, base_steps=2, batch_size=2, vae_from=first, chunk=1)
    record = json.loads((second / "training.json").read_text())
    assert (record["levels"], record["base_steps"], record["base_runs"], record["vae_from"]) == (
        3,
        2,
        [1, 1],
        str(first),
    )
    vae = lambda folder: load_file(next((folder / "vae").glob("*.safetensors")))
    assert all(torch.equal(v, vae(second)[k]) for k, v in vae(first).items())
    configs = [json.loads((f / "unet" / "config.json").read_text())["down_block_types"] for f in (first, second)]
    assert [len(c) for c in configs] == [2, 3]  # the third level: 4 x 4 latents, where corners differ


def test_vae_training_lowers_reconstruction_loss():
    from easyref.shapes.base import build_pipeline, train_vae

    losses = train_vae(build_pipeline(0).vae, steps=30, batch_size=4, lr=3e-3)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_a_base_continues_where_it_stopped_and_stale_stages_go(tmp_path):
    import json

    from safetensors.torch import load_file

    from easyref.shapes.base import build_base_model, continue_base_model
    from easyref.shapes.build import PRESETS, continue_base

    work = tmp_path / "work"
    build_base_model(work / "base", vae_steps=1, base_steps=2, batch_size=2, levels=PRESETS["smoke"].unet_levels)
    unet_file = next((work / "base" / "unet").glob("*.safetensors"))
    vae_file = next((work / "base" / "vae").glob("*.safetensors"))
    unet_before, vae_before = load_file(unet_file), load_file(vae_file)
    (work / "stage1" / "final").mkdir(parents=True)
    (work / "model-mean").mkdir()
    recipe = dataclasses.replace(PRESETS["smoke"], base_steps=4, batch_size=2)
    continue_base(work, recipe, "cpu")
    record = json.loads((work / "base" / "training.json").read_text())
    assert record["base_steps"] == 4 and record["base_runs"] == [2, 2]
    assert not (work / "stage1").exists() and not (work / "model-mean").exists()
    unet_after = load_file(next((work / "base" / "unet").glob("*.safetensors")))
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    assert all(torch.equal(v, load_file(vae_file)[k]) for k, v in vae_before.items())  # the VAE is kept
    (work / "stage1").mkdir()
    continue_base_model(work / "base", 3, batch_size=2)  # already past 3 steps: nothing happens
    continue_base(work, recipe, "cpu")
    assert (work / "stage1").exists()
    continue_base(work, dataclasses.replace(recipe, base_steps=6, base_chunk=1), "cpu")  # in saved runs of 1
    assert json.loads((work / "base" / "training.json").read_text())["base_runs"] == [2, 2, 1, 1]
    continue_base(work, dataclasses.replace(recipe, unet_levels=2), "cpu")  # another UNet shape: rebuilt
    assert not (work / "base").exists() and not (work / "stage1").exists()


def test_base_captions_sometimes_leave_the_subject_out():
    from easyref.shapes.base import captioned_target
    from easyref.shapes.world import subjects_in

    rng = random.Random(0)
    captions = [captioned_target(rng, subjects_in("held-in"))[1] for _ in range(200)]
    subjectless = sum(c.startswith("an object") for c in captions)
    assert 30 < subjectless < 90  # about 30%, the form of EasyRef's prompts


def test_sharpened_posterior_keeps_the_mean_and_drops_the_noise():
    from easyref.shapes.base import build_pipeline, sharpen_posterior

    vae = build_pipeline(0).vae.eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        sharpen_posterior(vae)
        after = vae.encode(x).latent_dist
    assert torch.equal(before.mean, after.mean)
    assert before.std.mean() > 0.1 and after.std.max() < 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_scenes_keep_distractors_off_the_subject(seed):
    rng = random.Random(seed)
    for _ in range(50):
        scene = world.reference_scene(Subject("circle", "red", "solid"), 2, rng, all_subjects())
        s = scene.subject
        assert len(scene.distractors) == 2
        for d in scene.distractors:
            assert max(abs(d.cx - s.cx), abs(d.cy - s.cy)) > (s.size + d.size) / 2
            assert d.cx - d.size / 2 >= 0 and d.cx + d.size / 2 <= 1
        assert 0 < s.cx - s.size / 2 and s.cx + s.size / 2 < 1
