"""An EasyRef model's parameters in named groups: the one map from which each training stage's
trainable parameters, the modules held in low precision while frozen, and a checkpoint's tensor
groups all follow.

| group | what | trained from stage | checkpoint prefix |
|---|---|---|---|
| aggregator | reference tokens, the last decoder layer, its norm | 1 | `aggregator.` |
| reference_attention | k/v of the UNet's decoupled cross-attention | 1 | `unet.` |
| projection | MLLM width -> UNet cross-attention width | 1 | `unet.` |
| trunk | the MLLM's vision tower, embeddings, other decoder layers, norm | 2 | `trunk.` (if `has_trunk`) |
| lora | the UNet's LoRA (if `lora_rank`) | 2 | `unet.` |

Stages follow the paper's recipe: stage 1 (alignment pretraining) trains the new parts only, stages 2-3
(instruction tuning) also the MLLM trunk and the UNet LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParameterGroup:
    name: str
    first_stage: int
    checkpoint_prefix: str


GROUPS = (
    ParameterGroup("aggregator", 1, "aggregator"),
    ParameterGroup("reference_attention", 1, "unet"),
    ParameterGroup("projection", 1, "unet"),
    ParameterGroup("trunk", 2, "trunk"),
    ParameterGroup("lora", 2, "unet"),
)
CHECKPOINT_PREFIXES = tuple(dict.fromkeys(group.checkpoint_prefix for group in GROUPS))


def named_parameters(group: str, encoder, unet) -> list[tuple[str, object]]:
    """A group's parameters, named from the model that holds them (`encoder.*`, `unet.*`)."""
    if group == "aggregator":
        return [(f"encoder.aggregator.{n}", p) for n, p in encoder.aggregator.named_parameters()]
    if group == "trunk":
        return [
            (f"encoder.{part}.{n}", p)
            for part, module in encoder.trunk_modules().items()
            for n, p in module.named_parameters()
        ]
    from .adapter import adapter_named_parameters  # diffusers: imported only where parameters are handled

    return [(f"unet.{n}", p) for n, p in adapter_named_parameters(unet)[group]]


def trained_groups(stage: int) -> list[str]:
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    return [group.name for group in GROUPS if group.first_stage <= stage]


def trainable_parameters(encoder, unet, stage: int) -> list[tuple[str, object]]:
    """What `stage` trains, group by group in the table's order."""
    return [named for group in trained_groups(stage) for named in named_parameters(group, encoder, unet)]


def frozen_encoder_modules(encoder, stage: int) -> list:
    """The encoder's modules that `stage` leaves wholly frozen (the trunk in stage 1)."""
    return [] if "trunk" in trained_groups(stage) else list(encoder.trunk_modules().values())
