"""Runs one training step of the authors' `finetune_sdxl.py` for `authors_train_step.py`, in a venv with
their pins (transformers 4.45.2, diffusers 0.22.1). Not for direct use; it imports nothing from easyref.

    python authors_train_worker.py serve AUTHORS_REPO   # JSON requests on stdin, one reply per line

`build` repeats their `main()` up to the optimizer on this machine's CPU: their scheduler, tokenizers,
text encoders, VAE, UNet, the two Qwen2-VL copies cut as they cut them, their reference tokens,
`MLPProjModel`, their IP / LoRA-IP attention processors with to_k_ip/to_v_ip copied from to_k/to_v, their
`EasyRef` module, their `MyDataset`. Changes, all made here at run time (their files are not edited):
the MLLM copies load in float32 on the CPU (theirs: bfloat16, `device_map="cuda"`); the drop rates and
truncation are 0; the LoRA up-weights get small random values (theirs start at zero, which would give
their down-weights no gradient to compare); `random_expand` draws no expansion; their `random.shuffle`
of the references applies the order our data drew; torchvision (which does not import beside this
machine's torch) is replaced by a small stand-in of the transforms they use (PIL resize, to-tensor,
normalize, crop; the random flip is the identity). `step` runs the body of their training loop for one
batch: their collate, VAE encode, text encoders, `add_noise`, their `EasyRef.forward`, MSE, backward,
with the VAE sample's eps, the noise and the timesteps taken from the request (the only change to the
loop: those three draws are injected instead of drawn), and saves every trainable gradient.
"""

from __future__ import annotations

import json
import sys
import types


def _torchvision_stand_in():
    import numpy as np
    import torch
    from PIL import Image

    tv = types.ModuleType("torchvision")
    tv.io = types.ModuleType("torchvision.io")
    tr = tv.transforms = types.ModuleType("torchvision.transforms")
    tr.InterpolationMode = types.SimpleNamespace(BICUBIC=3, BILINEAR=2, NEAREST=0)
    pil_modes = {2: Image.BILINEAR, 3: Image.BICUBIC, 0: Image.NEAREST}

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class Resize:  # torchvision's rule for an int size on a PIL image: the short side to `size`
        def __init__(self, size, interpolation=2):
            self.size, self.mode = size, pil_modes[int(interpolation)]

        def __call__(self, img):
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            if short == self.size:
                return img
            new_long = int(self.size * long / short)
            size = (self.size, new_long) if w <= h else (new_long, self.size)
            return img.resize(size, self.mode)

    class ToTensor:
        def __call__(self, img):
            return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, t):
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            return (t - mean) / std

    class RandomHorizontalFlip:  # flips are off in this comparison
        def __call__(self, img):
            return img

    def crop(img, top, left, height, width):
        if isinstance(img, torch.Tensor):
            assert top >= 0 and left >= 0 and top + height <= img.shape[-2] and left + width <= img.shape[-1]
            return img[..., top : top + height, left : left + width]
        return img.crop((left, top, left + width, top + height))

    tr.Compose, tr.Resize, tr.ToTensor, tr.Normalize = Compose, Resize, ToTensor, Normalize
    tr.RandomHorizontalFlip = RandomHorizontalFlip
    tr.functional = types.SimpleNamespace(crop=crop)
    for name, module in (("", tv), (".io", tv.io), (".transforms", tr)):
        sys.modules.setdefault("torchvision" + name, module)


def _import_their_script(repo: str):
    import diffusers  # noqa: F401  (the libraries first, so their torchvision checks see the truth)
    import transformers  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401

    _torchvision_stand_in()
    sys.path.insert(0, repo)
    import finetune_sdxl

    return finetune_sdxl


def _clip_tokenizer(cls, base: str, sub: str):
    """Their `CLIPTokenizer`; the tiny folders' tokenizers, written by a newer transformers, may only load
    as the fast class under 4.45 (the same vocabulary and ids)."""
    try:
        return cls.from_pretrained(base, subfolder=sub)
    except Exception:  # noqa: BLE001
        from transformers import CLIPTokenizerFast

        return CLIPTokenizerFast.from_pretrained(base, subfolder=sub)


