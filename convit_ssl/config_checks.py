"""Checks of a composed training config that fail in one line before anything starts or is submitted.

``convit_ssl.engine.compose`` runs them (the one path of ``convit-ssl train``, ``--print-config`` and the
launcher, ``--dry-run`` included):

* ``check_override_types``: every ``config.KEY=VALUE`` keeps the type its key has in VISSL's defaults or
  the recipe (``num_epochs=abc`` is refused here, not 23 s later on the nodes).
* ``check_trunk_overrides``: every ``trunk.FIELD=VALUE`` has the type of ConViT's keyword ``FIELD``.
* ``check_no_dropped_overrides``: an override that VISSL's inference replaces (``LOSS.dino_loss.output_dim``
  comes from the head) or that has no effect on this device (AMP on a CPU) is refused, never dropped.
* ``check_head_consistency``: the losses' embedding widths that VISSL does not derive match the head.
* ``check_pooled_features``: a linear probe's features (``LINEAR_EVAL_FEAT_POOL_OPS_MAP``) are ones the trunk
  gives, not pooled again.
* ``check_weights_layout``, ``check_trunk_weights``: ``MODEL.WEIGHTS_INIT.PARAMS_FILE`` is read as a VISSL
  checkpoint, and its trunk has the model's tensors, name for name and shape for shape (VISSL leaves a tensor it
  does not find at random init, saying so only in its log).
* ``check_head_weights``: the head tensors VISSL copies from ``MODEL.WEIGHTS_INIT.PARAMS_FILE`` have the model's
  shapes (an SSL projection head cannot start a classifier: ``SKIP_LAYERS=[heads]``).
* ``check_file_lists``: no data or label list is a pickle (VISSL unpickles ``.pkl`` lists, running what they hold).
* ``check_amounts``: epochs, batch sizes and learning rates are positive; one batch fits the dataset; a
  multistep schedule's milestones fit the epochs (``check_schedules``).

No VISSL import: the configs are plain mappings (VISSL's AttrDict, or containers from OmegaConf).
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from convit_ssl.errors import UsageError

_MISSING = object()
TRUNK_OVERRIDES = "config.MODEL.TRUNK.CONVIT_SSL.OVERRIDES."  # where ``trunk.FIELD=VALUE`` goes


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, Mapping) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _config_overrides(overrides: Sequence[str]) -> List[tuple]:
    """``(dotted key under config, value text)`` of each ``config.KEY=VALUE`` Hydra override (``+``/``++`` too),
    the last one for a key given twice; ``trunk.FIELD`` words are checked as ConViT's keywords instead."""
    found = {}
    for override in overrides:
        if override.startswith("~"):
            continue
        key, _, text = override.lstrip("+").partition("=")
        if key.startswith("config.") and not key.startswith(TRUNK_OVERRIDES):
            found[key[len("config."):]] = text
    return list(found.items())


# ---------------------------------------------------------------------------------------------- types
@lru_cache(maxsize=1)
def vissl_defaults() -> Dict[str, Any]:
    """The ``config`` section of VISSL's defaults.yaml, as plain values."""
    import yaml

    path = Path(importlib.util.find_spec("vissl").submodule_search_locations[0]) / "config" / "defaults.yaml"
    return yaml.safe_load(path.read_text())["config"]


def _kind(value: Any) -> str:
    """What a config value is for the type check: bool, int, float, str, dict, list or null."""
    if value is None:
        return "null"
    for kind, kind_type in (("bool", bool), ("int", int), ("float", float), ("str", str), ("dict", Mapping)):
        if isinstance(value, kind_type):
            return kind
    return "list"


def _fits(value: Any, reference: Any) -> bool:
    """Whether ``value`` can stand where the config has ``reference`` (an int where a float is: yes)."""
    want, have = _kind(reference), _kind(value)
    if not (want == "null" or want == have or (want == "float" and have == "int")):
        return False
    if want == "list" and reference and len({_kind(item) for item in reference}) == 1:
        return all(_fits(item, reference[0]) for item in value)
    return True


def check_override_types(composed: Mapping, overrides: Sequence[str], references: Sequence[Mapping]) -> None:
    """Each ``config.KEY=VALUE`` of ``overrides`` keeps the type its key has in one of ``references`` (VISSL's
    defaults, the recipe composed without the overrides); ``composed`` is the composed ``config`` section.
    Keys that no reference defines are not checked."""
    for key, text in _config_overrides(overrides):
        value = _lookup(composed, key)
        expected = [ref for ref in (_lookup(tree, key) for tree in references) if ref is not _MISSING]
        if value is _MISSING or not expected or any(_fits(value, ref) for ref in expected):
            continue
        kinds = " or ".join(sorted({_kind(ref) for ref in expected}))
        raise UsageError(f"config.{key}={text}: expected {kinds}, got {_kind(value)} {value!r}; give a value of "
                         f"that type")


