"""The ConViT keyword arguments a VISSL ``MODEL`` config describes (no VISSL import: checkpoints use it too).

Building the trunk from a VISSL config (``MODEL`` section):

* ``MODEL.TRUNK.CONVIT_SSL.PRESET`` set (e.g. ``convit_small``): the preset defines the model and
  ``MODEL.TRUNK.CONVIT_SSL.OVERRIDES`` (our keyword names, e.g. ``{local_up_to_layer: 0}``) change
  fields of it; the ``VISION_TRANSFORMERS`` and ``CONVIT`` sections are not read.
* No preset: the model is what VISSL's standard ``VISION_TRANSFORMERS`` and ``CONVIT`` sections
  describe (table ``VISSL_KEYS``), then ``OVERRIDES`` apply. Any VISSL ConViT config runs with
  ``NAME: convit`` changed to ``NAME: convit_ssl``. ``CONVIT.LOCALITY_DIM`` belongs to VISSL's own
  positional parametrisation and is ignored (ours is the paper's 3-dimensional one, which loads the
  official weights); ``VISION_TRANSFORMERS.QK_SCALE`` must be unset (the paper uses 1/sqrt(D)).
* ``MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING`` turns on gradient checkpointing.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from convit_ssl.errors import UsageError
from convit_ssl.models.convit import mlp_ratio_of, preset_kwargs

# VISSL section -> (VISSL key, our keyword). MLP_DIM becomes the mlp_ratio of MLP_DIM / HIDDEN_DIM.
VISSL_KEYS = {
    "VISION_TRANSFORMERS": {
        "IMAGE_SIZE": "img_size",
        "PATCH_SIZE": "patch_size",
        "NUM_LAYERS": "depth",
        "NUM_HEADS": "num_heads",
        "HIDDEN_DIM": "embed_dim",
        "DROPOUT_RATE": "drop_rate",
        "ATTENTION_DROPOUT_RATE": "attn_drop_rate",
        "DROP_PATH_RATE": "drop_path_rate",
        "QKV_BIAS": "qkv_bias",
    },
    "CONVIT": {
        "N_GPSA_LAYERS": "local_up_to_layer",
        "LOCALITY_STRENGTH": "locality_strength",
        "USE_LOCAL_INIT": "use_local_init",
    },
}


def trunk_kwargs(model_config: Mapping[str, Any]) -> Dict[str, Any]:
    """ConViT keyword arguments for a VISSL ``MODEL`` config (see the module docstring)."""
    trunk = model_config["TRUNK"]
    ours = dict(trunk.get("CONVIT_SSL", None) or {})
    overrides = dict(ours.get("OVERRIDES", None) or {})
    checkpointing = model_config.get("ACTIVATION_CHECKPOINTING", None) or {}
    if checkpointing.get("USE_ACTIVATION_CHECKPOINTING", False):
        overrides.setdefault("grad_checkpointing", True)
    preset = ours.get("PRESET", None)
    if preset:
        return preset_kwargs(preset, **overrides)
    vit, convit = trunk["VISION_TRANSFORMERS"], trunk.get("CONVIT", None) or {}
    if vit.get("QK_SCALE", False):
        raise UsageError("MODEL.TRUNK.VISION_TRANSFORMERS.QK_SCALE is not supported: ConViT scales by 1/sqrt(D); "
                         "set it to False")
    if convit.get("CLASS_TOKEN_IN_LOCAL_LAYERS", False):
        raise UsageError("MODEL.TRUNK.CONVIT.CLASS_TOKEN_IN_LOCAL_LAYERS=True is not supported: the class token "
                         "joins after the last GPSA block as in the paper; set it to False")
    classifier = vit.get("CLASSIFIER", "token")
    if classifier not in (None, "token"):
        raise UsageError(f"MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER={classifier!r} is not supported: use 'token' "
                         f"and pick pooled features with out_feat_keys (lastPOOL)")
    kwargs: Dict[str, Any] = {}
    for section, values in (("VISION_TRANSFORMERS", vit), ("CONVIT", convit)):
        for vissl_key, our_key in VISSL_KEYS[section].items():
            if values.get(vissl_key, None) is not None:
                kwargs[our_key] = values[vissl_key]
    if vit.get("MLP_DIM", None):
        kwargs["mlp_ratio"] = mlp_ratio_of(vit["MLP_DIM"], vit["HIDDEN_DIM"])
    # A generic VISSL config has no preset: start from the paper's layout and apply every key.
    return preset_kwargs("convit_tiny", **{**kwargs, **overrides})
