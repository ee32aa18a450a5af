"""Checkpoint interop: timm / official ConViT, timm DeiT/ViT, DINO-style and VISSL checkpoints.

Our parameter names differ from timm's in four places (chosen so that VISSL's
``non_regularized_parameters: [pos_embedding, class_token]`` matches, and so the names say what they are):

    timm / official            convit_ssl
    pos_embed                  pos_embedding
    cls_token                  class_token
    blocks.i.attn.gating_param blocks.i.attn.gating
    blocks.i.attn.pos_proj.*   blocks.i.attn.positional_proj.*

Everything else (patch_embed.proj, blocks.i.{norm1,attn.qk,attn.v,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm)
is shared. The classifier (``head.*``) is not part of a trunk: it is dropped on import and reported.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from convit_ssl import atomic
from convit_ssl.errors import UsageError
from convit_ssl.models.convit import PRESETS, ConViT, create_trunk, mlp_ratio_of
from convit_ssl.run_folder import CONFIG_FILE, LATEST_LINK, LATEST_RULE, recorded_config, run_checkpoint
from convit_ssl.trunk_config import trunk_kwargs

_TIMM_TO_OURS = [
    (re.compile(r"^pos_embed$"), "pos_embedding"),
    (re.compile(r"^cls_token$"), "class_token"),
    (re.compile(r"^(blocks\.\d+\.attn\.)gating_param$"), r"\1gating"),
    (re.compile(r"^(blocks\.\d+\.attn\.)pos_proj\.(weight|bias)$"), r"\1positional_proj.\2"),
]
_OURS_TO_TIMM = [
    (re.compile(r"^pos_embedding$"), "pos_embed"),
    (re.compile(r"^class_token$"), "cls_token"),
    (re.compile(r"^(blocks\.\d+\.attn\.)gating$"), r"\1gating_param"),
    (re.compile(r"^(blocks\.\d+\.attn\.)positional_proj\.(weight|bias)$"), r"\1pos_proj.\2"),
]
# Keys of timm models that a trunk has no use for: the classifier and timm's distillation extras.
_DROPPED = re.compile(r"^(head|head_dist|fc_norm)\.")
_WRAPPER_PREFIXES = ("module.", "backbone.", "trunk.", "encoder.", "model.")
# What real checkpoints hold besides tensors and plain containers, admitted by torch.load(weights_only=True):
# official ConViT/DeiT (main.py) and DINO training checkpoints pickle the run's argparse.Namespace.
CHECKPOINT_GLOBALS = (argparse.Namespace,)


class CheckpointError(UsageError):
    """A checkpoint that cannot be read as a ConViT/DeiT trunk; the message says why and what to do."""


class HeadCountUnknown(CheckpointError):
    """A trunk of plain attention blocks whose head count neither a preset nor the caller gives (shapes do not)."""


@dataclass
class LoadReport:
    """What a load did: how many tensors were mapped, which source keys were dropped and why."""

    arch: Optional[str]
    mapped: int
    dropped: List[str] = field(default_factory=list)
    source_format: str = "timm"
    file: Optional[Path] = None
    part: str = ""  # which of the file's networks, where it holds several: "DINO teacher", "model weights, not ..."

    def __str__(self) -> str:
        dropped = f"; dropped (not part of a trunk): {', '.join(self.dropped)}" if self.dropped else ""
        part = f", the {self.part}" if self.part else ""
        return f"loaded {self.mapped} tensors ({self.source_format} format{part}, arch {self.arch}){dropped}"


def _rename(key: str, table) -> str:
    for pattern, replacement in table:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP ``module.``, DINO ``backbone.``, ...) shared by every key but a head's: DINO's
    ``MultiCropWrapper`` holds ``backbone.*`` beside its ``head.*``, which then drops like a classifier."""
    state = dict(state_dict)
    changed = True
    while changed and state:
        changed = False
        wrapped = [key for key in state if not _DROPPED.match(key)] or list(state)
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in wrapped):
                state = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
                changed = True
                break
    return state