def _fits_hint(value: Any, hint: Any) -> bool:
    """Whether ``value`` matches the annotation ``hint`` of a ConViT keyword (int, float, bool, Sequence[int], unions)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits_hint(value, arg) for arg in typing.get_args(hint))
    if origin is not None and issubclass(origin, Sequence):
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_fits_hint(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def check_trunk_overrides(overrides: Mapping[str, Any]) -> None:
    """Each ``trunk.FIELD=VALUE`` has the type of ConViT's keyword ``FIELD`` (unknown fields: see preset_kwargs)."""
    from convit_ssl.models.convit import ConViT

    hints = typing.get_type_hints(ConViT.__init__)
    defaults = inspect.signature(ConViT.__init__).parameters
    for field, value in overrides.items():
        if field in hints and not _fits_hint(value, hints[field]):
            hint = defaults[field].annotation  # the annotation as written
            raise UsageError(f"trunk.{field}={value!r}: ConViT's {field} is {hint} (default "
                             f"{defaults[field].default!r}); give a value of that type")


# ---------------------------------------------------------------------------------------------- effect
# Overrides whose value VISSL rewrites yet keeps the user's intent: learning rates scaled by the batch, a
# queue length rounded to a multiple of the global batch.
_REWRITTEN_WITH_EFFECT = ("OPTIMIZER.param_schedulers.", "LOSS.swav_loss.queue.queue_length",
                          "LOSS.swav_momentum_loss.queue.queue_length")
# Where VISSL takes the settings it replaces from, for the message.
_SOURCES = {"output_dim": "the head's num_clusters (MODEL.HEAD.PARAMS)",
            "num_prototypes": "the head's num_clusters (MODEL.HEAD.PARAMS)",
            "embedding_dim": "the head's last dims entry (MODEL.HEAD.PARAMS)",
            "num_crops": "the transforms' total_num_crops (DATA.TRAIN.TRANSFORMS)",
            "world_size": "DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE",
            "effective_batch_size": "DATA.TRAIN.BATCHSIZE_PER_REPLICA and the world size"}


def check_no_dropped_overrides(given: Mapping, final: Mapping, overrides: Sequence[str], device: str) -> None:
    """Refuse a ``config.KEY=VALUE`` that does not survive into the config VISSL trains with.

    ``given`` is the config as composed, ``final`` after device resolution and VISSL's inference. A setting
    turned off on a CPU (AMP, LARC, SyncBN) is refused there; any other key whose value changed was replaced
    (``LOSS.dino_loss.output_dim`` comes from the head). ``auto`` values and the learning-rate schedule (scaled
    with the batch) are not compared.
    """
    for key, text in _config_overrides(overrides):
        before, after = _lookup(given, key), _lookup(final, key)
        if key in _GPU_ONLY:
            if device == "cpu" and before not in (False, None, _MISSING):
                raise UsageError(f"config.{key}={text} has no effect on a CPU ({_GPU_ONLY[key]}); remove it, or "
                                 f"run on GPUs")
            continue
        if before is _MISSING or before == after or before == "auto" or key.startswith(_REWRITTEN_WITH_EFFECT):
            continue
        if after is _MISSING:
            raise UsageError(f"config.{key}={text} has no effect: VISSL drops it; remove it")
        source = _SOURCES.get(key.rsplit(".", 1)[-1], "other settings")
        raise UsageError(f"config.{key}={text} has no effect: VISSL sets it to {after!r} from {source}; change that "
                         f"instead, or remove the override")


# Settings that ``engine.resolve_device`` turns off on a CPU, and why.
_GPU_ONLY = {"MODEL.AMP_PARAMS.USE_AMP": "no mixed precision there",
             "OPTIMIZER.use_larc": "LARC needs apex, which is CUDA-only",
             "MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN": "synchronised batch norm needs CUDA"}


def _head_output_dim(head_params: Sequence) -> Any:
    """The width of what the head hands the loss: the last ``dims`` of its last MLP (a SwAV head's embedding)."""
    if not head_params:
        return None
    name, options = head_params[-1][0], head_params[-1][1]
    dims = options.get("dims") if isinstance(options, Mapping) else None
    return dims[-1] if name in ("mlp", "swav_head") and dims else None


