"""Pure PyTorch models (no VISSL import): usable as plain ``nn.Module``s; ``eval_mode`` for code that runs them."""
from convit_ssl.models.convit import PRESETS, ConViT, create_trunk, preset_kwargs

__all__ = ["PRESETS", "ConViT", "create_trunk", "preset_kwargs"]
