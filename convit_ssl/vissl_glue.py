"""Everything that touches VISSL: compatibility patches, trunk registration, the dataset catalog, the launcher.

This is the only module of the package that imports VISSL (the model itself is plain PyTorch; ``hooks`` and
the ``*_hook`` modules import classy-vision, whose hook class VISSL's trainer calls). Importing it sets VISSL up (``setup``:
the patches and the ``convit_ssl`` trunk in VISSL's registry), so it is imported only where VISSL is used:
``convit_ssl.engine`` imports it, and so does every process that VISSL starts, each with its own registry:
a training process unpickles ``engine.hook_generator``, a data-loader worker (forkserver) unpickles the dataset,
whose image folder is this module's ``VisslImageFolder``. ``import convit_ssl`` does not touch VISSL.

VISSL's dataset catalog is filled from ours (``register_datasets``) right before VISSL reads it: when a run is
launched and in each training process, so a dataset written after the import (digits, on first use) is known.

The trunk is built from the keyword arguments ``convit_ssl.trunk_config.trunk_kwargs`` reads from a VISSL
``MODEL`` config.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from fvcore.common.param_scheduler import ParamScheduler

from convit_ssl import atomic
from convit_ssl.errors import UsageError
from convit_ssl.images import CheckedImageFolder
from convit_ssl.models.convit import ConViT
from convit_ssl.trunk_config import trunk_kwargs


class VisslConViT(ConViT):
    """The ConViT trunk as VISSL builds it: ``TRUNKS["convit_ssl"](model_config, model_name)``.

    Same parameters and state-dict keys as ``ConViT``, so VISSL checkpoints load into plain models.
    """

    def __init__(self, model_config: Mapping[str, Any], model_name: str = "convit_ssl"):
        super().__init__(**trunk_kwargs(model_config))
        self.model_name = model_name


def _atomic_save_checkpoint(checkpoint_folder: str, state, checkpoint_file: str = "checkpoint.torch") -> str:
    """classy-vision's save_checkpoint writes in place (its comment says atomically, it is not): a kill
    during the write leaves a truncated file that auto-resume then picks. Write, fsync, rename.

    VISSL also stores its loop counter as ``iteration_num``, which counts one extra tick per epoch (44
    updates in 2 epochs: 45 at the end, with ``iteration`` 44); a resume only logs with it. Both keys hold
    the number of optimizer updates done."""
    if isinstance(state, dict) and "iteration" in state and "iteration_num" in state:
        state = {**state, "iteration_num": state["iteration"]}
    path = Path(checkpoint_folder) / checkpoint_file
    atomic.torch_save(state, path)
    return str(path)


def _symlink_never_absent(source: str, link: str) -> None:
    """VISSL removes checkpoint.torch and then links it again: a kill in between leaves no link."""
    atomic.replace_symlink(os.path.basename(source), link)


def _latest_checkpoint_file(checkpoint_folder: str, config, skip_final: bool = False,
                            latest_checkpoint_resume_num: int = 1) -> Optional[str]:
    """VISSL's resume rule (the highest phase number, or only iteration files when CHECKPOINT_ITER_FREQUENCY
    > 0) resumes a run that checkpoints both ways from an older state: use the run folder's rule instead."""
    from convit_ssl.run_folder import latest_checkpoint

    latest = latest_checkpoint(checkpoint_folder, skip_final=skip_final, nth=latest_checkpoint_resume_num)
    return latest.name if latest is not None else None


def _has_run_checkpoint(checkpoint_folder: str, skip_final: bool = False) -> bool:
    """Whether the run folder holds a checkpoint of the run to resume from, by the run folder's rule: VISSL's counts
    any ``*.torch`` (``pretrained.torch``, a copy ``model_best.torch``) and then resumes from a file named None."""
    from convit_ssl.run_folder import latest_checkpoint

    return latest_checkpoint(checkpoint_folder, skip_final=skip_final) is not None


# Environment variables worth a line in a run's log.txt (what reproduces the run); VISSL logs all of them,
# tokens and keys included, and run folders are shared. A name that looks like a secret is never logged.
LOGGED_ENV_PREFIXES = ("CUDA", "NCCL", "SLURM", "OMP_", "MKL_", "KMP_", "TORCH", "PYTORCH", "GLOO_", "CONVIT_SSL_",
                       "MASTER_", "CUBLAS", "CUDNN")
LOGGED_ENV_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "PYTHONHASHSEED",
                    "VISSL_DATASET_CATALOG_PATH")