# Loss settings that VISSL reads as they are and that must equal the head's output width.
_HEAD_WIDTH_KEYS = ("moco_loss.embedding_dim", "simclr_info_nce_loss.buffer_params.embedding_dim",
                    "barlow_twins_loss.embedding_dim")


def check_head_consistency(config: Mapping) -> None:
    """The loss's embedding width (MoCo, SimCLR, Barlow Twins; VISSL does not derive these) equals the head's."""
    loss = config["LOSS"]["name"]
    width = _head_output_dim(config["MODEL"]["HEAD"]["PARAMS"])
    for key in _HEAD_WIDTH_KEYS:
        if not key.startswith(loss + ".") or width is None:
            continue
        value = _lookup(config["LOSS"], key)
        if value is not _MISSING and value != width:
            raise UsageError(f"LOSS.{key}={value} but the head (MODEL.HEAD.PARAMS) outputs {width} dims: set "
                             f"config.LOSS.{key}={width}, or change the head")


def heads_loaded_from_weights(model: Mapping) -> bool:
    """Whether VISSL starts the heads from ``MODEL.WEIGHTS_INIT.PARAMS_FILE``: a VISSL checkpoint
    (``classy_state_dict``), outside feature evaluation or evaluating trunk and head (its rule in
    ``init_model_from_consolidated_weights``)."""
    evaluation = model["FEATURE_EVAL_SETTINGS"]
    return weights_file_loaded(model) and (not evaluation["EVAL_MODE_ON"] or evaluation["EVAL_TRUNK_AND_HEAD"])


def weights_file_loaded(model: Mapping) -> bool:
    """Whether VISSL starts the model from ``MODEL.WEIGHTS_INIT.PARAMS_FILE`` read as a VISSL checkpoint
    (``STATE_DICT_KEY_NAME: classy_state_dict``, VISSL's default)."""
    weights = model["WEIGHTS_INIT"]
    return bool(weights.get("PARAMS_FILE")) and weights.get("STATE_DICT_KEY_NAME") == "classy_state_dict"


def check_file_lists(data: Mapping) -> None:
    """No ``DATA.TRAIN`` or ``DATA.TEST`` data or label path is a pickle: VISSL's ``load_file`` reads ``.pkl`` and
    ``.pickle`` lists with ``pickle.load``, which runs any code the file holds (``.npy`` lists load without it)."""
    for split in ("TRAIN", "TEST"):
        for key in ("DATA_PATHS", "LABEL_PATHS"):
            for path in (data.get(split) or {}).get(key) or []:
                if Path(str(path)).suffix in (".pkl", ".pickle"):
                    raise UsageError(f"config.DATA.{split}.{key} names {path}, a pickle: VISSL would unpickle it, "
                                     f"which runs any code the file holds; save the list with numpy.save as .npy "
                                     f"and pass that")


def check_pooled_features(pool_ops_map: Sequence, parse_feature_key) -> None:
    """Each feature of VISSL's ``FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP`` ([[name, [op, args]], ...])
    is one the trunk gives (``parse_feature_key``: the trunk's, raising UsageError otherwise), and is not pooled
    again: the trunk's features are (B, C) vectors, which VISSL's 2-d pooling ops refuse."""
    where = "config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP"
    for name, (operation, _) in pool_ops_map:
        try:
            parse_feature_key(name)
        except UsageError as error:
            raise UsageError(f"{where}: {error}") from None
        if operation != "Identity":
            raise UsageError(f"{where}: {name} is pooled with {operation}, but the trunk's features are already "
                             f"vectors, (batch, width): use [{name}, [Identity, []]]")


def check_weights_layout(model: Mapping) -> None:
    """ConViT's trunk loads ``MODEL.WEIGHTS_INIT.PARAMS_FILE`` only as a VISSL checkpoint: VISSL reads other layouts
    (``STATE_DICT_KEY_NAME``, ``APPEND_PREFIX``) only into trunks whose tensors sit under ``_feature_blocks``."""
    weights = model["WEIGHTS_INIT"]
    key = weights.get("STATE_DICT_KEY_NAME")
    if weights.get("PARAMS_FILE") and key != "classy_state_dict":
        raise UsageError(f"config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME={key!r}: VISSL reads a PARAMS_FILE in a "
                         f"layout other than classy_state_dict only into trunks whose tensors sit under "
                         f"_feature_blocks, and ConViT's do not (its trunk would stay at random init, or VISSL would "
                         f"refuse the file on the node): pass a VISSL checkpoint with "
                         f"STATE_DICT_KEY_NAME=classy_state_dict, or start from this file with `convit-ssl finetune "
                         f"--checkpoint {weights['PARAMS_FILE']}`, which also reads timm and official ConViT files")