def _clip_text_model(cls, base: str, sub: str):
    """Their `CLIPTextModel`. A newer transformers writes this model's keys without the `text_model.`
    prefix, which 4.45 does not map (it would leave every weight randomly initialized): load them here."""
    import glob
    import os

    from safetensors.torch import load_file

    model = cls.from_pretrained(base, subfolder=sub)
    state = {}
    for f in sorted(glob.glob(os.path.join(base, sub, "*.safetensors"))):
        state.update(load_file(f))
    prefix = "text_model."
    state = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"{sub}: missing {missing}, unexpected {unexpected}")
    return model


class Run:
    def __init__(self, repo: str):
        self.fs = _import_their_script(repo)

    def build(self, r: dict) -> dict:
        import functools
        import random

        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from safetensors.torch import save_file
        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            Qwen2VLForConditionalGeneration,
        )

        fs, base, mllm = self.fs, r["base"], r["mllm"]
        torch.manual_seed(r["seed"])
        self.scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        tok = _clip_tokenizer(CLIPTokenizer, base, "tokenizer")
        self.te = _clip_text_model(CLIPTextModel, base, "text_encoder")
        tok2 = _clip_tokenizer(CLIPTokenizer, base, "tokenizer_2")
        self.te2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        load = functools.partial(
            Qwen2VLForConditionalGeneration.from_pretrained, mllm, torch_dtype=torch.float32, attn_implementation="sdpa"
        )
        final = load().model
        final.layers = final.layers[-1:]
        final.embed_tokens = torch.nn.Identity()
        final.visual = torch.nn.Identity()
        final.lm_head = torch.nn.Identity()
        n = r["num_reference_tokens"]
        final.reference_tokens = torch.nn.Parameter(0.1 * torch.randn(n, final.config.hidden_size))
        trunk = load()
        trunk.model.layers = trunk.model.layers[:-1]
        trunk.norm = torch.nn.Identity()
        for m in (unet, self.vae, self.te, self.te2):
            m.requires_grad_(False)
        self.unfreeze = r["unfreeze_mllm"]
        if not self.unfreeze:
            trunk.requires_grad_(False)
        proj = fs.MLPProjModel(
            cross_attention_dim=unet.config.cross_attention_dim, clip_embeddings_dim=trunk.config.hidden_size
        )
        procs, sd = {}, unet.state_dict()
        for name in unet.attn_processors.keys():  # their loop, as it is
            cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
            if name.startswith("mid_block"):
                hidden = unet.config.block_out_channels[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
            else:
                hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
            if cross is None:
                procs[name] = (
                    fs.LoRAAttnProcessor(hidden_size=hidden, cross_attention_dim=None, rank=r["lora_rank"])
                    if r["use_lora"]
                    else fs.AttnProcessor()
                )
            else:
                layer = name.split(".processor")[0]
                w = {"to_k_ip.weight": sd[layer + ".to_k.weight"], "to_v_ip.weight": sd[layer + ".to_v.weight"]}
                if r["use_lora"]:
                    procs[name] = fs.LoRAIPAttnProcessor(
                        hidden_size=hidden, cross_attention_dim=cross, num_tokens=n, rank=r["lora_rank"]
                    )
                    procs[name].load_state_dict(w, strict=False)
                else:
                    procs[name] = fs.IPAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, num_tokens=n)
                    procs[name].load_state_dict(w)
        unet.set_attn_processor(procs)
        adapters = torch.nn.ModuleList(unet.attn_processors.values())
        with torch.no_grad():  # see the docstring: nonzero LoRA up-weights, so every LoRA tensor gets a gradient
            for pname, p in adapters.named_parameters():
                if "_lora.up." in pname:
                    p.normal_(0, 0.02)
        self.model = fs.EasyRef(unet, trunk, final, proj, adapters, None)
        save_file({k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}, r["state_out"])
        fs.random_expand = functools.partial(fs.random_expand, max_expanding_percent=1)  # randint(0, 1) == 0
        self.dataset = fs.MyDataset(
            r["data"],
            tokenizer=tok,
            tokenizer_2=tok2,
            size=r["resolution"],
            t_drop_rate=0.0,
            i_drop_rate=0.0,
            ti_drop_rate=0.0,
            truncate_rate=0.0,
            max_num_images=r["max_num_images"],
            cond_image_size=r["cond_image_size"],
            image_root_path=r["data_root"],
            random_crop=r["random_crop"],
            multi_ref_finetuning=r["multi_ref_finetuning"],
            multimodal_llm_path=mllm,
        )
        self.random = random
        return {"ok": True}

    def step(self, r: dict) -> dict:
        import torch
        import torch.nn.functional as F
        from safetensors.torch import load_file, save_file

        fs, injected = self.fs, load_file(r["inject"])
        items = []
        for idx, order in zip(r["indices"], r["orders"]):

            def shuffle(files, order=order):  # the order our data drew, applied where they shuffle
                files[:] = [files[i] for i in order]

            fs.random = types.SimpleNamespace(shuffle=shuffle, random=self.random.random)
            items.append(self.dataset[idx])
        batch = fs.collate_fn(items)
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            dist = self.vae.encode(batch["images"].float()).latent_dist
            latents = (dist.mean + dist.std * injected["eps"]) * self.vae.config.scaling_factor  # = .sample()
            noise, timesteps = injected["noise"], injected["timesteps"].long()
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            out = self.te(batch["text_input_ids"], output_hidden_states=True)
            out2 = self.te2(batch["text_input_ids_2"], output_hidden_states=True)
            text_embeds = torch.concat([out.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        time_ids = torch.cat([batch["original_size"], batch["crop_coords_top_left"], batch["target_size"]], dim=1)
        cond = {"text_embeds": out2[0], "time_ids": time_ids.float()}
        mask = batch["attention_mask"]
        kwargs = {
            "input_ids": batch["input_ids"],
            "attention_mask": mask,
            "pixel_values": batch["pixel_values"],
            "image_grid_thw": batch["image_grid_thw"],
        }
        dump, hooks = {}, []
        if r.get("dump"):  # optional: the intermediate tensors of this step, for diagnosing a mismatch
            dump.update({k: v for k, v in kwargs.items() if torch.is_tensor(v)})
            if not torch.is_tensor(kwargs["pixel_values"]):
                dump["pixel_values"] = torch.cat(list(kwargs["pixel_values"]))
                dump["image_grid_thw"] = torch.cat(list(kwargs["image_grid_thw"]))
            m = self.model

            def keep(name):
                return lambda mod, args, out: dump.__setitem__(name, out.hidden_states[-1].detach().clone())

            hooks.append(m.multimodal_llm.register_forward_hook(keep("trunk_out")))
            hooks.append(m.mllm_final_layer.register_forward_hook(keep("final_layer_out")))

            def proj_in(mod, args):
                dump["reference_tokens_out"] = args[0].detach().clone()

            def proj_out(mod, args, out):
                dump["projected"] = out.detach().clone()

            def unet_in(mod, args, kw):
                names = ("unet_latents", "unet_timesteps", "unet_encoder_hidden_states")
                for name, a in zip(names, args):
                    dump[name] = a.detach().clone()
                for k, v in kw["added_cond_kwargs"].items():
                    dump["unet_" + k] = v.detach().clone()

            hooks.append(m.image_proj_model.register_forward_pre_hook(proj_in))
            hooks.append(m.image_proj_model.register_forward_hook(proj_out))
            hooks.append(m.unet.register_forward_pre_hook(unet_in, with_kwargs=True))
        pred = self.model(
            noisy, timesteps, text_embeds, cond, None, mask, batch["drop_image_embeds"], kwargs, self.unfreeze
        )
        for h in hooks:
            h.remove()
        if r.get("dump"):
            dump["pred"] = pred.detach().clone()
            torch.save(dump, r["dump"])
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        grads = {n: p.grad.contiguous() for n, p in self.model.named_parameters() if p.grad is not None}
        save_file(grads, r["grads_out"])
        extra = {"images": batch["images"], "time_ids": time_ids.float(), "input_ids": batch["input_ids"].squeeze(1)}
        save_file({k: v.contiguous() for k, v in extra.items()}, r["batch_out"])
        return {"loss": float(loss), "n_grads": len(grads)}


def serve(repo: str) -> None:
    replies, sys.stdout = sys.stdout, sys.stderr  # whatever the libraries print must not reach the protocol
    run = Run(repo)
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        reply = getattr(run, request["cmd"])(request)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(sys.argv[2])