_SECRET_NAME_PARTS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "KEY", "COOKIE")


def logged_environment(environment: Mapping[str, str]) -> Dict[str, str]:
    """The variables of ``environment`` that go into the run's log: the allow-list, minus secret-like names."""
    return {name: value for name, value in sorted(environment.items())
            if (name.startswith(LOGGED_ENV_PREFIXES) or name in LOGGED_ENV_NAMES)
            and not any(part in name.upper() for part in _SECRET_NAME_PARTS)}


def _print_reproduction_env(current_env: Mapping[str, str]) -> None:
    """VISSL's print_system_env_info, restricted to ``logged_environment``."""
    import logging

    logged = logged_environment(current_env)
    for name, value in logged.items():
        logging.info(f"{name}:\t{value}")
    logging.info(f"{len(current_env) - len(logged)} other environment variables not logged (convit-ssl logs only "
                 f"{', '.join(LOGGED_ENV_PREFIXES)}*, {', '.join(LOGGED_ENV_NAMES)})")


def _seeded_per_sample(getitem):
    """GenericSSLDataset.__getitem__ draws its augmentations from the global generators, whose state in a
    loader worker depends on the worker count, the batches the worker made before and, after a resume, on
    the worker's fresh start: a resumed run augments differently. Seed them per sample from
    ``(SEED_VALUE, epoch, index)``. In the training process itself (no workers) torch's generator, which
    the step draws from (drop path, MoCo's shuffle), is put back; Python's and numpy's are left as the
    sample left them, as in a worker (a collator that draws from them draws the same in both)."""
    import torch
    from torch.utils.data import get_worker_info

    from convit_ssl.resume_hooks import SAMPLE_STREAM, seed_from_position

    @functools.wraps(getitem)
    def seeded_getitem(self, idx):
        epoch = getattr(self, "augmentation_epoch", None)
        if epoch is None:  # not driven by a training task (feature extraction)
            return getitem(self, idx)
        position = (self.cfg["SEED_VALUE"], epoch, idx, SAMPLE_STREAM)
        if get_worker_info() is not None:
            seed_from_position(*position, cuda=False)
            return getitem(self, idx)
        step_state = torch.get_rng_state()
        try:
            seed_from_position(*position, cuda=False)
            return getitem(self, idx)
        finally:
            torch.set_rng_state(step_state)

    return seeded_getitem


def _telling_dataset_the_epoch(set_epoch):
    """TrainTask.set_epoch tells the sampler the epoch before every data iterator is made; tell the dataset
    too (its copies in the loader workers are made after it), for the per-sample seeds."""

    @functools.wraps(set_epoch)
    def set_epoch_everywhere(self, phase_type, epoch, start_iter, train_phase_idx):
        self.datasets[phase_type].augmentation_epoch = epoch
        return set_epoch(self, phase_type, epoch, start_iter, train_phase_idx)

    return set_epoch_everywhere


def _random_state_neutral(build):
    """DINO's teacher and MoCo's key encoder are built (randomly initialised, then overwritten) at the first
    forward pass of a run, so a resumed run draws from the generators where the uninterrupted run did not:
    build them without touching the generators."""
    from convit_ssl.resume_hooks import preserved_random_state

    @functools.wraps(build)
    def build_quietly(self, task):
        with preserved_random_state():
            return build(self, task)

    return build_quietly


def _teacher_without_drop_path(build):
    """VISSL builds DINO's teacher with ``VISION_TRANSFORMERS.DROP_PATH_RATE`` set to 0 (the paper's teacher
    has no stochastic depth), a key our trunk does not read when a preset names the model: the teacher
    dropped paths at the student's rate. Build it with ``OVERRIDES.drop_path_rate`` 0 too, then put the
    run's value back."""

    @functools.wraps(build)
    def build_deterministic_teacher(self, task):
        ours = task.config["MODEL"]["TRUNK"].get("CONVIT_SSL", None)
        if ours is None:
            return build(self, task)
        overrides = ours.get("OVERRIDES", None)
        ours["OVERRIDES"] = {**(overrides or {}), "drop_path_rate": 0.0}
        try:
            return build(self, task)
        finally:
            ours["OVERRIDES"] = overrides

    return build_deterministic_teacher


