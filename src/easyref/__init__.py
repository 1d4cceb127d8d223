"""EasyRef: group image reference for SDXL through a multimodal LLM (Zong et al., ICML 2025)."""

from __future__ import annotations

import importlib

# Public names load on first use, so `easyref --help` and data-loader workers do not import
# diffusers and transformers just to start.
_EXPORTS = {
    "EasyRefConfig": ".config",
    "EasyRefPipeline": ".pipeline",
    "EasyRefPipelineOutput": ".pipeline",
    "ReferenceEncoder": ".encoder",
    "install_adapter": ".adapter",
    "set_scale": ".adapter",
    "unload_adapter": ".adapter",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'easyref' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
