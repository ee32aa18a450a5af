"""convit-ssl: ConViT vision transformers as VISSL trunks for self-supervised learning.

``import convit_ssl`` registers the ``convit_ssl`` trunk with VISSL (when VISSL is installed) and
exposes the public API below. The model itself (``convit_ssl.models``) is plain PyTorch.
"""
import importlib.util

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

if importlib.util.find_spec("vissl") is not None:  # the model and checkpoint tools work without VISSL
    from convit_ssl import vissl_glue

    vissl_glue.setup()