def _infer_kwargs(state: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """Model keyword arguments read from the shapes of a timm-layout state dict."""
    missing = [key for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight") if key not in state]
    if missing or state["patch_embed.proj.weight"].dim() != 4:
        problem = (f"no {', '.join(missing)} among {len(state)} keys" if missing else
                   f"patch_embed.proj.weight {tuple(state['patch_embed.proj.weight'].shape)} is not a convolution's")
        raise CheckpointError(
            f"not a ConViT/DeiT state dict: {problem} (first keys: {', '.join(list(state)[:5])}); pass a timm "
            f"ConViT/DeiT or convit_ssl checkpoint"
        )
    embed_dim, _, patch_size, _ = state["patch_embed.proj.weight"].shape
    block_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
    depth = len(block_ids)
    gpsa = [i for i in block_ids if f"blocks.{i}.attn.gating_param" in state]
    num_positions = state["pos_embed"].shape[1]
    kwargs: Dict[str, object] = dict(
        embed_dim=embed_dim, patch_size=patch_size, depth=depth, local_up_to_layer=len(gpsa),
        mlp_ratio=mlp_ratio_of(state["blocks.0.mlp.fc1.weight"].shape[0], embed_dim),
    )
    if gpsa:
        kwargs["num_heads"] = state[f"blocks.{gpsa[0]}.attn.gating_param"].shape[0]
        kwargs["qkv_bias"] = f"blocks.{gpsa[0]}.attn.qk.bias" in state
    else:
        kwargs["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
        kwargs["pos_embed_class_token"] = int(round((num_positions - 1) ** 0.5)) ** 2 == num_positions - 1
    grid = int(round((num_positions - int(kwargs.get("pos_embed_class_token", False))) ** 0.5))
    kwargs["img_size"] = grid * patch_size
    return kwargs


# Shape fields that no preset fixes: a checkpoint matched to a preset keeps its own.
_FREE_SHAPE_FIELDS = ("img_size", "patch_size", "mlp_ratio")


def _match_preset(kwargs: Mapping[str, object]) -> Optional[str]:
    shape_fields = ("embed_dim", "depth", "local_up_to_layer", "qkv_bias", "num_heads", "pos_embed_class_token")
    for name, preset in PRESETS.items():
        preset = {"pos_embed_class_token": False, **preset}
        if all(kwargs[key] == preset[key] for key in shape_fields if key in kwargs):
            return name
    return None


def from_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], arch: Optional[str] = None, **overrides
) -> Tuple[ConViT, LoadReport]:
    """Build a trunk from a timm ``convit_*`` or ``deit_*``/``vit_*`` state dict (any patch size).

    ``arch=None`` infers the preset from the tensor shapes (for DeiT/ViT the width picks the
    preset, since heads leave no trace in the shapes; pass ``arch`` or ``num_heads`` otherwise).
    Returns the trunk and a report; raises ``CheckpointError`` listing missing, unexpected and
    mis-shaped keys.
    """
    state = _strip_prefixes(state_dict)
    dropped = sorted(key for key in state if _DROPPED.match(key))
    state = {key: value for key, value in state.items() if not _DROPPED.match(key)}
    inferred = _infer_kwargs(state)
    arch = arch or _match_preset(inferred)
    if arch is None:
        if "num_heads" not in inferred and "num_heads" not in overrides:
            raise HeadCountUnknown(
                f"no preset has width {inferred['embed_dim']} and depth {inferred['depth']}, and the number of "
                f"heads of plain attention blocks cannot be read from shapes: pass num_heads=..."
            )
        base = "convit_tiny" if inferred["local_up_to_layer"] else "deit_tiny"
        trunk = create_trunk(base, **{**inferred, **overrides})
        arch_name = f"custom ({base} layout)"
    else:
        unset = {key: inferred[key] for key in _FREE_SHAPE_FIELDS}  # a preset leaves these to the checkpoint
        trunk = create_trunk(arch, **{**unset, **overrides})
        arch_name = arch
    ours = {_rename(key, _TIMM_TO_OURS): value for key, value in state.items()}
    mapped = load_trunk_state(trunk, ours, source="timm")
    return trunk, LoadReport(arch=arch_name, mapped=mapped, dropped=dropped, source_format="timm")


def load_trunk_state(trunk: ConViT, state: Mapping[str, torch.Tensor], source: str = "convit_ssl") -> int:
    """Strict load that names every missing, unexpected and mis-shaped key; returns the number loaded."""
    misfit = describe_misfit({key: tuple(value.shape) for key, value in trunk.state_dict().items()},
                             {key: tuple(value.shape) for key, value in state.items()})
    if misfit:
        raise CheckpointError(
            f"{source} checkpoint does not fit the trunk ({misfit}); check the arch and its "
            f"overrides (embed_dim, depth, num_heads, local_up_to_layer) against the checkpoint"
        )
    trunk.load_state_dict(state, strict=True)
    return len(state)


def describe_misfit(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, Tuple[int, ...]]) -> str:
    """How the tensor shapes ``found`` (a checkpoint's, ``{name: shape}``) differ from the ``expected`` ones (a
    model's): 'missing: ...; unexpected: ...; mis-shaped (checkpoint vs model): ...', each list sorted and cut at 12
    names; '' when they are the same."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{key} {found[key]} vs {expected[key]}" for key in set(found) & set(expected)
                       if found[key] != expected[key])
    problems = []
    labelled = (("missing", missing), ("unexpected", unexpected), ("mis-shaped (checkpoint vs model)", misshaped))
    for label, keys in labelled:
        if keys:
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
            problems.append(f"{label}: {shown}")
    return "; ".join(problems)


def to_timm_state_dict(trunk: ConViT) -> Dict[str, torch.Tensor]:
    """timm keys for every trunk tensor (timm ``ConVit`` or ``VisionTransformer`` layout).

    A timm model of the same size loads it with ``strict=False``, reporting only its classifier
    (``head.*``) as missing, which a fine-tuning run initialises anyway.
    """
    return {_rename(key, _OURS_TO_TIMM): value.detach().clone() for key, value in trunk.state_dict().items()}


# Where a VISSL checkpoint keeps its model (then "trunk" or "heads" inside).
_VISSL_MODEL_KEYS = ("classy_state_dict", "base_model", "model")


def vissl_trunk_state(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The trunk's state dict inside a VISSL checkpoint (training checkpoint or extracted model)."""
    node = checkpoint
    for key in (*_VISSL_MODEL_KEYS, "trunk"):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
    if not isinstance(node, Mapping) or not node or not all(isinstance(v, torch.Tensor) for v in node.values()):
        raise CheckpointError("not a VISSL checkpoint: no classy_state_dict/base_model/model/trunk tensors inside")
    return _strip_prefixes(node)