def _teacher_batch_norm_on_cpu(build):
    """VISSL converts DINO's teacher to SyncBatchNorm, which torch runs on GPUs only, so a head with batch norm
    (``use_bn: true``) failed at the first step on a CPU. On a CPU (one process: there is nothing to synchronise)
    the teacher's batch norms stay plain ``BatchNorm1d`` (heads; same parameters and statistics)."""

    @functools.wraps(build)
    def build_teacher(self, task):
        build(self, task)
        if task.device.type == "cpu":
            task.loss.momentum_teacher = _without_sync_batch_norm(task.loss.momentum_teacher)

    return build_teacher


def _without_sync_batch_norm(module):
    """``module`` with each ``SyncBatchNorm`` replaced by a ``BatchNorm1d`` of the same settings and state."""
    import torch

    if isinstance(module, torch.nn.SyncBatchNorm):
        plain = torch.nn.BatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        plain.load_state_dict(module.state_dict())
        return plain.requires_grad_(False)
    for name, child in module.named_children():
        setattr(module, name, _without_sync_batch_norm(child))
    return module


def _moco_encoder_caught_up(build):
    """On resume, VISSL's MoCo hook loads the key encoder from the checkpoint at the first forward pass and
    skips that step's momentum update, which the uninterrupted run makes (the encoder ends 1 - momentum of a
    step behind), and leaves the loaded parameters trainable. Make the update; freeze them."""

    @functools.wraps(build)
    def build_caught_up(self, task):
        resumed = task.loss.checkpoint is not None
        build(self, task)
        for parameter in task.loss.moco_encoder.parameters():
            parameter.requires_grad = False
        if resumed:
            self._update_momentum_encoder(task)

    return build_caught_up


class _DurableLines:
    """VISSL's stdout.json stream buffers 10 KB, so a killed run lost its last iterations (all of them in a
    short job). Every line written reaches the disk before the training goes on."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
        os.fsync(self.stream.fileno())

    def close(self) -> None:
        self.stream.close()


def _with_durable_step_log(init):
    @functools.wraps(init)
    def init_durable(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.json_stdout_logger is not None:
            self.json_stdout_logger = _DurableLines(self.json_stdout_logger)

    return init_durable


def _checkpoint_then_prune(original):
    """Wrap VISSL's ``LogLossMetricsCheckpointHook._checkpoint_model``, which keeps every checkpoint it writes:
    after each save, the primary process deletes the superseded ones (``run_folder.prune_checkpoints``) as
    ``CHECKPOINT.KEEP_LAST_N`` and ``KEEP_EVERY_N_EPOCHS`` say (absent: all are kept). FSDP shards are kept."""
    from classy_vision.generic.distributed_util import is_primary
    from fairscale.nn.data_parallel import FullyShardedDataParallel

    from convit_ssl.run_folder import prune_checkpoints

    @functools.wraps(original)
    def checkpoint_model(self, task, *args, **kwargs):
        original(self, task, *args, **kwargs)
        keep = task.config["CHECKPOINT"]
        if is_primary() and not isinstance(task.base_model, FullyShardedDataParallel):
            prune_checkpoints(task.checkpoint_folder, keep_last=keep.get("KEEP_LAST_N", -1),
                              keep_every_epochs=keep.get("KEEP_EVERY_N_EPOCHS", 0))

    return checkpoint_model


class VisslImageFolder(CheckedImageFolder):
    """What VISSL's ``disk_folder`` source reads with (see ``_patch_vissl``). A data-loader worker that unpickles
    the dataset imports this module through it, and so gets the patches its ``__getitem__`` needs."""


def attrdict_config(cfg):
    """VISSL's config (AttrDict) for a composed Hydra config, with VISSL's inferred settings; writes nothing."""
    from vissl.utils.hydra_config import convert_to_attrdict

    return convert_to_attrdict(cfg, dump_config=False)[1]


def default_hooks(config) -> list:
    """The hooks VISSL's trainer uses for ``config`` by default."""
    from vissl.hooks import default_hook_generator

    return default_hook_generator(config)


def launch_training(config, node_id: int, hook_generator) -> None:
    """VISSL's training engine on this node: in this process, or in one spawned process per GPU."""
    import vissl.utils.distributed_launcher as launcher

    register_datasets()
    launcher.launch_distributed(config, node_id=node_id, engine_name="train", hook_generator=hook_generator)


def register_datasets() -> None:
    """Make every dataset of our catalog (convit_ssl.data) known to VISSL's dataset catalog, as it is now."""
    from vissl.data.dataset_catalog import VisslDatasetCatalog

    from convit_ssl import data

    for name, entry in data.read_catalog().items():
        if VisslDatasetCatalog.has_data(name):
            VisslDatasetCatalog.remove(name)
        VisslDatasetCatalog.register_data(name, entry)


