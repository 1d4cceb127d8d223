"""EasyRef: group image reference for SDXL through a multimodal LLM (Zong et al., ICML 2025)."""

from .adapter import install_adapter, set_scale, unload_adapter
from .config import EasyRefConfig
from .encoder import ReferenceEncoder
from .pipeline import EasyRefPipeline, EasyRefPipelineOutput

__all__ = [
    "EasyRefConfig",
    "EasyRefPipeline",
    "EasyRefPipelineOutput",
    "ReferenceEncoder",
    "install_adapter",
    "set_scale",
    "unload_adapter",
]
__version__ = "0.1.0"
