"""Runs the authors' own `EasyRef.get_image_embeds` for `authors_encode.py`, inside a venv with their pins.

Not for direct use: `authors_encode.py` builds the venv, starts this file in it and drives it. It imports
nothing from easyref (their transformers 4.45 and ours cannot share a process).

    python authors_worker.py make-model FOLDER CONFIG_JSON   # random Qwen2-VL in transformers 4.45's layout
    python authors_worker.py serve AUTHORS_REPO               # JSON requests on stdin, one reply per line

Their constructor places both MLLM copies on "cuda" (`device_map`), so `load` repeats what it does on
the device this machine has: the same two `from_pretrained` copies in bfloat16 with SDPA, the trunk copy
without its last layer, the second copy kept for its last layer, norm and 64 new reference tokens, their
processor with the 336-px pixel bounds and their projection class. Each timed call is their method,
unchanged. Their `qwen_vl_utils` imports torchvision for videos only; torchvision does not import beside
this machine's torch build, so an empty stand-in module is installed before their package is imported
(images go through PIL in their code either way).
"""

from __future__ import annotations

import json
import sys
import time
import types


def make_model(folder: str, config_json: str) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    settings = json.loads(config_json)
    torch.manual_seed(settings.pop("seed"))
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**settings)).to(torch.bfloat16)
    model.save_pretrained(folder)
    Qwen2VLImageProcessor().save_pretrained(folder)


def _import_their_code(repo: str):
    # the libraries first, so that their checks for torchvision see the truth; then the stand-in
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from diffusers.pipelines.controlnet import MultiControlNetModel  # noqa: F401

    stand_in = types.ModuleType("torchvision")
    stand_in.io = types.ModuleType("torchvision.io")
    stand_in.transforms = types.ModuleType("torchvision.transforms")
    stand_in.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC=3, BILINEAR=2)
    for name, module in (("", stand_in), (".io", stand_in.io), (".transforms", stand_in.transforms)):
        sys.modules.setdefault("torchvision" + name, module)
    sys.path.insert(0, repo)
    from ip_adapter.ip_adapter import EasyRef, MLPProjModel

    return EasyRef, MLPProjModel


def load(repo: str, folder: str, state_out: str, seed: int, cond_image_size: int = 336):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    EasyRef, MLPProjModel = _import_their_code(repo)
    torch.manual_seed(seed)
    theirs = object.__new__(EasyRef)
    theirs.device = "cpu"
    theirs.num_tokens = 64

    def copy():
        return Qwen2VLForConditionalGeneration.from_pretrained(
            folder, torch_dtype=torch.bfloat16, attn_implementation="sdpa"
        )

    final = copy().model
    final.layers = final.layers[-1:]
    final.embed_tokens = torch.nn.Identity()
    final.visual = torch.nn.Identity()
    final.lm_head = torch.nn.Identity()
    final.reference_tokens = torch.nn.Parameter(0.1 * torch.randn(64, final.config.hidden_size))
    for layer in final.layers:
        layer.self_attn.is_causal = False
    theirs.mllm_final_layer = final
    trunk = copy()
    trunk.model.layers = trunk.model.layers[:-1]
    trunk.norm = torch.nn.Identity()  # as their constructor: set on the outer model, so the inner norm stays
    theirs.multimodal_llm = trunk
    side = cond_image_size // 28
    theirs.image_processor = AutoProcessor.from_pretrained(
        folder, min_pixels=(side - 1) ** 2 * 784, max_pixels=(side**2 + 1) * 784
    )
    theirs.image_proj_model = MLPProjModel(cross_attention_dim=2048, clip_embeddings_dim=final.config.hidden_size)
    theirs.image_proj_model.to(torch.bfloat16)
    state = {"mllm_final_layer.reference_tokens": final.reference_tokens.detach()}
    for key, value in theirs.image_proj_model.state_dict().items():
        state[f"image_proj_model.{key}"] = value
    save_file({k: v.contiguous() for k, v in state.items()}, state_out)
    return theirs


def encode(theirs, request: dict) -> dict:
    from PIL import Image
    from safetensors.torch import save_file

    if request.get("black"):
        images = Image.new(mode="RGB", size=(512, 512))  # their negative branch
    else:
        images = [Image.open(path).convert("RGB") for path in request["images"]]
    start = time.perf_counter()
    out = theirs.get_image_embeds(images, request["text"])
    seconds = time.perf_counter() - start
    if request.get("out"):
        save_file({"embeds": out.float().contiguous()}, request["out"])
    return {"seconds": seconds}


def serve(repo: str) -> None:
    replies = sys.stdout
    sys.stdout = sys.stderr  # whatever the libraries print must not reach the protocol
    theirs = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "load":
            start = time.perf_counter()
            theirs = load(repo, request["folder"], request["state_out"], request["seed"])
            reply = {"load_s": time.perf_counter() - start}
        elif request["cmd"] == "encode":
            reply = encode(theirs, request)
        else:
            break
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    if sys.argv[1] == "make-model":
        make_model(sys.argv[2], sys.argv[3])
    else:
        serve(sys.argv[2])