# Where VISSL's DINO loss keeps the teacher in a training checkpoint's classy_state_dict.loss (DDP wraps it in module.)
_VISSL_TEACHER_PREFIXES = ("momentum_teacher.module.trunk.", "momentum_teacher.trunk.")


def vissl_teacher_state(checkpoint: Mapping) -> Optional[Dict[str, torch.Tensor]]:
    """The DINO teacher's trunk state dict inside a VISSL training checkpoint, or None when it holds none."""
    state = checkpoint.get("classy_state_dict")
    loss = state.get("loss") if isinstance(state, Mapping) else None
    if not isinstance(loss, Mapping):
        return None
    for prefix in _VISSL_TEACHER_PREFIXES:
        teacher = {key[len(prefix):]: value for key, value in loss.items()
                   if key.startswith(prefix) and isinstance(value, torch.Tensor)}
        if teacher:
            return teacher
    return None


def vissl_model_shapes(path: str | os.PathLike) -> Dict[str, Dict[str, Tuple[int, ...]]]:
    """``{"trunk": {name: shape}, "heads": {name: shape}}`` of the VISSL checkpoint file ``path``, read where VISSL's
    loader reads them (``classy_state_dict/base_model/model``); a part the file lacks is {}."""
    # memory-mapped when the format allows it: only the shapes are read, not a trunk's or optimizer's tensors
    model = load_checkpoint_file(path, mmap=zipfile.is_zipfile(path))
    for key in _VISSL_MODEL_KEYS:
        model = model.get(key, {}) if isinstance(model, Mapping) else {}
    parts = {part: model.get(part) if isinstance(model, Mapping) else None for part in ("trunk", "heads")}
    return {part: {name: tuple(value.shape) for name, value in tensors.items() if isinstance(value, torch.Tensor)}
            if isinstance(tensors, Mapping) else {} for part, tensors in parts.items()}


def _unsafe_globals(path: Path, error: Exception) -> List[str]:
    """The globals of a checkpoint that ``weights_only`` loading refused, read without running the pickle."""
    allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in CHECKPOINT_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # only zip-format files can be scanned; the error names the first offender
        found = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return [name for name in found if name not in allowed]