def check_trunk_weights(model: Mapping, model_trunk: Mapping[str, tuple], checkpoint_trunk: Mapping[str, tuple],
                        trunk_prefix: str, trunk_kwargs: Mapping[str, Any]) -> None:
    """The checkpoint's trunk has every tensor of the model's trunk that VISSL copies (those not in
    ``WEIGHTS_INIT.SKIP_LAYERS``) in the model's shape, and no other; ``model_trunk`` / ``checkpoint_trunk``:
    ``{name: shape}`` in the trunk (``blocks.0.attn.qk.weight``), which the model holds as ``trunk_prefix + name``
    (VISSL's skip rule reads that name); ``trunk_kwargs``: the model's ConViT keywords."""
    from convit_ssl.checkpoint import describe_misfit

    path = model["WEIGHTS_INIT"]["PARAMS_FILE"]
    if not checkpoint_trunk:
        raise UsageError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {path} is not a VISSL checkpoint (no "
                         f"classy_state_dict/base_model/model/trunk tensors inside): pass a VISSL run's checkpoint, or "
                         f"start from this file with `convit-ssl finetune --checkpoint {path}`, which also reads timm "
                         f"and official ConViT files")
    skipped = list(model["WEIGHTS_INIT"].get("SKIP_LAYERS", []))
    copied = {name: shape for name, shape in model_trunk.items()
              if not any(item in trunk_prefix + name for item in skipped)}
    offered = {name: shape for name, shape in checkpoint_trunk.items() if name in copied or name not in model_trunk}
    misfit = describe_misfit(copied, offered)
    if not misfit:
        return
    fix = "check the trunk (model=PRESET, trunk.FIELD=VALUE, config.MODEL.TRUNK) against the checkpoint's"
    positions = checkpoint_trunk.get("pos_embedding", (0, 0))[1] - int(trunk_kwargs.get("pos_embed_class_token", False))
    side = math.isqrt(max(positions, 0))
    differing = [name for name in {*copied, *offered} if copied.get(name) != offered.get(name)]
    if differing == ["pos_embedding"] and side * side == positions:
        fix = (f"its position embedding is for a {side} x {side} patch grid: build the trunk at that grid with "
               f"trunk.img_size={side * trunk_kwargs['patch_size']} (it takes crops of any size, resampling the "
               f"positions)")
    raise UsageError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {path} does not fit the trunk ({misfit}); {fix}")


def check_head_weights(model: Mapping, model_heads: Mapping[str, tuple], checkpoint_heads: Mapping[str, tuple]) -> None:
    """Each head tensor that VISSL copies from the checkpoint (same name, not in ``WEIGHTS_INIT.SKIP_LAYERS``) has
    the model's shape; ``model_heads`` / ``checkpoint_heads``: ``{name: shape}`` (``heads.0.clf.0.weight``)."""
    skipped = list(model["WEIGHTS_INIT"].get("SKIP_LAYERS", []))
    for name, shape in model_heads.items():
        if any(item in name for item in skipped) or checkpoint_heads.get(name, shape) == shape:
            continue
        raise UsageError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {model['WEIGHTS_INIT']['PARAMS_FILE']}: its {name} "
                         f"is {list(checkpoint_heads[name])} but the model's (MODEL.HEAD.PARAMS) is {list(shape)}; "
                         f"start the heads from random init with config.MODEL.WEIGHTS_INIT.SKIP_LAYERS="
                         f"[{','.join([*skipped, 'heads'])}]")


# ---------------------------------------------------------------------------------------------- amounts
# The keys that hold a learning rate in each of VISSL's schedules (the others carry VISSL's unused defaults).
_SCHEDULE_VALUES = {"cosine": ("start_value", "end_value"), "linear": ("start_value", "end_value"),
                    "constant": ("value",), "inverse_sqrt": ("start_value",), "step_with_fixed_gamma": ("base_value",),
                    "multistep": ("values",), "step": ("values",)}


def _learning_rates(schedule: Mapping, path: str) -> Dict[str, float]:
    """``{dotted path: value}`` of every learning rate a VISSL schedule (``param_schedulers.lr``) uses, after
    VISSL's scaling; a composite schedule's parts included."""
    if schedule.get("name") == "composite":
        rates: Dict[str, float] = {}
        for index, part in enumerate(schedule.get("schedulers", [])):
            rates.update(_learning_rates(part, f"{path}.schedulers.{index}"))
        return rates
    rates = {}
    for key in _SCHEDULE_VALUES.get(schedule.get("name"), ()):
        value = schedule.get(key)
        for index, rate in enumerate(value if isinstance(value, list) else [value]):
            if _kind(rate) in ("int", "float"):
                rates[f"{path}.{key}" + (f".{index}" if isinstance(value, list) else "")] = rate
    return rates


