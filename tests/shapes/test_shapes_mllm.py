"""The tiny Qwen2-VL's pretraining on the shapes world: vision tower, then captions."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from easyref.config import EasyRefConfig
from easyref.shapes.mllm import (
    IGNORE,
    VISION_ATTRIBUTES,
    build_mllm,
    caption_batch,
    load,
    pretrain_mllm,
    pretrain_vision,
    random_scene,
    scene_caption,
)
from easyref.shapes.world import Placement, Scene, Subject, subjects_in
from easyref.tiny import save_tiny_qwen2vl


def test_caption_names_every_object_left_to_right():
    star, circle = Subject("star", "red", "striped"), Subject("circle", "blue", "solid")
    scene = Scene("tan", Placement(star, 0.7, 0.5, 0.4), [Placement(circle, 0.2, 0.3, 0.2)])
    assert scene_caption(scene) == "a blue solid circle and a red striped star on a tan background"


def test_caption_batch_scores_only_the_caption(tmp_path):
    save_tiny_qwen2vl(tmp_path, seed=0, for_training=True)
    _, tokenizer, image_processor = load(tmp_path)
    rng = random.Random(0)
    scenes = [random_scene(rng, subjects_in("held-in")) for _ in range(3)]
    batch = caption_batch(scenes, tokenizer, image_processor, EasyRefConfig(reference_image_size=56))
    for row, scene in enumerate(scenes):
        answer = batch["labels"][row][batch["labels"][row] != IGNORE]
        assert tokenizer.decode(answer) == scene_caption(scene) + "<|im_end|>"
        real = batch["attention_mask"][row].bool()
        assert batch["position_ids"][row][real].tolist() == list(range(int(real.sum())))
    assert batch["image_grid_thw"].shape[0] == 3


def test_pretraining_lowers_the_caption_loss_and_keeps_a_loadable_folder(tmp_path):
    from easyref.encoder import ReferenceEncoder

    save_tiny_qwen2vl(tmp_path, seed=0, for_training=True)
    losses = pretrain_mllm(tmp_path, steps=30, batch_size=4, reference_image_size=56)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    encoder = ReferenceEncoder.from_pretrained(tmp_path)  # the folder EasyRef's stages start from
    assert encoder.config.mllm_hidden_size == 64


def test_build_mllm_writes_its_record_and_replaces_atomically(tmp_path):
    out = build_mllm(tmp_path / "qwen2vl", steps=2, batch_size=2, reference_image_size=56)
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 2 and 0.0 <= record["caption_accuracy"] <= 1.0
    assert not (tmp_path / ".qwen2vl.tmp").exists()
    before = (out / "model.safetensors").read_bytes()
    torch.manual_seed(1)
    build_mllm(tmp_path / "qwen2vl", steps=2, batch_size=2, seed=5, reference_image_size=56)
    assert (out / "model.safetensors").read_bytes() != before


def test_vision_pretraining_trains_the_vision_tower_alone_and_drops_its_heads(tmp_path):
    from safetensors.torch import load_file

    save_tiny_qwen2vl(tmp_path, seed=0, for_training=True)
    before = load_file(tmp_path / "model.safetensors")
    losses, accuracy = pretrain_vision(tmp_path, steps=40, batch_size=8, reference_image_size=56)
    after = load_file(tmp_path / "model.safetensors")
    assert after.keys() == before.keys()  # the attribute heads are not saved into the MLLM
    vision = [k for k in before if ".visual." in k or k.startswith("visual.")]
    assert vision and all(not torch.equal(before[k], after[k]) for k in vision if k.endswith("weight"))
    assert all(torch.equal(before[k], after[k]) for k in before if k not in vision)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert set(accuracy) == set(VISION_ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in accuracy.values())


def test_build_mllm_sizes_the_vision_tower_and_records_both_phases(tmp_path):
    from transformers import AutoConfig

    out = build_mllm(
        tmp_path / "qwen2vl",
        steps=2,
        batch_size=2,
        reference_image_size=56,
        vision_steps=2,
        vision_width=48,
        vision_depth=1,
    )
    config = AutoConfig.from_pretrained(out)
    assert (config.vision_config.embed_dim, config.vision_config.depth) == (48, 1)
    record = json.loads((out / "training.json").read_text())
    assert (record["vision_steps"], record["vision_width"], record["vision_depth"]) == (2, 48, 1)
    assert set(record["vision_held_out_accuracy"]) == set(VISION_ATTRIBUTES)


def test_an_mllm_built_to_another_recipe_is_dropped_with_its_stages(tmp_path):
    import dataclasses

    from easyref.shapes.build import PRESETS, drop_stale_mllm

    recipe = PRESETS["smoke"]
    (tmp_path / "qwen2vl").mkdir()
    (tmp_path / "stage2").mkdir()
    record = {
        "steps": recipe.mllm_steps,
        "vision_steps": recipe.vision_steps,
        "vision_width": recipe.vision_width,
        "vision_depth": recipe.vision_depth,
    }
    (tmp_path / "qwen2vl" / "training.json").write_text(json.dumps(record))
    drop_stale_mllm(tmp_path, recipe)
    assert (tmp_path / "qwen2vl").exists() and (tmp_path / "stage2").exists()
    drop_stale_mllm(tmp_path, dataclasses.replace(recipe, vision_steps=recipe.vision_steps + 1))
    assert not (tmp_path / "qwen2vl").exists() and not (tmp_path / "stage2").exists()


def test_caption_pretraining_can_keep_a_pretrained_vision_tower(tmp_path):
    from safetensors.torch import load_file

    save_tiny_qwen2vl(tmp_path, seed=0, for_training=True)
    before = load_file(tmp_path / "model.safetensors")
    pretrain_mllm(tmp_path, steps=3, batch_size=2, reference_image_size=56, freeze_vision=True)
    after = load_file(tmp_path / "model.safetensors")
    vision = [k for k in before if ".visual." in k or k.startswith("visual.")]
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in vision)


def test_caption_attribute_accuracy_reads_each_word(tmp_path, monkeypatch):
    """A model whose every prediction is the next label scores 1 everywhere; one that is always
    wrong scores 0: the per-word bookkeeping, checked through a stand-in model."""
    import easyref.shapes.mllm as mllm

    save_tiny_qwen2vl(tmp_path, seed=0, for_training=True)
    model, tokenizer, processor = load(tmp_path)

    class Oracle(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, input_ids, **_):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            following = torch.roll(input_ids, -1, dims=1)  # the next token, i.e. the label
            logits.scatter_(-1, ((following + self.shift) % len(tokenizer)).unsqueeze(-1), 1.0)
            return type("Out", (), {"logits": logits})()

    for shift, expected in ((0, 1.0), (1, 0.0)):
        monkeypatch.setattr(mllm, "load", lambda folder, s=shift: (Oracle(s), tokenizer, processor))
        scores = mllm.caption_attribute_accuracy(tmp_path, count=4, reference_image_size=56)
        assert scores == dict.fromkeys(VISION_ATTRIBUTES, expected)


def test_grounding_batch_reads_the_group_as_the_encoder_does_and_scores_only_the_subject(tmp_path):
    from easyref.prompting import build_inputs
    from easyref.shapes.mllm import grounding_batch, grounding_groups
    from easyref.shapes.world import render

    save_tiny_qwen2vl(tmp_path, seed=0, for_training=True)
    _, tokenizer, image_processor = load(tmp_path)
    config = EasyRefConfig(reference_image_size=56)
    groups = grounding_groups(random.Random(0), 4, kinds=("repeat", "pick"))
    assert {g.kind for g in groups} <= {"repeat", "pick"} and all(g.split == "held-in" for g in groups)
    batch = grounding_batch(groups, tokenizer, image_processor, config)
    encoder_view = build_inputs(
        [[render(s) for s in g.references] for g in groups],
        [config.format_instruction(g.prompt) for g in groups],
        tokenizer,
        image_processor,
        config,
    )
    for row, group in enumerate(groups):
        answer = batch["labels"][row][batch["labels"][row] != IGNORE]
        assert tokenizer.decode(answer) == f"a {group.subject.key}<|im_end|>"
        prompt_length = int(encoder_view.attention_mask[row].sum())
        assert batch["input_ids"][row][:prompt_length].tolist() == encoder_view.input_ids[row][:prompt_length].tolist()
    assert torch.equal(batch["pixel_values"], encoder_view.pixel_values)


def test_grounding_pretraining_lowers_its_loss(tmp_path):
    from easyref.shapes.mllm import pretrain_grounding

    save_tiny_qwen2vl(tmp_path, seed=0, for_training=True)
    losses = pretrain_grounding(tmp_path, steps=30, batch_size=4, lr=3e-3, reference_image_size=56)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