def load_checkpoint_file(path: str | os.PathLike, mmap: bool = False) -> object:
    """``torch.load`` on the CPU that never runs code from the file: tensors, containers and ``CHECKPOINT_GLOBALS``.

    ``mmap``: map the tensors' storage instead of reading it (zip-format files only, torch's default since 1.6).
    Raises ``CheckpointError`` in one line naming the file and, for a pickle that needs anything else, the
    offending globals.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        offending = _unsafe_globals(path, error) if "Weights only load failed" in str(error) else []
        if offending:
            raise CheckpointError(
                f"checkpoint {path} was refused, nothing in it was run: its pickle needs {', '.join(offending)}, "
                f"which loading would call, and a checkpoint holds only tensors, containers and argparse.Namespace; "
                f"if you trust the file, re-save its state dict with torch.save(state_dict, path)")
        raise CheckpointError(f"checkpoint {path} cannot be read by torch.load ({_one_line(error)})")
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read by torch.load ({_one_line(error)})")


def _one_line(error: Exception) -> str:
    """``Type: message`` of a torch.load error on one line (for weights_only errors, only the unpickler's reason)."""
    text = str(error)
    reason = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.DOTALL)
    return f"{type(error).__name__}: {' '.join((reason.group(1) if reason else text).split())}"


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file that ``path`` names: the file itself, or a run folder's ``run_checkpoint``.

    Anything else raises ``CheckpointError`` in one line saying what ``path`` is (a folder and what it holds, a
    broken link, not a regular file, missing).
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = run_checkpoint(path)
        if latest is not None:
            return latest
        held = sorted(p.name for p in path.iterdir() if p.suffix in (".torch", ".pth", ".pt") and p.is_file())
        if held:
            raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file: it holds "
                                  f"{', '.join(held[:3])}{', ...' if len(held) > 3 else ''}; pass one of them")
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file, and holds no checkpoint "
                              f"({LATEST_LINK} or model_*.torch): pass a .torch or .pth file, or a run folder")
    if path.is_symlink():
        raise CheckpointError(f"checkpoint {path} is a link to {os.readlink(path)}, which is missing: pass an "
                              f"existing checkpoint")
    if path.exists():
        raise CheckpointError(f"checkpoint {path} is not a regular file: pass a .torch or .pth file")
    raise CheckpointError(f"checkpoint {path} does not exist: pass the path of a .torch or .pth file")


def run_folder_note(path: str | os.PathLike, file: Path) -> Optional[str]:
    """For a run folder given as a checkpoint, the line that says which of its checkpoints stands for it."""
    if not Path(path).is_dir():
        return None
    target = f" -> {os.readlink(file)}" if file.is_symlink() else ""
    return f"{path} is a run folder: using its latest checkpoint {file}{target} ({LATEST_RULE})"


# What ``network=`` (``--network``) can ask for; without it a DINO run gives its teacher, anything else its model.
NETWORKS = ("student", "ema")


def _file_networks(checkpoint: Mapping) -> Tuple[str, str, Dict[Optional[str], Callable[[], Tuple[Mapping, str]]]]:
    """(format, what the file holds in words, {None: the default network, "student"/"ema": those it also holds})
    of a loaded checkpoint; each network is read when called, as (state dict, the report's part)."""
    if "classy_state_dict" in checkpoint or "trunk" in checkpoint:
        teacher = vissl_teacher_state(checkpoint)
        if teacher is None:
            return "vissl", "its model only", {None: lambda: (vissl_trunk_state(checkpoint), "")}
        return "vissl", "a DINO teacher and its student", {
            None: lambda: (teacher, "DINO teacher"), "student": lambda: (vissl_trunk_state(checkpoint), "DINO student")}
    if "teacher" in checkpoint:
        networks = {None: lambda: (checkpoint["teacher"], "DINO teacher")}
        if isinstance(checkpoint.get("student"), Mapping):
            networks["student"] = lambda: (checkpoint["student"], "DINO student")
        return "dino", f"a DINO teacher{' and its student' if 'student' in networks else ' only'}", networks
    # DeiT's and ConViT's main.py save {"model", "model_ema"}, timm's train.py {"state_dict", "state_dict_ema"}
    weights = next((key for key in ("model", "state_dict") if isinstance(checkpoint.get(key), Mapping)), None)
    fmt = "official" if weights == "model" else "state_dict"
    ema = f"{weights}_ema"
    if weights is None or not isinstance(checkpoint.get(ema), Mapping):
        return fmt, "its model only", {None: lambda: (checkpoint[weights] if weights else checkpoint, "")}
    return fmt, "its model and their EMA", {
        None: lambda: (checkpoint[weights], f"{weights} weights, not the EMA in {ema}"),
        "ema": lambda: (checkpoint[ema], f"EMA weights in {ema}")}


