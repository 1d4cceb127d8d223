"""`FeatureCache`: the vision tower's features of recently seen reference images.

The vision tower reads each reference on its own, so its output depends only on the image's pixels and
the tower's weights, never on the prompt or the other references. It is most of the per-reference cost
of encoding a group (at Qwen2-VL-2B size a 32-layer tower over 576 patches per image), and people keep a
group while they try prompts and seeds. Entries are keyed by the digest of the preprocessed pixels and
grid, and dropped whole when any weight of the tower changes in place or is replaced.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn


def image_key(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
    """Digest of one image's preprocessed patch rows and its (t, h, w) grid."""
    # sha256: collision-resistant and, with the CPU's SHA instructions, about twice blake2b's speed here
    digest = hashlib.sha256(str((tuple(grid.tolist()), tuple(pixels.shape), str(pixels.dtype))).encode())
    digest.update(pixels.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy
    return digest.digest()


def weights_state(module: nn.Module) -> tuple:
    """Changes whenever a parameter is updated in place (optimizer step, `load_state_dict`) or replaced
    (moved, cast, reassigned)."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


class FeatureCache:
    """At most `capacity` images' features, least recently used dropped first; capacity 0 keeps none."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._state: tuple | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def sync(self, module: nn.Module) -> None:
        """Forget every entry if `module`'s weights are not the ones the entries were computed with."""
        state = weights_state(module)
        if state != self._state:
            self._entries.clear()
            self._state = state

    def get(self, key: bytes) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: bytes, features: torch.Tensor) -> None:
        self._entries[key] = features.detach()
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
