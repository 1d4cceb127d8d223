"""Adapter on a diffusers UNet: only intended parameters are new, init, scale, exact unload."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from easyref.adapter import (
    adapter_state_dict,
    fuse_lora,
    install_adapter,
    is_fused,
    load_adapter_state_dict,
    reference_processors,
    set_scale,
    unfuse_lora,
    unload_adapter,
)


@pytest.fixture
def unet(tiny_dirs):
    return UNet2DConditionModel.from_pretrained(tiny_dirs["sdxl"], subfolder="unet").eval()


def unet_inputs(with_tokens: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    args = (torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 500]), torch.randn(2, 7, 64, generator=gen))
    added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}
    if with_tokens:
        added["image_embeds"] = [torch.randn(2, 1, 64, 64, generator=gen)]
    return args, added


def run(unet, with_tokens: bool):
    args, added = unet_inputs(with_tokens)
    with torch.no_grad():
        return unet(*args, added_cond_kwargs=added).sample


@pytest.mark.parametrize("rank", [0, 4])
def test_only_adapter_parameters_are_new(unet, tiny_dirs, rank):
    before = {n: p for n, p in unet.named_parameters()}
    install_adapter(unet, tiny_config(tiny_dirs["qwen"], lora_rank=rank))
    after = dict(unet.named_parameters())
    # peft wraps targeted Linear layers: their own weights move under `.base_layer`
    renamed = {n.replace(".base_layer", ""): p for n, p in after.items()}
    new = sorted(set(renamed) - set(before))
    assert all(".processor.to_" in n or n.startswith("encoder_hid_proj.") or ".lora_" in n for n in new)
    assert any(".lora_" in n for n in new) == bool(rank)
    assert set(before) <= set(renamed)
    for name, param in before.items():
        assert renamed[name] is param, f"{name} was replaced"
    new_tensor_keys = {"unet." + k for k in adapter_state_dict(unet)}
    assert len(new_tensor_keys) == len(new)


def test_kv_initialised_from_text_kv(unet, tiny_dirs):
    install_adapter(unet, tiny_config(tiny_dirs["qwen"]))
    processors = reference_processors(unet)
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert sorted(processors) == sorted(cross) and cross
    for name, proc in processors.items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert isinstance(proc, IPAdapterAttnProcessor2_0) and list(proc.num_tokens) == [64]
        assert torch.equal(proc.to_k_ip[0].weight, attn.to_k.weight)
        assert torch.equal(proc.to_v_ip[0].weight, attn.to_v.weight)


def test_scale_zero_equals_plain_unet(unet, tiny_dirs):
    plain = run(unet, with_tokens=False)
    install_adapter(unet, tiny_config(tiny_dirs["qwen"]))
    assert not torch.allclose(run(unet, with_tokens=True), plain, atol=1e-4)
    set_scale(unet, 0.0)
    torch.testing.assert_close(run(unet, with_tokens=True), plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [0, 4])
def test_unload_restores_bit_exact(unet, tiny_dirs, rank):
    original_processors = {n: type(p) for n, p in unet.attn_processors.items()}
    keys = sorted(unet.state_dict())
    plain = run(unet, with_tokens=False)
    install_adapter(unet, tiny_config(tiny_dirs["qwen"], lora_rank=rank))
    with torch.no_grad():  # a trained LoRA would change the UNet; unload must still undo it
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_()
    unload_adapter(unet)
    assert torch.equal(run(unet, with_tokens=False), plain)
    assert sorted(unet.state_dict()) == keys
    assert {n: type(p) for n, p in unet.attn_processors.items()} == original_processors
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None


def test_per_block_scale(unet, tiny_dirs):
    install_adapter(unet, tiny_config(tiny_dirs["qwen"]))
    set_scale(unet, {"up": {"block_0": [0.0, 0.5]}})
    scales = {n: p.scale[0] for n, p in reference_processors(unet).items()}
    assert scales["up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"] == 0.5
    assert scales["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 0.0
    assert scales["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == 0.0
    set_scale(unet, 0.7)
    assert {p.scale[0] for p in reference_processors(unet).values()} == {0.7}


def test_install_twice_and_unload_without_install_fail(unet, tiny_dirs):
    with pytest.raises(ValueError, match="no EasyRef adapter"):
        unload_adapter(unet)
    install_adapter(unet, tiny_config(tiny_dirs["qwen"]))
    with pytest.raises(ValueError, match="already installed"):
        install_adapter(unet, tiny_config(tiny_dirs["qwen"]))


def test_cross_attention_dim_mismatch(unet, tiny_dirs):
    with pytest.raises(ValueError, match="cross_attention_dim"):
        install_adapter(unet, tiny_config(tiny_dirs["qwen"], cross_attention_dim=2048))


def _trained_lora(unet, tiny_dirs):
    install_adapter(unet, tiny_config(tiny_dirs["qwen"], lora_rank=4))
    with torch.no_grad():  # a trained LoRA changes the UNet's output; fresh lora_B is zero
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)


def test_fused_lora_computes_what_the_unfused_does_without_its_layers(unet, tiny_dirs):
    _trained_lora(unet, tiny_dirs)
    unfused = run(unet, with_tokens=True)
    lora_calls = []
    hooks = [
        m.register_forward_hook(lambda *a: lora_calls.append(1))
        for n, m in unet.named_modules()
        if n.endswith("lora_A.easyref")
    ]
    assert hooks and fuse_lora(unet) and is_fused(unet)
    fused = run(unet, with_tokens=True)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    assert not lora_calls  # a fused UNet call runs no LoRA layer
    assert not fuse_lora(unet)  # fusing twice is a no-op


def test_a_fused_unet_holds_bare_layers_and_unfusing_puts_peft_back(unet, tiny_dirs):
    """Fused, the adapted layers are plain `nn.Linear`s (no peft dispatch per call), and the tensors that
    are saved are still the LoRA's; unfused, peft's layers are back in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    _trained_lora(unet, tiny_dirs)
    saved = adapter_state_dict(unet)
    adapted = [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    fuse_lora(unet)
    assert not [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    assert {type(unet.get_submodule(n)) for n in adapted} == {torch.nn.Linear}
    assert adapter_state_dict(unet).keys() == saved.keys()
    assert all(torch.equal(adapter_state_dict(unet)[k], v) for k, v in saved.items())
    unfuse_lora(unet)
    assert [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)] == adapted


def test_loading_into_a_fused_unet_fuses_the_loaded_lora(unet, tiny_dirs):
    _trained_lora(unet, tiny_dirs)
    loaded = {k: v + 0.05 for k, v in adapter_state_dict(unet).items()}
    load_adapter_state_dict(unet, loaded)  # unfused: the reference
    expected = run(unet, with_tokens=True)
    load_adapter_state_dict(unet, {k: v - 0.05 for k, v in loaded.items()})
    fuse_lora(unet)
    load_adapter_state_dict(unet, loaded)
    assert is_fused(unet)
    torch.testing.assert_close(run(unet, with_tokens=True), expected, atol=1e-5, rtol=1e-5)


def test_unfuse_and_unload_after_fusing_are_bit_exact(unet, tiny_dirs):
    plain = run(unet, with_tokens=False)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    _trained_lora(unet, tiny_dirs)
    unfused = run(unet, with_tokens=True)
    fuse_lora(unet)
    unfuse_lora(unet)
    assert not is_fused(unet) and torch.equal(run(unet, with_tokens=True), unfused)
    fuse_lora(unet)
    unload_adapter(unet)
    assert torch.equal(run(unet, with_tokens=False), plain)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in weights.items())
