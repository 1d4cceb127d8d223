"""Checkpoints in our own format: round trip, strict validation, damaged files, atomic saves."""

from __future__ import annotations

import json

import pytest
import torch
from model_checks import perturb_trunk, tokens, unet_output
from safetensors.torch import load_file, save_file

from easyref import EasyRefPipeline
from easyref.checkpoint import CheckpointError, save_checkpoint, state_dict_for_checkpoint
from easyref.release import read_checkpoint


def load(tiny_dirs, adapter):
    # unfused: the weights exactly as saved (fusing is its own transformation, tested in test_pipeline)
    pipe = EasyRefPipeline.from_pretrained(tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], adapter=adapter, fuse_lora=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- own format
@pytest.mark.parametrize("rank, trunk", [(0, False), (4, True)])
def test_save_load_bit_exact(make_pipeline, tiny_dirs, groups, tmp_path, rank, trunk):
    pipe = make_pipeline(lora_rank=rank, has_trunk=trunk)
    if trunk:
        perturb_trunk(pipe)
    pipe.save_adapter(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["easyref.safetensors", "easyref_config.json"]
    loaded = load(tiny_dirs, tmp_path / "ckpt")
    assert loaded.easyref_config == pipe.easyref_config
    saved = state_dict_for_checkpoint(pipe.easyref_config, pipe.reference_encoder, pipe.unet)
    again = state_dict_for_checkpoint(loaded.easyref_config, loaded.reference_encoder, loaded.unet)
    assert saved.keys() == again.keys()
    assert any(k.startswith("trunk.") for k in saved) == trunk
    assert any(".lora_A." in k for k in saved) == bool(rank)
    for key in saved:
        assert torch.equal(saved[key], again[key]), key
    assert torch.equal(tokens(pipe, groups), tokens(loaded, groups))
    assert torch.equal(unet_output(pipe), unet_output(loaded))


def test_config_json_is_self_describing(make_pipeline, tmp_path):
    pipe = make_pipeline(lora_rank=4)
    pipe.save_adapter(tmp_path)
    data = json.loads((tmp_path / "easyref_config.json").read_text())
    assert data["lora_rank"] == 4 and data["num_reference_tokens"] == 64 and data["attention_mode"] == "official"


def _mutate(path, change):
    tensors = load_file(str(path / "easyref.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "easyref.safetensors"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("aggregator.reference_tokens"), "missing tensor reference_tokens"),
        (lambda t: t.__setitem__("aggregator.extra", torch.zeros(1)), "unexpected tensor extra"),
        (
            lambda t: t.__setitem__("aggregator.reference_tokens", torch.zeros(32, 64)),
            r"reference_tokens has shape \(32, 64\)",
        ),
        (lambda t: t.pop(next(k for k in t if "to_k_ip" in k)), "missing tensor .*to_k_ip"),
        (lambda t: t.__setitem__("bogus.x", torch.zeros(1)), "unexpected tensor bogus.x"),
    ],
)
def test_strict_validation_names_the_tensor(make_pipeline, tiny_dirs, tmp_path, change, message):
    make_pipeline().save_adapter(tmp_path)
    _mutate(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load(tiny_dirs, tmp_path)


def test_checkpoint_for_another_base_model(make_pipeline, tiny_dirs, tmp_path):
    make_pipeline().save_adapter(tmp_path)
    data = json.loads((tmp_path / "easyref_config.json").read_text())
    data["cross_attention_dim"] = 2048
    (tmp_path / "easyref_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not fit"):
        load(tiny_dirs, tmp_path)


def test_damaged_files(tmp_path):
    (tmp_path / "easyref_config.json").write_text("{not json")
    (tmp_path / "easyref.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(tmp_path)
    (tmp_path / "easyref_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path)


# ---------------------------------------------------------------------------- release format
def test_save_is_atomic_no_temp_files_left(make_pipeline, tmp_path):
    pipe = make_pipeline()
    save_checkpoint(tmp_path, pipe.easyref_config, pipe.reference_encoder, pipe.unet)
    save_checkpoint(tmp_path, pipe.easyref_config, pipe.reference_encoder, pipe.unet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["easyref.safetensors", "easyref_config.json"]