def layer_decay_factor(name: str, depth: int, decay: float) -> float:
    """The learning-rate factor of parameter ``name`` of VISSL's model (``trunk.blocks.3.mlp.fc1.weight``) under
    layer-wise decay (BEiT, MAE): layer 0 is the patch embedding, position embedding and class token, layer i + 1
    block i, layer ``depth + 1`` the final norm and the heads; a parameter of layer l learns at
    ``decay ** (depth + 1 - l)`` times the lr."""
    parts = name.split(".")
    if parts[0] == "trunk" and parts[1] in ("patch_embed", "pos_embedding", "class_token"):
        layer = 0
    elif parts[0] == "trunk" and parts[1] == "blocks":
        layer = int(parts[2]) + 1
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer)


class _ScaledSchedule(ParamScheduler):
    """A classy-vision parameter schedule times a constant: the layer-decayed learning rate of a parameter group."""

    def __init__(self, schedule, factor: float):
        self.schedule, self.factor = schedule, factor
        self.update_interval = schedule.update_interval

    def __call__(self, where: float) -> float:
        return self.factor * self.schedule(where)


def layer_decay_groups(model, param_groups: list, depth: int, decay: float) -> list:
    """``param_groups`` (VISSL's: parameters, lr schedule, weight decay) split so that each group holds the
    parameters of one ``layer_decay_factor``, its lr schedule scaled by that factor."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    split = []
    for group in param_groups:
        by_factor: Dict[float, list] = {}
        for parameter in group["params"]:
            by_factor.setdefault(layer_decay_factor(names[id(parameter)], depth, decay), []).append(parameter)
        for factor, parameters in sorted(by_factor.items()):
            split.append({**group, "params": parameters, "lr": _ScaledSchedule(group["lr"], factor)})
    return split


def _with_layer_decay(get_param_groups):
    """VISSL's optimizer parameter groups, split by layer when ``OPTIMIZER.layer_decay`` is below 1 (our trunk only:
    the layers are read from its parameter names)."""
    @functools.wraps(get_param_groups)
    def param_groups(model, model_config, optimizer_config, optimizer_schedulers):
        groups = get_param_groups(model, model_config, optimizer_config, optimizer_schedulers)
        decay = optimizer_config.get("layer_decay", 1.0)
        if decay == 1.0 or model_config["TRUNK"]["NAME"] != "convit_ssl":
            return groups
        return layer_decay_groups(model, groups, trunk_kwargs(model_config)["depth"], decay)

    return param_groups


class _ScheduleLrView:
    """classy-vision's options view of an optimizer, whose ``lr`` is the largest of its groups' learning rates."""

    def __init__(self, view):
        self.view = view

    def __getattr__(self, name):
        value = getattr(self.view, name)
        return max(value) if name == "lr" and isinstance(value, list) else value


def _tensorboard_logs_the_schedule_lr(on_update):
    """With layer decay the groups' learning rates differ, classy's options view gives a list of them, and VISSL's
    TensorBoard hook fails rounding it: it logs the largest, the schedule's own (the head's, factor 1)."""

    @functools.wraps(on_update)
    def on_update_with_schedule_lr(self, task):
        view = task.optimizer.options_view
        task.optimizer.options_view = _ScheduleLrView(view)
        try:
            return on_update(self, task)
        finally:
            task.optimizer.options_view = view

    return on_update_with_schedule_lr


def _posterize_to_zero_bits(posterize):
    """RandAugment's increasing posterize keeps 4 - 4 x level / 10 bits, 0 at the top level (magnitude 9 with std
    0.5 reaches it), which PIL before 10 turned into a black image and PIL now refuses (ValueError): do what it did."""
    from PIL import Image

    @functools.wraps(posterize)
    def posterize_any_bits(img, bits_to_keep, **kwargs):
        if bits_to_keep < 1:
            return Image.new(img.mode, img.size)
        return posterize(img, bits_to_keep, **kwargs)

    return posterize_any_bits


def meta_trunk(model_config) -> ConViT:
    """The trunk VISSL builds for ``model_config``, on the meta device: nothing is allocated or initialised."""
    import torch

    with torch.device("meta"):
        return ConViT(**trunk_kwargs(model_config))


def tensor_shapes(module) -> Dict[str, tuple]:
    """``{name: shape}`` of a module's state (``blocks.0.attn.qk.weight`` of a trunk)."""
    return {name: tuple(value.shape) for name, value in module.state_dict().items()}


