"""Compose, validate and launch VISSL runs: the one code path of `convit-ssl train` and the launchers.

``compose(args)`` turns command-line words into a validated VISSL config:

* ``config=NAME``: a recipe; ``dino`` is short for our ``convit_ssl/pretrain/dino``; any VISSL
  config name (``pretrain/simclr/simclr_8node_resnet``) works too.
* ``model=PRESET``: the model file of a recipe. ``data=NAME``: the data file of that name (crop
  sizes and statistics for a standard dataset), or any dataset registered with ``prepare-data``.
* ``trunk.KEY=VALUE``: change a field of the preset (``trunk.local_up_to_layer=0``: the DeiT twin).
* ``run_dir=PATH``: where checkpoints and logs go (default: ``runs/<recipe>-<model>-<data>-<hash>``,
  the same folder for the same command, so rerunning it resumes).
* ``continue_with_changes=true``: continue a run folder's checkpoints with a config that differs from
  the one they were trained with (else refused, see ``convit_ssl.run_folder.record_config``).
* anything else is a Hydra override (``config.OPTIMIZER.num_epochs=10``).

``compose`` writes nothing. ``train(config)`` takes the run folder (one run at a time), records the config
there, and runs VISSL's engine: in this process for one process per node, else through VISSL's launcher,
whose workers import this module (and so ``convit_ssl.vissl_glue``, which sets VISSL up) through the hook
generator defined here. VISSL's Python API is reached through ``convit_ssl.vissl_glue`` only (``compose`` names
VISSL's config package to Hydra).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from convit_ssl import config_checks, vissl_glue
from convit_ssl.errors import UsageError
from convit_ssl.shipped_configs import PACKAGE_CONFIGS, RECIPE_GROUP, SHORTHAND_GROUPS, group_options


@functools.lru_cache(maxsize=1)
def config_names() -> Tuple[str, ...]:
    """Every config name that ``config=`` accepts: ours (short and long form) and VISSL's (package data, listed
    once per process: VISSL ships 557 files)."""
    names = []
    for root in (PACKAGE_CONFIGS / "config", _vissl_config_root()):
        if root is not None and root.is_dir():
            names += [str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")]
    names += [p.stem for p in (PACKAGE_CONFIGS / "config" / RECIPE_GROUP).glob("*.yaml")]
    return tuple(sorted(set(names)))


def _vissl_config_root() -> Optional[Path]:
    import importlib.util

    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "config"


def _data_config_of(dataset: str, options: Sequence[str]) -> str:
    """The data config that ``prepare-data`` recorded for registered ``dataset``; refused when there is none."""
    from convit_ssl import data

    try:
        name = data.dataset_data_config(dataset)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if name not in options:
        raise UsageError(f"dataset {dataset!r} has no data config recorded (which crops, statistics and patch size "
                         f"suit it): run convit-ssl prepare-data {dataset} --from PATH --like DATA with DATA one of "
                         f"{', '.join(options)}")
    return name


def expand_arguments(args: Sequence[str]) -> Dict[str, Any]:
    """Split command-line words into the recipe, the Hydra overrides and the run folder."""
    recipe, overrides, run_dir, choices, continue_with_changes = None, [], None, {}, None
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UsageError(f"argument {arg!r} is not KEY=VALUE: write e.g. config=dino or model=convit_small")
        if key == "config":
            recipe = value
        elif key in SHORTHAND_GROUPS:
            options = group_options(SHORTHAND_GROUPS[key])
            choices[key] = value
            if value in options:
                overrides.append(f"{SHORTHAND_GROUPS[key]}={value}")
            elif key == "data":  # a registered dataset, read with the data config recorded for it
                overrides += [f"{SHORTHAND_GROUPS[key]}={_data_config_of(value, options)}",
                              f"config.CONVIT_SSL.DATASET={value}"]
            else:
                raise UsageError(f"unknown {key} {value!r}; choose from {', '.join(options)}")
        elif key.startswith("trunk."):
            overrides.append(f"++{config_checks.TRUNK_OVERRIDES}{key[len('trunk.'):]}={value}")
        elif key == "run_dir":
            run_dir = value
        elif key == "continue_with_changes":
            if value.lower() not in ("true", "false"):
                raise UsageError(f"continue_with_changes={value!r}: write continue_with_changes=true or false")
            continue_with_changes = value.lower() == "true"
        else:
            overrides.append(arg)
    if recipe is None:
        raise UsageError(f"no config given: add config=NAME, e.g. config=dino (recipes: "
                         f"{', '.join(group_options('config/' + RECIPE_GROUP))})")
    known = config_names()
    if recipe not in known:
        close = difflib.get_close_matches(recipe, known, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UsageError(f"unknown config {recipe!r} (looked in {PACKAGE_CONFIGS / 'config'} and VISSL's "
                         f"configs){hint}")
    if (PACKAGE_CONFIGS / "config" / RECIPE_GROUP / f"{recipe}.yaml").is_file():
        recipe = f"{RECIPE_GROUP}/{recipe}"
    return dict(recipe=recipe, overrides=overrides, run_dir=run_dir, choices=choices,
                continue_with_changes=continue_with_changes)


def default_run_dir(recipe: str, choices: Dict[str, str], overrides: Sequence[str], root: str = "runs") -> str:
    """``runs/<recipe>-<model>-<data>-<hash of the overrides>``: the same command, the same folder."""
    digest = hashlib.sha1("\n".join([recipe, *sorted(overrides)]).encode()).hexdigest()[:8]
    parts = [Path(recipe).name, choices.get("model", ""), choices.get("data", ""), digest]
    return str(Path(os.environ.get("CONVIT_SSL_RUNS", root)) / "-".join(p for p in parts if p))


def trunk_width(preset: str, overrides) -> int:
    """The width of the trunk that ``preset`` with ``overrides`` builds: the ``trunk_width`` resolver of the
    recipes, which gives every head its input width (``MODEL.TRUNK.CONVIT_SSL.EMBED_DIM``)."""
    from convit_ssl.models import preset_kwargs

    return preset_kwargs(preset, **overrides)["embed_dim"]


def register_resolvers() -> None:
    """Make ``${trunk_width:PRESET,OVERRIDES}`` resolvable in configs composed in this process."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("trunk_width"):
        OmegaConf.register_new_resolver("trunk_width", trunk_width)


