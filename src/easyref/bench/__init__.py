"""MRBench for real models: manifests of reference groups, generation methods, CLIP/DINO metrics, runs.

The defaults live here, free of torch, so that building the `easyref` parser stays instant.
"""

METHOD_NAMES = ("easyref", "ip-adapter-mean", "ip-adapter-concat", "sdxl")

# the paper's "IP-Adapter-SDXL" baseline (ViT-bigG image encoder, 4 image-prompt tokens per image)
DEFAULT_IP_ADAPTER = "h94/IP-Adapter"
DEFAULT_IP_ADAPTER_SUBFOLDER = "sdxl_models"
DEFAULT_IP_ADAPTER_WEIGHTS = "ip-adapter_sdxl.safetensors"
DEFAULT_IMAGE_ENCODER_FOLDER = "image_encoder"

# CLIP-I / CLIP-T with CLIP ViT-L/14 as IP-Adapter reports them; DINO-I with DINO ViT-S/16 as DreamBooth defined it
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
