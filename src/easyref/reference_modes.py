"""How a group of reference images becomes one set of reference tokens.

`joint` is EasyRef: the MLLM reads the whole group in one sequence, so what the references share can be
found by attending across them. `mean` and `concat` are the per-reference baselines of the paper's
comparison: each reference is read alone (with its group's prompt), then the token sets are averaged
(IP-Adapter style) or laid side by side. Every part of the package that depends on the mode asks the
mode object: the MLLM's rows (`prompting`), recombining rows into groups (`encoder`), the negative
branch and the expected shape of precomputed tokens (`pipeline`).

To add a mode, subclass `ReferenceMode` and register an instance in `REFERENCE_MODES`; the config,
the CLI's checks and the training YAML accept its name from then on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ReferenceMode:
    name: str = ""
    joint: bool = False  # one MLLM row per group (True) or per reference (False)

    def rows(self, groups: Sequence[Sequence], texts: Sequence[str]) -> tuple[list[list], list[str], list[int] | None]:
        """The MLLM's rows: each row's images and text, and the group sizes to recombine them (None: a row
        is a group already)."""
        if self.joint:
            return [list(group) for group in groups], list(texts), None
        singles = [[image] for group in groups for image in group]
        repeated = [text for group, text in zip(groups, texts) for _ in group]
        return singles, repeated, [len(group) for group in groups]

    def combine(self, tokens: torch.Tensor, group_sizes: list[int] | None) -> torch.Tensor:
        """Token sets of the rows (rows, T, D) -> one per group (B, T', D). `group_sizes` None: each row
        is a group already (always in joint mode; the negative branch's single image in any mode)."""
        return tokens if group_sizes is None else self._combine(tokens, group_sizes)

    def _combine(self, tokens: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        raise ValueError(f"reference mode {self.name!r} reads whole groups; it has no rows to combine")

    def tokens_per_group(self, group_size: int, num_tokens: int) -> int:
        return num_tokens

    def tile_negative(self, negative: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The negative branch's tokens (1, T, D), shaped like `tokens` (B, T', D)."""
        return negative.expand_as(tokens)

    def check_tokens_shape(self, shape: tuple, count: int, num_tokens: int, width: int) -> None:
        """Precomputed reference tokens must be (count, T', width) with a length this mode can produce."""
        if len(shape) != 3 or shape[0] != count or shape[2] != width or not self._valid_length(shape[1], num_tokens):
            raise ValueError(
                f"reference_embeds must have shape {self._expected(count, num_tokens, width)} (one row "
                f"per prompt), got {tuple(shape)}"
            )

    def _valid_length(self, length: int, num_tokens: int) -> bool:
        return length == num_tokens

    def _expected(self, count: int, num_tokens: int, width: int) -> tuple:
        return (count, num_tokens, width)


class JointMode(ReferenceMode):
    name, joint = "joint", True


class MeanMode(ReferenceMode):
    name = "mean"

    def _combine(self, tokens, group_sizes):
        import torch

        return torch.stack([part.mean(0) for part in tokens.split(group_sizes)])


class ConcatMode(ReferenceMode):
    """A batch of groups of unequal sizes repeats each smaller group's references cyclically up to the
    largest, since decoupled cross-attention has no mask for padding tokens."""

    name = "concat"

    def _combine(self, tokens, group_sizes):
        import torch

        longest = max(group_sizes)
        parts = tokens.split(group_sizes)
        return torch.stack(
            [part[torch.arange(longest, device=part.device) % len(part)].flatten(0, 1) for part in parts]
        )

    def tokens_per_group(self, group_size: int, num_tokens: int) -> int:
        return group_size * num_tokens

    def tile_negative(self, negative, tokens):
        # n black references' token sets side by side
        return negative.repeat(1, tokens.shape[1] // negative.shape[1], 1).expand_as(tokens)

    def _valid_length(self, length: int, num_tokens: int) -> bool:
        return length > 0 and length % num_tokens == 0

    def _expected(self, count: int, num_tokens: int, width: int) -> tuple:
        return (count, f"n x {num_tokens}", width)


REFERENCE_MODES: dict[str, ReferenceMode] = {mode.name: mode for mode in (JointMode(), MeanMode(), ConcatMode())}


def reference_mode(name: str) -> ReferenceMode:
    if name not in REFERENCE_MODES:
        raise ValueError(f"reference_mode must be one of {', '.join(REFERENCE_MODES)}, got {name!r}")
    return REFERENCE_MODES[name]