def read_checkpoint(path: str | os.PathLike, network: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """Load a checkpoint file and return (timm-layout state dict, format name, the network read where the file
    holds several: "DINO teacher", "EMA weights in model_ema", ..., else "").

    Formats: VISSL (``classy_state_dict``), official ConViT/DeiT (``{"model": ...}``), DINO
    (``{"teacher": ...}``), convit_ssl or timm state dicts; a run folder is read as its ``run_checkpoint``. A DINO
    training checkpoint, VISSL's or DINO's own, gives its teacher, as DINO's evaluations and paper do (the teacher
    does better than the student); a training checkpoint with an EMA of its weights (``model_ema``,
    ``state_dict_ema``) gives the trained weights, and the part says the EMA was left. ``network`` (one of
    ``NETWORKS``) asks for the student or the EMA instead. Raises ``CheckpointError`` with a one-line reason for a
    missing file, an unknown layout or a network the file does not hold.
    """
    if network is not None and network not in NETWORKS:
        raise CheckpointError(f"network {network!r} is not one of {', '.join(NETWORKS)}: leave it out for the file's "
                              f"own (a DINO run's teacher, else its model)")
    path = checkpoint_file(path)
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    fmt, held, networks = _file_networks(checkpoint)
    if network not in networks:
        default = "its DINO teacher" if held.startswith("a DINO teacher") else "its model"
        raise CheckpointError(f"checkpoint {path} holds no {network} ({fmt} format, {held}): leave --network out to "
                              f"read {default}")
    state, part = networks[network]()
    state = {key: value for key, value in _strip_prefixes(state).items() if isinstance(value, torch.Tensor)}
    # VISSL and convit_ssl checkpoints carry our names; bring them to timm's layout.
    return {_rename(key, _OURS_TO_TIMM): value for key, value in state.items()}, fmt, part


def run_trunk_kwargs(path: str | os.PathLike) -> Optional[Dict[str, object]]:
    """The trunk's keyword arguments from the ``train_config.yaml`` VISSL writes beside its checkpoints.

    Shapes cannot tell the number of heads of plain attention blocks (a DeiT twin); the run's config can.
    """
    config = recorded_config(Path(path).parent)
    if config is None:
        return None
    model = config.get("MODEL", {})
    if model.get("TRUNK", {}).get("NAME") != "convit_ssl":
        return None
    return trunk_kwargs(model)


def load_trunk(path: str | os.PathLike, arch: Optional[str] = None, network: Optional[str] = None,
               **overrides) -> Tuple[ConViT, LoadReport]:
    """Trunk from any supported checkpoint file (see ``read_checkpoint``, and its ``network``).

    For a checkpoint in a VISSL run folder, the model is the one the run's config describes (unless ``arch``
    or overrides are given); otherwise it is inferred from the tensor shapes. A run folder stands for its
    ``run_checkpoint``; ``report.file`` is the file read.
    """
    path = checkpoint_file(path)
    state, fmt, part = read_checkpoint(path, network)
    run_kwargs = run_trunk_kwargs(path) if fmt == "vissl" and arch is None and not overrides else None
    if run_kwargs is not None:
        trunk = ConViT(**run_kwargs)
        ours = {_rename(key, _TIMM_TO_OURS): value for key, value in state.items()}
        report = LoadReport(arch="from the run's train_config.yaml", mapped=load_trunk_state(trunk, ours, "vissl"))
    else:
        trunk, report = from_timm_state_dict(state, arch=arch, **overrides)
    report.source_format, report.file, report.part = fmt, path, part
    return trunk, report


def export_timm(checkpoint: str | os.PathLike, out: str | os.PathLike, arch: Optional[str] = None,
                network: Optional[str] = None) -> LoadReport:
    """Write the trunk of ``checkpoint`` (VISSL or other, or a run folder) as a timm state dict at ``out``.

    ``out`` is written atomically and is never one of the export's inputs (the checkpoint, through any link, and
    the run's ``train_config.yaml``): that raises ``CheckpointError`` before anything is read. A head count that
    neither the shapes nor a run's config give is not needed: the tensors are the same for any.
    """
    source, out = checkpoint_file(checkpoint), Path(out)
    if out.is_dir():
        raise CheckpointError(f"output {out} is a folder: pass a file name for the output, e.g. "
                              f"{out / (source.stem + '_timm.pth')}")
    inputs = [path for path in (source, source.parent / CONFIG_FILE) if path.exists()]
    same = [path for path in inputs if out.exists() and os.path.samefile(out, path)]
    if same:
        raise CheckpointError(f"output {out} is an input of the export (the same file as {same[0]}): pass "
                              f"another output path, e.g. {source.parent / (source.stem + '_timm.pth')}")
    try:
        trunk, report = load_trunk(source, arch=arch, network=network)
    except HeadCountUnknown:  # timm's model sets the head count; one head only checks the tensors' fit
        trunk, report = load_trunk(source, arch=arch, network=network, num_heads=1)
    atomic.torch_save(to_timm_state_dict(trunk), out)
    return report
