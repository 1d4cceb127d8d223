"""What the checkpoint and release tests compare between a saved model and its reload, and a model
written out in the authors' release layout (`to_release_state_dict`)."""

from __future__ import annotations

import torch

from easyref.adapter import LORA_ADAPTER_NAME

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


def perturb_trunk(pipe):
    """Stand-in for a stage 2-3 finetuned MLLM trunk: differs from the stock Qwen2-VL folder."""
    with torch.no_grad():
        for param in list(pipe.reference_encoder.layers.parameters()) + list(
            pipe.reference_encoder.visual.parameters()
        ):
            param.add_(0.05 * torch.randn_like(param))


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