def compose(args: Sequence[str], run_dir: Optional[str] = None):
    """Validated VISSL config (AttrDict) for command-line words (see the module docstring)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    parsed = expand_arguments(args)
    run_dir = run_dir or parsed["run_dir"] or default_run_dir(parsed["recipe"], parsed["choices"], parsed["overrides"])
    run_dir = Path(run_dir).resolve()
    overrides = [f"config={parsed['recipe']}", *parsed["overrides"]]
    if parsed["continue_with_changes"] is not None:  # not part of the default run folder's hash
        overrides.append(f"++config.CONVIT_SSL.CONTINUE_WITH_CHANGES={parsed['continue_with_changes']}")
    try:
        cfg = hydra_config(overrides)
        recipe = _recipe_without_settings(overrides)
        OmegaConf.resolve(cfg)  # our recipes interpolate crop sizes, statistics and head widths
        given = OmegaConf.to_container(cfg.config)
        config_checks.check_override_types(given, parsed["overrides"], [config_checks.vissl_defaults(), recipe])
        resolve_device(cfg.config)  # before VISSL derives batch sizes and learning rates from it
        cfg.config.CHECKPOINT.DIR = str(run_dir)
        with _no_new_folders(run_dir):  # VISSL's SwAV inference creates the checkpoint folder
            config = vissl_glue.attrdict_config(cfg)  # train() records the config
    except (HydraException, OmegaConfBaseException) as error:
        message = str(error).splitlines()[0]
        raise UsageError(f"config {parsed['recipe']} does not compose: {message}") from None
    config_checks.check_no_dropped_overrides(given, config, parsed["overrides"], config.MACHINE.DEVICE)
    validate(config)
    derive_iteration_settings(config)
    return config


def hydra_config(overrides: Sequence[str]):
    """VISSL's ``defaults`` composed by Hydra with ``overrides`` (``config=NAME``, ...), our configs on the search
    path: the raw DictConfig, unresolved and unchecked (``compose`` resolves, checks and converts it). Each config
    file is parsed once per process (``_config_files_parsed_once``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_resolvers()
    with initialize_config_module(config_module="vissl.config", version_base=None), _config_files_parsed_once():
        return hydra_compose("defaults", overrides=[f"hydra.searchpath=[file://{PACKAGE_CONFIGS}]", *overrides])


def _recipe_without_settings(overrides: Sequence[str]) -> Dict[str, Any]:
    """The ``config`` section of the recipe and its files without any ``config.KEY=VALUE`` setting: the types
    that the settings must keep ({} when it does not compose on its own)."""
    files = tuple(o for o in overrides if not o.lstrip("+").startswith("config."))
    if len(files) == len(overrides):
        return {}
    return copy.deepcopy(_composed_files(files))


@functools.lru_cache(maxsize=16)
def _composed_files(files: Tuple[str, ...]) -> Dict[str, Any]:
    """``_recipe_without_settings``, composed once per process for each choice of files: the files are package
    data that do not change while it runs."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(hydra_config(files).config, resolve=True)
    except (HydraException, OmegaConfBaseException):
        return {}


_PARSED_CONFIG_FILES: Dict[Tuple[str, int, int], Any] = {}


@contextlib.contextmanager
def _config_files_parsed_once():
    """Within the block, a config file that Hydra loads comes from the first parse of the file in this process.

    Hydra reads every file of a config at each compose, VISSL's 1,400-line ``defaults.yaml`` first, and loading
    them (pure-Python YAML, then OmegaConf's nodes) is over half of a compose. ``OmegaConf.load``, which Hydra's
    config sources call, is wrapped here: a file known by its real path, size and modification time is parsed once
    and handed out as a deep copy (Hydra edits what it loads); anything else is loaded as before.
    """
    from omegaconf import OmegaConf

    original = OmegaConf.__dict__["load"]
    load = OmegaConf.load

    def load_once(file_):
        name = getattr(file_, "name", file_)
        if not isinstance(name, (str, os.PathLike)) or not os.path.isfile(name):
            return load(file_)
        status = os.stat(name)
        key = (os.path.realpath(name), status.st_size, status.st_mtime_ns)
        if key not in _PARSED_CONFIG_FILES:
            _PARSED_CONFIG_FILES[key] = load(file_)
        return copy.deepcopy(_PARSED_CONFIG_FILES[key])

    OmegaConf.load = staticmethod(load_once)
    try:
        yield
    finally:
        OmegaConf.load = original


@contextlib.contextmanager
def _no_new_folders(path: Path):
    """Remove the folders up to ``path`` that the block created and left empty: composing writes nothing."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    yield
    for folder in missing:  # deepest first; rmdir refuses a folder that is not empty
        try:
            folder.rmdir()
        except OSError:
            return


def resolve_device(config) -> None:
    """``auto`` settings: gpu + nccl + one process per GPU when CUDA is present, else one cpu process
    with gloo, without LARC (it needs apex) or AMP."""
    import torch

    if config.MACHINE.DEVICE == "auto":
        config.MACHINE.DEVICE = "gpu" if torch.cuda.is_available() else "cpu"
    if config.DISTRIBUTED.NUM_PROC_PER_NODE == "auto":
        gpus = torch.cuda.device_count() if config.MACHINE.DEVICE == "gpu" else 0
        config.DISTRIBUTED.NUM_PROC_PER_NODE = max(1, gpus)
    if config.DISTRIBUTED.BACKEND == "auto":
        config.DISTRIBUTED.BACKEND = "nccl" if config.MACHINE.DEVICE == "gpu" else "gloo"
    if config.MACHINE.DEVICE == "cpu":
        config.OPTIMIZER.use_larc = False
        config.MODEL.AMP_PARAMS.USE_AMP = False
        if config.MODEL.get("SYNC_BN_CONFIG"):
            config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN = False


def validate(config) -> None:
    """Checks that fail in one line before any work starts."""
    from convit_ssl.models.convit import check_options
    from convit_ssl.trunk_config import trunk_kwargs

    if config.MODEL.TRUNK.NAME == "convit_ssl":
        config_checks.check_trunk_overrides(config.MODEL.TRUNK.get("CONVIT_SSL", {}).get("OVERRIDES") or {})
        kwargs = trunk_kwargs(config.MODEL)
        check_options(**kwargs)  # a trunk that cannot be built fails here, not on the nodes
        trunk, feature_extractor = vissl_glue.meta_trunk(config.MODEL), vissl_glue.is_feature_extractor(config.MODEL)
        if feature_extractor:
            config_checks.check_pooled_features(config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP,
                                                trunk.parse_feature_key)
        expected = config.MODEL.TRUNK.get("CONVIT_SSL", {}).get("EMBED_DIM")
        if expected and expected != kwargs["embed_dim"]:
            raise UsageError(
                f"trunk/head dimension mismatch: the trunk {config.MODEL.TRUNK.CONVIT_SSL.PRESET} is "
                f"{kwargs['embed_dim']} wide but the heads expect EMBED_DIM={expected}; leave EMBED_DIM unset (it "
                f"follows model=PRESET and trunk.embed_dim)"
            )
        vissl_glue.check_heads_take_features(config.MODEL, trunk, feature_extractor)
    weights = config.MODEL.WEIGHTS_INIT.get("PARAMS_FILE", "")
    if weights and not Path(weights).is_file():  # VISSL asserts it on every node, after the run folder is taken
        raise UsageError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {weights!r} is not a file: pass "
                         f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE=CHECKPOINT (the weights to start from), or '' for "
                         f"random init")
    if config.MODEL.TRUNK.NAME == "convit_ssl":
        config_checks.check_weights_layout(config.MODEL)
    if config_checks.weights_file_loaded(config.MODEL):  # VISSL asserts shapes on every node, skips missing tensors
        from convit_ssl.checkpoint import vissl_model_shapes

        checkpoint_shapes = vissl_model_shapes(weights)
        if config.MODEL.TRUNK.NAME == "convit_ssl":
            prefix = "trunk.base_model." if feature_extractor else "trunk."
            config_checks.check_trunk_weights(config.MODEL, vissl_glue.tensor_shapes(trunk),
                                              checkpoint_shapes["trunk"], prefix, trunk_kwargs(config.MODEL))
        if config_checks.heads_loaded_from_weights(config.MODEL):
            heads = {f"heads.{name}": shape for name, shape in checkpoint_shapes["heads"].items()}
            config_checks.check_head_weights(config.MODEL, vissl_glue.head_shapes(config.MODEL), heads)
    keep_last = config.CHECKPOINT.get("KEEP_LAST_N", -1)
    keep_every = config.CHECKPOINT.get("KEEP_EVERY_N_EPOCHS", 0)
    if type(keep_last) is not int or not (keep_last >= 1 or keep_last == -1):
        raise UsageError(f"CHECKPOINT.KEEP_LAST_N={keep_last!r}: keep at least 1 checkpoint (the newest), or -1 "
                         f"to keep them all")
    if type(keep_every) is not int or keep_every < 0:
        raise UsageError(f"CHECKPOINT.KEEP_EVERY_N_EPOCHS={keep_every!r}: give a whole number of epochs, 0 for no "
                         f"milestone checkpoints")
    if config.CHECKPOINT.get("APPEND_DISTR_RUN_ID"):  # VISSL's get_checkpoint_folder, on more than one node
        raise UsageError("config.CHECKPOINT.APPEND_DISTR_RUN_ID=true: VISSL would write a multi-node run's "
                         "checkpoints to run_dir/<RUN_ID>, out of reach of the run folder's lock, recorded config "
                         "and resume rules (a new port would start afresh); leave it false and give each run its "
                         "own run_dir")
    tensorboard = config.HOOKS.TENSORBOARD_SETUP
    if tensorboard.USE_TENSORBOARD and tensorboard.FLUSH_EVERY_N_MIN <= 0:
        raise UsageError("HOOKS.TENSORBOARD_SETUP.FLUSH_EVERY_N_MIN must be at least 1: at 0 TensorBoard's writer "
                         "thread flushes in a busy loop and holds the GIL, slowing training many times over")
    config_checks.check_head_consistency(config)
    config_checks.check_file_lists(config.DATA)
    config_checks.check_amounts(config, train_images(config))


def train_images(config) -> Dict[str, int]:
    """The images of each training dataset read from disk, as recorded at prepare-data (checked against the
    folder: ``data.dataset_split_dir`` fails in one line when they changed)."""
    from convit_ssl import data

    images = {}
    paths = list(config.DATA.TRAIN.get("DATA_PATHS", None) or [])
    for index, (source, name) in enumerate(zip(config.DATA.TRAIN.DATA_SOURCES, config.DATA.TRAIN.DATASET_NAMES)):
        if source == "disk_filelist" and index < len(paths):  # a file list (a fine-tuning's label subset)
            images[name] = file_list_length(paths[index])
        elif source in ("disk_folder", "disk_filelist"):
            data.dataset_split_dir(name, "train")
            images[name] = data.read_manifest()[name]["splits"]["train"]["images"]
    return images


def file_list_length(path: str) -> int:
    """The images a VISSL file list (.npy of paths) names; one line when it cannot be read."""
    import numpy as np

    try:
        return len(np.load(path, mmap_mode="r"))
    except (OSError, ValueError) as error:
        raise UsageError(f"image list {path} cannot be read ({error}): rerun convit-ssl finetune, which writes it")


def derive_iteration_settings(config) -> None:
    """Settings given in epochs in our recipes, converted to iterations for VISSL."""
    epochs = config.get("CONVIT_SSL", {}).get("TEACHER_TEMP_WARMUP_EPOCHS")
    if config.LOSS.name != "dino_loss" or not epochs:
        return
    images = sum(train_images(config).values())
    world = config.DISTRIBUTED.NUM_NODES * config.DISTRIBUTED.NUM_PROC_PER_NODE
    iterations_per_epoch = max(1, math.floor(images / (config.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world)))
    total = iterations_per_epoch * config.OPTIMIZER.num_epochs
    config.LOSS.dino_loss.teacher_temp_warmup_iters = min(total, int(epochs * iterations_per_epoch))


def hook_generator(config):
    """VISSL's hooks plus ours. Being a function of this module, it makes every worker process that
    VISSL spawns import this module (and so set VISSL up) when it is unpickled there; called there before
    VISSL reads the datasets, it registers them from the catalog on disk. A fine-tuning's evaluation hook comes
    first; ``SameRunHook`` comes last: it seeds the next step after every other hook has run."""
    from convit_ssl.finetune_hook import build_finetune_hook
    from convit_ssl.health_hook import build_health_hook
    from convit_ssl.gating_hook import build_gating_hook
    from convit_ssl.resume_hooks import PreemptionCheckpointHook, SameRunHook

    vissl_glue.register_datasets()
    evaluation = build_finetune_hook(config)  # before VISSL's checkpoint hook: an epoch's scores precede its checkpoint
    hooks = [evaluation] if evaluation is not None else []
    hooks += vissl_glue.default_hooks(config) + [PreemptionCheckpointHook()]
    optional = [build_gating_hook(config), build_health_hook(config)]
    return hooks + [hook for hook in optional if hook is not None] + [SameRunHook()]


def wait_for_preemption_checkpoint(run_dir, signalled_at: float, timeout_s: float = 90.0) -> bool:
    """Wait until the run in ``run_dir`` saved its checkpoint after the signal (True), or ``timeout_s`` passed."""
    import time

    from convit_ssl.run_folder import PREEMPTION_MARKER

    marker = Path(run_dir) / PREEMPTION_MARKER
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if marker.exists() and marker.stat().st_mtime >= signalled_at - 5:
            return True
        time.sleep(0.5)
    return False


def plain_config(config) -> Dict[str, Any]:
    """``config`` as plain YAML-safe values, as VISSL records it (dtypes by name: ``float32``)."""
    import json

    import torch

    def encode(value):
        return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else str(value)

    return json.loads(json.dumps(config, default=encode))


def train(config, node_id: int = 0) -> Path:
    """Run VISSL training for ``config`` on this node; returns the run folder.

    Node 0's launching process owns the run folder for the whole run (``run_folder.owned``; the processes
    VISSL spawns work under it) and records the config there first (``run_folder.record_config``); the
    other nodes of a multi-node run take part in node 0's run and neither lock nor record.
    """
    from convit_ssl import run_folder

    run_dir = Path(config.CHECKPOINT.DIR)
    if node_id != 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        vissl_glue.launch_training(config, node_id, hook_generator)
        return run_dir
    with run_folder.owned(run_dir):
        continuing = bool((config.get("CONVIT_SSL", None) or {}).get("CONTINUE_WITH_CHANGES", False))
        changes = run_folder.record_config(run_dir, plain_config(config), continue_with_changes=continuing)
        if changes:
            print(f"continuing {run_dir} with changes ({run_folder.CONFIG_HISTORY_FILE}): "
                  f"{run_folder.describe(changes)}", flush=True)
        vissl_glue.launch_training(config, node_id, hook_generator)
    return run_dir
