"""convit-ssl: ConViT vision transformers as VISSL trunks for self-supervised learning.

``import convit_ssl`` exposes the public API below and leaves VISSL alone: ``convit_ssl.vissl_glue`` sets VISSL
up where it is used (``convit_ssl.engine`` imports it). The model itself (``convit_ssl.models``) is plain PyTorch.
"""
from convit_ssl.checkpoint import (
    CheckpointError,
    LoadReport,
    from_timm_state_dict,
    load_trunk,
    to_timm_state_dict,
)
from convit_ssl.models import PRESETS, ConViT, create_trunk

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "CheckpointError", "ConViT", "LoadReport", "create_trunk", "from_timm_state_dict", "load_trunk",
    "to_timm_state_dict",
]
