"""`ReferenceEncoder`: Qwen2-VL reads a whole group of references and emits 64 reference tokens.

Paper, Sec. 3.2: the MLLM trunk (vision tower, all decoder layers but the last, final norm) encodes
[images ; instruction + prompt]; learnable reference tokens are appended and only the aggregation
layer (a trainable copy of the last decoder layer + norm) sees them; its last 64 outputs are the
condition. The MLLM weights are held once: the last decoder layer is moved out of the trunk into the
aggregation layer rather than loading the model twice as the release code does.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from .config import EasyRefConfig
from .explain import capture_attention, group_maps, image_token_maps
from .feature_cache import FeatureCache, image_key
from .prompting import MLLMInputs, build_inputs, negative_image, prepare_inputs

logger = logging.getLogger(__name__)

# The MLLM trunk: everything of Qwen2-VL that reads the group before the aggregation layer. Frozen in
# stage 1, finetuned in stages 2-3, and saved (`trunk.*`) only by checkpoints that trained it.
TRUNK_PARTS = ("visual", "embed_tokens", "layers", "norm")


class AggregationLayer(nn.Module):
    """Reference tokens + one decoder layer + final RMSNorm (release keys: `layers.0.*`, `norm.weight`)."""

    def __init__(self, layer: nn.Module, norm: nn.Module, num_tokens: int, hidden_size: int):
        super().__init__()
        self.layers = nn.ModuleList([layer])
        self.norm = norm
        weight = norm.weight
        # init as in the paper's code: 0.1 * N(0, 1); dtype and device follow the loaded MLLM
        tokens = 0.1 * torch.randn(num_tokens, hidden_size, device=weight.device)
        self.reference_tokens = nn.Parameter(tokens.to(weight.dtype))


class ReferenceEncoder(nn.Module):
    """Groups of PIL images + prompts -> (B, num_reference_tokens, mllm hidden) reference tokens."""

    def __init__(self, config: EasyRefConfig, model: nn.Module, tokenizer, image_processor):
        """Take ownership of a `Qwen2VLForConditionalGeneration`'s parts (its lm_head is dropped)."""
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        language = model.model.language_model
        self.mllm_config = model.config
        self.image_token_id = model.config.image_token_id
        self.visual = model.model.visual
        self.embed_tokens = language.embed_tokens
        self.rotary_emb = language.rotary_emb
        layers = list(language.layers)
        if len(layers) < 2:
            raise ValueError("the MLLM needs at least two decoder layers (trunk + aggregation layer)")
        self.layers = nn.ModuleList(layers[:-1])
        self.norm = language.norm
        hidden = model.config.text_config.hidden_size
        if hidden != config.mllm_hidden_size:
            raise ValueError(
                f"MLLM hidden size {hidden} does not match the EasyRef config's mllm_hidden_size "
                f"{config.mllm_hidden_size}"
            )
        self.aggregator = AggregationLayer(
            layers[-1], copy.deepcopy(language.norm), config.num_reference_tokens, hidden
        )
        self.gradient_checkpointing = False
        # images per vision-tower call (None: all at once; "auto": one at a time on a CPU, where it keeps one
        # image's activations alive instead of every reference's at the same speed at real widths
        # (benchmarks/RESULTS.md 1), all at once on a GPU until the GPU suite has measured it)
        self.vision_batch_size: int | str | None = "auto"
        # features of recently seen references, reused without gradients (`easyref.feature_cache`); capacity
        # 0 turns it off. 32 holds a whole group of the 28 references the model was trained with at most.
        self.vision_cache = FeatureCache(capacity=32)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        mllm: str | Path,
        config: EasyRefConfig | None = None,
        dtype: torch.dtype | None = None,
        weights: bool = True,
        **kwargs,
    ) -> ReferenceEncoder:
        """Load Qwen2-VL (local folder or hub id) through transformers and split it into trunk + aggregator.

        `weights=False`: build it without reading its weights, every parameter empty (on the meta device), for
        a checkpoint that holds them all (a finetuned trunk and the aggregation layer) to fill through
        `easyref.checkpoint.apply_checkpoint`; the stock weights would only be overwritten, and read and held
        next to the checkpoint's they would double the MLLM's memory while loading."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        dtype = kwargs.pop("torch_dtype", dtype)  # the older name, still common in user code
        model = None if weights else _empty_mllm(mllm, dtype, kwargs)
        model = model if model is not None else _load_mllm(mllm, dtype, kwargs)
        if config is None:
            config = EasyRefConfig(mllm=str(mllm), mllm_hidden_size=model.config.text_config.hidden_size)
        tokenizer = AutoTokenizer.from_pretrained(mllm)
        if tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer in {mllm} has no chat template (an -Instruct model is needed)")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(mllm)
        return cls(config, model, tokenizer, image_processor)

    # ----------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return self.aggregator.reference_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.aggregator.reference_tokens.device

    def trunk_modules(self) -> dict[str, nn.Module]:
        """The trunk's parts by name (`TRUNK_PARTS`: vision tower, embeddings, layers[:-1], norm)."""
        return {name: getattr(self, name) for name in TRUNK_PARTS}

    def trunk_parameters(self):
        for module in self.trunk_modules().values():
            yield from module.parameters()

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's tensors as checkpoints hold them (without their `trunk.` prefix)."""
        return {
            f"{name}.{key}": tensor
            for name, module in self.trunk_modules().items()
            for key, tensor in module.state_dict().items()
        }

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations in backward: the trunk's decoder layers here, vision blocks through
        transformers (the aggregation layer computes 64 rows only and keeps its activations)."""
        self.gradient_checkpointing = True
        self.visual.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False
        self.visual.gradient_checkpointing_disable()

    # ----------------------------------------------------------------- encoding
    def prepare(self, groups: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> MLLMInputs:
        if len(groups) != len(prompts):
            raise ValueError(f"got {len(groups)} reference groups but {len(prompts)} prompts")
        for i, group in enumerate(groups):
            if not 1 <= len(group) <= self.config.max_references:
                raise ValueError(
                    f"reference group {i} has {len(group)} images; 1 to {self.config.max_references} are allowed"
                )
        return prepare_inputs(groups, prompts, self.tokenizer, self.image_processor, self.config)

    def forward(
        self,
        groups: Sequence[Sequence[Image.Image]] | None = None,
        prompts: Sequence[str] | None = None,
        inputs: MLLMInputs | None = None,
        return_maps: bool = False,
    ):
        """(B groups of images, B prompts) or prepared inputs -> (B, num_reference_tokens, hidden);
        with `return_maps`, (tokens, maps) as `encode_with_maps` gives them."""
        inputs = inputs if inputs is not None else self.prepare(groups, prompts)
        return self.encode_with_maps(inputs) if return_maps else self.encode(inputs)

    def encode(self, inputs: MLLMInputs) -> torch.Tensor:
        return self._encode(inputs, with_maps=False)[0]

    def encode_with_maps(self, inputs: MLLMInputs) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """`encode`, plus per group and per reference where the reference tokens looked (`easyref.explain`):
        a (height, width) map on the reference's merged patch grid; a group's maps sum to 1."""
        return self._encode(inputs, with_maps=True)

    def _encode(self, inputs: MLLMInputs, with_maps: bool):
        inputs = inputs.to(self.device)
        hidden, positions = self.trunk(inputs)
        after_padding = inputs.padded_to is not None
        tokens = self.aggregate(hidden, inputs.attention_mask, positions, after_padding=after_padding)
        maps = None
        if with_maps:
            # a second pass of the one layer, eager so that it returns its weights: the tokens stay those
            # of the pass above, so asking for the maps never changes the images
            with capture_attention(self.aggregator.layers[-1]) as captured:
                self.aggregate(hidden, inputs.attention_mask, positions, after_padding=after_padding)
            merge = self.mllm_config.vision_config.spatial_merge_size
            rows = image_token_maps(
                captured[-1],
                inputs.input_ids,
                self.image_token_id,
                inputs.image_grid_thw,
                merge,
                self.config.num_reference_tokens,
            )
            maps = group_maps(rows, inputs.group_sizes)
        return self.config.mode.combine(tokens, inputs.group_sizes), maps

    def trunk(self, inputs: MLLMInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's normed output (rows, L, D) that the aggregation layer reads, and its positions.
        Rows are groups, or single references in the mean and concat modes."""
        inputs = inputs.to(self.device)
        return self.run_trunk(self.embed(inputs), inputs.attention_mask)

    def run_trunk(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's decoder layers and norm over embedded rows (`embed`) with their padding mask."""
        positions = _sequential_positions(mask)  # release quirk: plain 1-D positions, no M-RoPE grid
        hidden = self._run(self.layers, hidden, mask, positions, causal=True)
        return self.norm(hidden), positions

    def _vision(self, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The vision tower's merged features of every image, in order. Without gradients, images seen
        recently with the same weights come from `vision_cache` and only the others run."""
        pixels = pixels.to(self.visual.get_dtype())
        rows = list(pixels.split(grid.prod(-1).tolist()))  # each image's patch rows
        if self.vision_cache.capacity <= 0 or torch.is_grad_enabled():
            return torch.cat(self._tower(rows, grid, range(len(rows))))
        self.vision_cache.sync(self.visual)
        keys = [image_key(image_rows, image_grid) for image_rows, image_grid in zip(rows, grid)]
        found = {key: self.vision_cache.get(key) for key in keys}
        missing = {key: i for i, key in enumerate(keys) if found[key] is None}
        for key, features in zip(missing, self._tower(rows, grid, list(missing.values()))):
            found[key] = features
            self.vision_cache.put(key, features)
        return torch.cat([found[key] for key in keys])

    def _tower(self, rows: list[torch.Tensor], grid: torch.Tensor, images) -> list[torch.Tensor]:
        """Per image of `images` (indices), its merged features; `vision_batch_size` images per tower call
        (attention stays within each image either way, so the features are the same)."""
        images = list(images)
        step = self.vision_batch_size
        if step == "auto":  # measured on CPU only: there one call is no faster than one image at a time
            step = 1 if rows[0].device.type == "cpu" else None
        step = step or max(len(images), 1)
        merge = self.mllm_config.vision_config.spatial_merge_size
        features = []
        for first in range(0, len(images), step):
            chunk = images[first : first + step]
            out = self.visual(torch.cat([rows[i] for i in chunk]), grid_thw=grid[chunk]).pooler_output
            features += out.split([int(grid[i].prod()) // merge**2 for i in chunk])
        return features

    def embed(self, inputs: MLLMInputs) -> torch.Tensor:
        """Token embeddings with each image's visual features in place of its image tokens."""
        hidden = self.embed_tokens(inputs.input_ids)
        image_embeds = self._vision(inputs.pixel_values, inputs.image_grid_thw).to(hidden.dtype)
        image_mask = (inputs.input_ids == self.image_token_id).unsqueeze(-1)
        if image_mask.sum() != image_embeds.shape[0]:
            raise ValueError(
                f"{int(image_mask.sum())} image tokens in the prompt but {image_embeds.shape[0]} visual features"
            )
        return hidden.masked_scatter(image_mask, image_embeds)

    def aggregate(
        self, context: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, after_padding: bool = False
    ) -> torch.Tensor:
        """The aggregation layer: reference tokens appended to the trunk's output (`trunk`), read by the last
        decoder layer; returns their normed outputs (rows, num_reference_tokens, D).

        `after_padding`: the tokens take the positions after the whole padded context (L..L+n-1) rather than
        after each row's own tokens, as the release's stages 1-2 placed them (`MLLMInputs.padded_to`); they
        see the same context either way, its real tokens (the padding stays masked).

        Only the reference tokens' rows are computed: the context contributes its keys and values, and its
        own queries, attention outputs and MLP rows (discarded by the method) never run. That work grows with
        the number of references, so skipping it shrinks the per-reference cost; the outputs are those of the
        layer over [context ; tokens]."""
        batch, length, n = context.shape[0], context.shape[1], self.config.num_reference_tokens
        tokens = self.aggregator.reference_tokens.to(context.dtype).unsqueeze(0).expand(batch, -1, -1)
        token_positions = _reference_positions(mask, n, after_padding)
        cos, sin = self.rotary_emb(context, torch.cat([positions, token_positions], dim=1))
        layer = self.aggregator.layers[-1]
        context_kv = _ContextKeysValues(layer, context, cos[:, :length], sin[:, :length])
        causal = self.config.attention_mode == "official"  # release quirk: its non-causal flag was ignored
        hidden = layer(
            tokens,
            attention_mask=_token_rows_mask(mask, n, causal, context.dtype),
            position_embeddings=(cos[:, length:], sin[:, length:]),
            **{_kv_cache_keyword(type(layer)): context_kv},
        )
        return self.aggregator.norm(hidden)

    def _run(self, layers, hidden, mask, positions, causal: bool) -> torch.Tensor:
        position_embeddings = self.rotary_emb(hidden, positions)
        # rows without padding need no mask for causal attention under SDPA (its causal path, no (B, 1, L, L)
        # tensor); eager attention, which `explain` switches to in order to read the weights, needs it
        sdpa = all(layer.self_attn.config._attn_implementation == "sdpa" for layer in layers)
        unmasked = causal and sdpa and bool(mask.bool().all())
        attn_mask = None if unmasked else _attention_mask(mask, causal, hidden.dtype)
        for layer in layers:
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(
                    layer,
                    hidden,
                    attention_mask=attn_mask,
                    position_embeddings=position_embeddings,
                    use_reentrant=False,
                )
            else:
                hidden = layer(hidden, attention_mask=attn_mask, position_embeddings=position_embeddings)
        return hidden

    # ----------------------------------------------------------------- negative branch
    def encode_negative(self) -> torch.Tensor:
        """The classifier-free-guidance branch: a black image with the negative instruction -> (1, n, D)."""
        inputs = build_inputs(
            [[negative_image(self.config)]],
            [self.config.negative_instruction],
            self.tokenizer,
            self.image_processor,
            self.config,
        )
        return self(inputs=inputs)  # through forward, so offload hooks move the module first


def _load_mllm(mllm, dtype: torch.dtype | None, kwargs: dict):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(mllm, dtype=dtype, attn_implementation="sdpa", **kwargs)


def _empty_mllm(mllm, dtype: torch.dtype | None, kwargs: dict):
    """Qwen2-VL as `_load_mllm` builds it (same dtype, attention, eval mode, buffers), its parameters empty;
    None where no dtype is given and the config records none (transformers then takes the weights' own)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    mllm_config = AutoConfig.from_pretrained(mllm, trust_remote_code=kwargs.get("trust_remote_code", False))
    dtype = dtype or getattr(mllm_config, "dtype", None)  # transformers' "auto", its choice without a dtype
    if dtype is None:
        return None
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) computed
        model = Qwen2VLForConditionalGeneration._from_config(mllm_config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class _ContextKeysValues:
    """The context's keys and values for one decoder layer, handed to its attention the way transformers
    hands a KV cache: the attention's own keys and values (the reference tokens') are appended to them."""

    def __init__(self, layer: nn.Module, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        attn = layer.self_attn
        normed = layer.input_layernorm(context)
        shape = (*context.shape[:2], -1, attn.head_dim)
        keys = attn.k_proj(normed).view(shape).transpose(1, 2)
        self.values = attn.v_proj(normed).view(shape).transpose(1, 2)
        self.keys = apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)


@functools.cache
def _kv_cache_keyword(layer_class: type) -> str:
    """The keyword under which this transformers version's decoder layer takes its KV cache (renamed
    within transformers 5)."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