def is_feature_extractor(model_config) -> bool:
    """Whether VISSL wraps the trunk as a feature extractor (frozen, its features read by
    ``FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP``), holding its tensors under ``trunk.base_model.``."""
    from vissl.models import is_feature_extractor_model

    return is_feature_extractor_model(model_config)


def _meta_heads(model_config):
    """The heads VISSL builds for ``model_config`` (``MODEL.HEAD.PARAMS``, as
    ``BaseSSLMultiInputOutputModel._get_heads`` does), an ``nn.ModuleList`` on the meta device: nothing is allocated
    or initialised."""
    import torch
    from torch import nn
    from vissl.models.heads import get_model_head

    def module(name, options):
        return get_model_head(name)(model_config, **options)

    with torch.device("meta"):
        return nn.ModuleList(nn.Sequential(*(module(*part) for part in head)) if isinstance(head[0], list)
                             else module(*head) for head in model_config["HEAD"]["PARAMS"])


def head_shapes(model_config) -> Dict[str, tuple]:
    """``{name: shape}`` of the tensors of the heads VISSL builds for ``model_config``, named as in the model
    (``heads.0.clf.0.weight``)."""
    return {f"heads.{name}": shape for name, shape in tensor_shapes(_meta_heads(model_config)).items()}


def check_heads_take_features(model_config, trunk: ConViT, feature_extractor: bool) -> None:
    """The heads take the features VISSL gives them from ``trunk`` (``heads_forward``: one head per feature, or
    one feature through all heads in turn), tried on the meta device; a UsageError names the first head that
    cannot. Features: ``lastCLS``, or, in a feature extractor (``is_feature_extractor``), those of
    ``LINEAR_EVAL_FEAT_POOL_OPS_MAP``. ``trunk``: ``meta_trunk(model_config)``."""
    import torch

    if model_config.get("MULTI_INPUT_HEAD_MAPPING"):
        return  # heads fed per input type: VISSL's own wiring, not checked here
    pool_map = model_config["FEATURE_EVAL_SETTINGS"]["LINEAR_EVAL_FEAT_POOL_OPS_MAP"]
    features = [item[0] for item in pool_map] if feature_extractor else ["lastCLS"]
    heads, params = _meta_heads(model_config), model_config["HEAD"]["PARAMS"]
    kinds = ["+".join(part[0] for part in head) if isinstance(head[0], list) else head[0] for head in params]
    if len(features) != len(heads) and len(features) != 1:
        raise UsageError(f"config.MODEL.HEAD.PARAMS has {len(heads)} head{'s' * (len(heads) != 1)} for the "
                         f"{len(features)} features of config.MODEL.FEATURE_EVAL_SETTINGS."
                         f"LINEAR_EVAL_FEAT_POOL_OPS_MAP ({', '.join(features)}): give one head per feature")
    inputs = [(f"the trunk's {name} features", trunk.embed_dim * len(trunk.parse_feature_key(name)[1]))
              for name in features]
    for index, head in enumerate(heads):
        source, width = inputs[index] if len(inputs) == len(heads) else inputs[0]
        try:
            output = head(torch.empty(2, width, device="meta"))
        except NotImplementedError:
            return  # an operation without a meta kernel: VISSL will tell on the node
        except (RuntimeError, ValueError) as error:
            raise UsageError(f"config.MODEL.HEAD.PARAMS: head {index} ({kinds[index]}) cannot take {source}, {width} "
                             f"wide ({' '.join(str(error).split())}); make it take (batch, {width}) vectors (mlp: "
                             f"dims [{width}, ...])") from None
        if len(inputs) == 1 and isinstance(output, torch.Tensor) and output.ndim == 2:
            inputs = [(f"head {index}'s output", output.shape[1])]
        elif len(inputs) == 1:
            return  # a head of another output: the ones after it are VISSL's to check


def evaluation_dataset(config, images: str = "", labels: str = ""):
    """VISSL's dataset of ``config``'s TEST section (its transforms, the test split), or of the image and label
    file lists ``images`` and ``labels`` (.npy) read with the same transforms. Items: ``{"data": [image],
    "label": [label], ...}``."""
    import copy

    from vissl.data import build_dataset

    config = copy.deepcopy(config)
    if images:
        test = config["DATA"]["TEST"]
        test["DATA_SOURCES"], test["LABEL_SOURCES"] = ["disk_filelist"], ["disk_filelist"]
        test["DATA_PATHS"], test["LABEL_PATHS"] = [images], [labels]
    return build_dataset(config, "TEST")