def _check_multistep(schedule: Mapping, epochs: int, where: str) -> None:
    """What classy-vision's MultiStepParamScheduler refuses (built with num_updates = ``epochs``): one milestone
    fewer than values, rising from above 0 to below ``epochs``; without milestones, at least one epoch per value."""
    values, milestones = schedule.get("values"), schedule.get("milestones")
    if not isinstance(values, list) or not isinstance(milestones, (list, type(None))):
        return  # a wrong type is check_override_types' to name
    place = f"OPTIMIZER.param_schedulers.{where}"
    if milestones is None:
        if epochs < len(values):
            raise UsageError(f"{place} has {len(values)} values but OPTIMIZER.num_epochs={epochs}: give at least as "
                             f"many epochs as values, or fewer values")
        return
    if len(milestones) != len(values) - 1:
        raise UsageError(f"{place} has {len(values)} values and {len(milestones)} milestones: give one milestone fewer "
                         f"than values (the epochs where the next value starts)")
    if any(low >= high for low, high in zip([0, *milestones], milestones)):
        raise UsageError(f"{place}.milestones={milestones}: the learning rate drops at each milestone epoch, so each "
                         f"milestone must be above the one before, the first above 0; fix config.{place}.milestones")
    if milestones and milestones[-1] >= epochs:
        raise UsageError(f"{place}.milestones={milestones} with OPTIMIZER.num_epochs={epochs}: the learning rate drops "
                         f"at each milestone epoch, so each must be below num_epochs; lower config.{place}.milestones, "
                         f"or raise config.OPTIMIZER.num_epochs to at least {milestones[-1] + 1}")


def _check_schedule(schedule: Mapping, epochs: int, where: str) -> None:
    if schedule.get("name") == "composite":  # classy-vision builds its parts with the same num_epochs
        for index, part in enumerate(schedule.get("schedulers", [])):
            _check_schedule(part, epochs, f"{where}.schedulers.{index}")
    elif schedule.get("name") == "multistep":
        _check_multistep(schedule, epochs, where)


def check_schedules(optimizer: Mapping) -> None:
    """Every multistep schedule of ``OPTIMIZER.param_schedulers`` (composite parts too) fits
    ``OPTIMIZER.num_epochs`` as classy-vision requires (``_check_multistep``)."""
    for name, schedule in optimizer.get("param_schedulers", {}).items():
        if isinstance(schedule, Mapping):
            _check_schedule(schedule, optimizer["num_epochs"], name)


def check_amounts(config: Mapping, images: Dict[str, int]) -> None:
    """Positive epochs, batch size and learning rate; milestones that fit the epochs (``check_schedules``); with
    DROP_LAST, at least one batch of the training set.

    ``images``: the training images of each dataset (recorded at prepare-data), for the batch check.
    """
    epochs = config["OPTIMIZER"]["num_epochs"]
    if epochs < 1:
        raise UsageError(f"OPTIMIZER.num_epochs={epochs}: train at least 1 epoch (config.OPTIMIZER.num_epochs=N)")
    check_schedules(config["OPTIMIZER"])
    train = config["DATA"]["TRAIN"]
    batch = train["BATCHSIZE_PER_REPLICA"]
    if batch < 1:
        raise UsageError(f"DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}: give at least 1 image per process")
    rates = _learning_rates(config["OPTIMIZER"]["param_schedulers"]["lr"], "OPTIMIZER.param_schedulers.lr")
    negative = {key: rate for key, rate in rates.items() if rate < 0}
    if negative or (rates and max(rates.values()) <= 0):
        shown = ", ".join(f"{key}={rate}" for key, rate in (negative or rates).items())
        raise UsageError(f"learning rate {shown}: learning rates must be positive (0 only at the ends of a warm-up "
                         f"or decay)")
    distributed = config["DISTRIBUTED"]
    world = distributed["NUM_NODES"] * distributed["NUM_PROC_PER_NODE"]
    if train.get("DROP_LAST", False) and images:
        total = sum(images.values())
        if train.get("DATA_LIMIT", -1) > 0:
            total = min(total, train["DATA_LIMIT"])
        if total < batch * world:
            names = ", ".join(images)
            raise UsageError(f"one batch is {batch} images x {world} processes = {batch * world}, but the training "
                             f"set ({names}) has {total}: with DROP_LAST no batch would be made; lower "
                             f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA to at most {max(1, total // world)}")
