"""Checkpoints: own format round trip, strict validation, import of the authors' release format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from easyref import EasyRefPipeline
from easyref.adapter import LORA_ADAPTER_NAME
from easyref.checkpoint import CheckpointError, save_checkpoint, state_dict_for_checkpoint
from easyref.cli import main
from easyref.release import read_checkpoint

PROMPTS = ["a cat"]
# the release's settings are the real ones (336 px references); the tiny pipelines use smaller ones
TINY_SETTINGS = {"reference_image_size": 56, "max_references": 6}


def unet_output(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, e = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 64, generator=gen)
    added = {
        "text_embeds": torch.randn(2, 32, generator=gen),
        "time_ids": torch.randn(2, 6, generator=gen),
        "image_embeds": [torch.randn(2, 1, 64, 64, generator=gen)],
    }
    with torch.no_grad():
        return pipe.unet(x, 10, e, added_cond_kwargs=added).sample


def tokens(pipe, groups):
    return pipe.encode_references(groups[:1], PROMPTS)


def load(tiny_dirs, adapter):
    pipe = EasyRefPipeline.from_pretrained(tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb_trunk(pipe):
    """Stand-in for a stage 2-3 finetuned MLLM trunk: differs from the stock Qwen2-VL folder."""
    with torch.no_grad():
        for param in list(pipe.reference_encoder.layers.parameters()) + list(
            pipe.reference_encoder.visual.parameters()
        ):
            param.add_(0.05 * torch.randn_like(param))


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
def to_release_state_dict(pipe, with_duplicates=True) -> dict[str, torch.Tensor]:
    """The authors' layout, built from our modules with exactly the release's key names."""
    from peft.utils import get_peft_model_state_dict

    enc, unet = pipe.reference_encoder, pipe.unet
    out = {}
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    for index, module in (("0", proj.ff.net[0].proj), ("2", proj.ff.net[2]), ("3", proj.norm)):
        for name, tensor in module.state_dict().items():
            out[f"image_proj_model.proj.{index}.{name}"] = tensor
    out.update({f"mllm_final_layer.{k}": v for k, v in enc.aggregator.state_dict().items()})
    processor_names = list(unet.attn_processors)
    for position, name in enumerate(processor_names):
        proc = unet.attn_processors[name]
        if hasattr(proc, "to_k_ip"):
            for kv in ("to_k_ip", "to_v_ip"):
                out[f"unet.{name}.{kv}.weight"] = getattr(proc, kv)[0].weight
                if with_duplicates:
                    out[f"adapter_modules.{position}.{kv}.weight"] = getattr(proc, kv)[0].weight.clone()
    if pipe.easyref_config.lora_rank:
        lora = get_peft_model_state_dict(unet, adapter_name=LORA_ADAPTER_NAME)
        for key, tensor in lora.items():
            attn, _, rest = key.rpartition(".to_")
            target, side = rest.split(".lora_")[0], rest.split(".lora_")[1]
            target = target.replace("out.0", "out")
            kind = {"A.weight": "down", "B.weight": "up"}[side]
            out[f"unet.{attn}.processor.to_{target}_lora.{kind}.weight"] = tensor
    base_unet = {k: v for k, v in unet.state_dict().items() if ".processor." not in k and "lora" not in k}
    out.update({f"unet.{k.replace('.base_layer', '')}": v for k, v in base_unet.items() if "encoder_hid_proj" not in k})
    if pipe.easyref_config.has_trunk:
        for key, tensor in enc.layers.state_dict().items():
            out[f"multimodal_llm.model.layers.{key}"] = tensor
        out["multimodal_llm.model.embed_tokens.weight"] = enc.embed_tokens.weight
        out["multimodal_llm.model.norm.weight"] = enc.norm.weight
        out["multimodal_llm.lm_head.weight"] = enc.embed_tokens.weight.clone()
        out.update({f"multimodal_llm.visual.{k}": v for k, v in enc.visual.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.mark.parametrize("rank, trunk, duplicates", [(0, False, False), (4, True, True)])
def test_release_import_round_trip(make_pipeline, tiny_dirs, groups, tmp_path, rank, trunk, duplicates):
    pipe = make_pipeline(lora_rank=rank, has_trunk=trunk)
    if trunk:
        perturb_trunk(pipe)
    release = tmp_path / "release"
    release.mkdir()
    save_file(to_release_state_dict(pipe, duplicates), str(release / "model.safetensors"))
    assert main(["convert", str(release), str(tmp_path / "converted"), "--mllm", str(tiny_dirs["qwen"])]) == 0
    for source in (tmp_path / "converted", release):  # converted, and transparently from the release folder
        loaded = EasyRefPipeline.from_pretrained(
            tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], adapter=source, config_overrides=TINY_SETTINGS
        )
        assert loaded.easyref_config.lora_rank == rank and loaded.easyref_config.has_trunk == trunk
        torch.testing.assert_close(tokens(loaded, groups), tokens(pipe, groups), atol=0, rtol=0)
        torch.testing.assert_close(unet_output(loaded), unet_output(pipe), atol=0, rtol=0)


def test_release_import_rejects_unknown_keys(make_pipeline, tmp_path):
    tensors = to_release_state_dict(make_pipeline())
    tensors["something_else.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor something_else.weight"):
        read_checkpoint(tmp_path)


def test_release_bin_is_loaded_without_unpickling_code(make_pipeline, tiny_dirs, groups, tmp_path):
    pipe = make_pipeline()
    torch.save({"module": to_release_state_dict(pipe)}, tmp_path / "model.bin")
    loaded = EasyRefPipeline.from_pretrained(
        tiny_dirs["sdxl"], mllm=tiny_dirs["qwen"], adapter=tmp_path, config_overrides=TINY_SETTINGS
    )
    assert torch.equal(tokens(loaded, groups), tokens(pipe, groups))


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_hostile_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"module": {"x": _Payload()}}, tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_save_is_atomic_no_temp_files_left(make_pipeline, tmp_path):
    pipe = make_pipeline()
    save_checkpoint(tmp_path, pipe.easyref_config, pipe.reference_encoder, pipe.unet)
    save_checkpoint(tmp_path, pipe.easyref_config, pipe.reference_encoder, pipe.unet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["easyref.safetensors", "easyref_config.json"]
