"""Import of the authors' released checkpoint layout: every key family, the LoRA, the finetuned trunk,
`.bin` files read without unpickling code."""

from __future__ import annotations

import pytest
import torch
from model_checks import TINY_SETTINGS, perturb_trunk, tokens, unet_output
from safetensors.torch import save_file

from easyref import EasyRefPipeline
from easyref.adapter import LORA_ADAPTER_NAME
from easyref.checkpoint import CheckpointError
from easyref.cli import main
from easyref.release import read_checkpoint


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
