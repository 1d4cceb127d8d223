"""Self-describing EasyRef checkpoints: `easyref_config.json` + `easyref.safetensors`.

Tensor groups (prefixes): `aggregator.*` (reference tokens, last decoder layer, norm), `unet.*`
(per cross-attention `to_k_ip`/`to_v_ip`, `encoder_hid_proj.*` projection, `lora.*` UNet LoRA),
and, when `config.has_trunk`, `trunk.*` (a finetuned MLLM trunk). The config alone says which groups
exist and their shapes come from the modules it rebuilds; nothing is inferred from key names.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .config import CONFIG_NAME, EasyRefConfig
from .parameter_groups import CHECKPOINT_PREFIXES
from .safe_io import JSONFileError

if TYPE_CHECKING:
    import torch

# torch, safetensors and the adapter (diffusers) are imported where tensors are handled, so that the
# names, the config and CheckpointError serve the CLI's up-front checks without loading them.

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "easyref.safetensors"
FORMAT_TAG = "easyref"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (message names the culprit)."""


def state_dict_for_checkpoint(config: EasyRefConfig, encoder, unet) -> dict[str, torch.Tensor]:
    from .adapter import adapter_state_dict

    tensors = {f"aggregator.{k}": v for k, v in encoder.aggregator.state_dict().items()}
    tensors.update({f"unet.{k}": v for k, v in adapter_state_dict(unet).items()})
    if config.has_trunk:
        tensors.update({f"trunk.{k}": v for k, v in encoder.trunk_state_dict().items()})
    return tensors


def save_checkpoint(directory: str | Path, config: EasyRefConfig, encoder, unet) -> Path:
    """Write config + weights atomically (temporary names, then rename), so no half checkpoint is left."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict_for_checkpoint(config, encoder, unet).items()}
    write_checkpoint(directory, config, tensors)
    return directory


def write_checkpoint(directory: Path, config: EasyRefConfig, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    weights_tmp = _temp_path(directory, WEIGHTS_NAME)
    config_tmp = _temp_path(directory, CONFIG_NAME)
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": FORMAT_TAG, "version": str(config.version)})
        config_tmp.write_text(config.to_json())
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    finally:
        for leftover in (weights_tmp, config_tmp):
            leftover.unlink(missing_ok=True)


def _temp_path(directory: Path, name: str) -> Path:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(path)


def is_easyref_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read_own_checkpoint(path: str | Path) -> tuple[EasyRefConfig, dict[str, torch.Tensor]]:
    """Our checkpoint folder's config and tensors (`release.read_checkpoint` reads the release's format too)."""
    path = Path(path)
    return read_config(path), _load_safetensors(path / WEIGHTS_NAME)


def read_config(path: str | Path) -> EasyRefConfig:
    """The config of our checkpoint folder alone (no tensors read); every problem is one CheckpointError."""
    path = Path(path)
    try:
        return EasyRefConfig.load(path)
    except JSONFileError as err:  # already names the file
        raise CheckpointError(str(err)) from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: {err}") from None


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """A NaN or Inf in any weight turns every image black: refuse it at load, naming the tensor."""
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {key} holds NaN or Inf values; the checkpoint is damaged")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for damaged files
        raise CheckpointError(f"cannot read {path}: {err}") from None


def split_groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in CHECKPOINT_PREFIXES}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix not in groups:
            raise CheckpointError(f"unexpected tensor {key} (known groups: {', '.join(CHECKPOINT_PREFIXES)})")
        groups[prefix][rest] = tensor
    return groups


def apply_checkpoint(config: EasyRefConfig, tensors: dict[str, torch.Tensor], encoder, unet) -> None:
    """Load checkpoint tensors into an encoder and an adapted UNet; any mismatch is a one-line error."""
    from .adapter import load_adapter_state_dict

    groups = split_groups(tensors)
    if groups["trunk"] and not config.has_trunk:
        raise CheckpointError("checkpoint has trunk.* tensors but its config says has_trunk=false")
    try:
        _load_strict(encoder.aggregator, groups["aggregator"], "aggregator")
        if config.has_trunk:
            _load_trunk(encoder, groups["trunk"])
        load_adapter_state_dict(unet, groups["unet"])
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    from .adapter import _check_keys

    current = module.state_dict()
    _check_keys(current, tensors, what)
    module.load_state_dict({k: v.to(current[k].dtype) for k, v in tensors.items()}, strict=True)


def _load_trunk(encoder, tensors: dict[str, torch.Tensor]) -> None:
    import torch

    from .adapter import _check_keys

    expected = encoder.trunk_state_dict()
    _check_keys(expected, tensors, "trunk")
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)