def _patch_vissl() -> None:
    """Compatibility patches for VISSL 0.1.6 / classy-vision 0.7.0 on current torch, numpy and Python."""
    # vissl imports pkg_resources and torchvision's deprecated video transforms at import time.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.transforms._(functional|transforms)_video")
    # VISSL's Hydra plugin adds the relative search path file://configs, which exists only in its repo root.
    warnings.filterwarnings("ignore", message="provider=vissl, path=configs is not available")
    # classy-vision scripts a helper with torch.jit.script at import time.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    # VISSL's DINO head builds its prototypes with torch.nn.utils.weight_norm.
    warnings.filterwarnings("ignore", message="`torch.nn.utils.weight_norm` is deprecated", category=FutureWarning)
    import vissl.data.disk_dataset as vissl_disk_dataset
    import vissl.engines.extract_cluster as vissl_extract_cluster
    import vissl.engines.extract_features as vissl_extract_features
    import vissl.engines.train as vissl_train_engine
    import vissl.utils.checkpoint as vissl_checkpoint
    import vissl.utils.env as vissl_env
    from vissl.hooks.log_hooks import LogLossMetricsCheckpointHook

    # VISSL reads disk_folder datasets with torchvision's ImageFolder: it follows link loops into duplicates, and
    # a file PIL cannot read ends the run with an error that does not name it. Ours lists and reads checked.
    vissl_disk_dataset.ImageFolder = VisslImageFolder

    for engine in (vissl_train_engine, vissl_extract_features, vissl_extract_cluster, vissl_env):
        engine.print_system_env_info = _print_reproduction_env

    checkpointer = LogLossMetricsCheckpointHook
    checkpointer._checkpoint_model = _checkpoint_then_prune(checkpointer._checkpoint_model)
    vissl_checkpoint.save_checkpoint = _atomic_save_checkpoint
    vissl_checkpoint.create_file_symlink = _symlink_never_absent
    vissl_checkpoint.get_checkpoint_resume_files = _latest_checkpoint_file
    vissl_checkpoint.has_checkpoint = _has_run_checkpoint
    # A resumed run is the same run (see convit_ssl.resume_hooks.SameRunHook): positional seeds, quiet builders.
    from vissl.data.ssl_dataset import GenericSSLDataset
    from vissl.hooks.dino_hooks import DINOHook
    from vissl.hooks.log_hooks import LogLossLrEtaHook
    from vissl.hooks.moco_hooks import MoCoHook
    from vissl.trainer.train_task import SelfSupervisionTask

    GenericSSLDataset.__getitem__ = _seeded_per_sample(GenericSSLDataset.__getitem__)
    SelfSupervisionTask.set_epoch = _telling_dataset_the_epoch(SelfSupervisionTask.set_epoch)
    DINOHook._build_momentum_network = _random_state_neutral(_teacher_batch_norm_on_cpu(_teacher_without_drop_path(
        DINOHook._build_momentum_network)))
    MoCoHook._build_moco_encoder = _random_state_neutral(_moco_encoder_caught_up(MoCoHook._build_moco_encoder))
    LogLossLrEtaHook.__init__ = _with_durable_step_log(LogLossLrEtaHook.__init__)
    import vissl.trainer.train_task as vissl_train_task

    vissl_train_task.get_optimizer_param_groups = _with_layer_decay(vissl_train_task.get_optimizer_param_groups)
    from vissl.hooks.tensorboard_hook import SSLTensorboardHook

    SSLTensorboardHook.on_update = _tensorboard_logs_the_schedule_lr(SSLTensorboardHook.on_update)
    import vissl.data.ssl_transforms.rand_auto_aug as vissl_rand_augment

    posterize = _posterize_to_zero_bits(vissl_rand_augment.posterize)
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        vissl_rand_augment.NAME_TO_OP[name] = posterize


_REGISTERED = False


def setup() -> None:
    """Apply the patches and register the trunk (done on import; safe to call more than once)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _patch_vissl()
    from vissl.models.trunks import MODEL_TRUNKS_REGISTRY, register_model_trunk

    if "convit_ssl" not in MODEL_TRUNKS_REGISTRY:
        register_model_trunk("convit_ssl")(VisslConViT)
    _REGISTERED = True


setup()