def _token_rows_mask(mask: torch.Tensor, n: int, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, n, L + n) mask for the n reference-token queries: every real context token, and the
    reference tokens up to their own (causal) or all of them."""
    batch = mask.shape[0]
    among_tokens = torch.ones(n, n, dtype=torch.bool, device=mask.device)
    among_tokens = among_tokens.tril() if causal else among_tokens
    allowed = torch.cat(
        [mask.bool()[:, None, None, :].expand(-1, 1, n, -1), among_tokens.expand(batch, 1, n, n)], dim=-1
    )
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _reference_positions(mask: torch.Tensor, n: int, after_padding: bool) -> torch.LongTensor:
    """(B, n) positions of the reference tokens: continuing each row's own sequence whatever its padding, or
    (the release's stages 1-2) after the padded length, where the release's plain 0..L+n-1 positions put them."""
    start = mask.shape[-1] if after_padding else mask.sum(-1, keepdim=True)
    offsets = torch.arange(n, device=mask.device)
    return (start + offsets).expand(mask.shape[0], -1)


def _sequential_positions(mask: torch.Tensor) -> torch.LongTensor:
    """0..n-1 over each row's real tokens (right padding gets positions past the end, never attended)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _attention_mask(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) padding mask -> additive (B, 1, L, L) mask; each query may always see itself (no empty rows)."""
    length = mask.shape[-1]
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=mask.device)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)
