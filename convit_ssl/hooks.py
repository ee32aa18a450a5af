"""What our training hooks share: a hook that ignores the events it does not need, the trunk of a task, the
first images of a batch, where a resumed run starts from (``resumed_checkpoint``: every hook asks it), and cutting
a JSON-lines log back. The hooks themselves: ``gating_hook`` (what the gates learn), ``resume_hooks`` (checkpoints
on signals, resumed runs that are the same run), ``health_hook`` (training health), ``finetune_hook``.

This module and the hooks import classy_vision (the hook class VISSL's trainer calls), not VISSL.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from classy_vision.generic.distributed_util import is_primary
from classy_vision.hooks.classy_hook import ClassyHook


def first_images(inputs: Any) -> torch.Tensor:
    """The first image tensor of a VISSL model input: a tensor, a list of crops or a dict of inputs."""
    while not isinstance(inputs, torch.Tensor):
        if isinstance(inputs, Mapping):
            inputs = next(iter(inputs.values()))
        else:  # list of crops (multi-crop) or VISSL's MultiDimensionalTensor: the first (global) crop
            inputs = inputs[0]
    return inputs


@dataclass(frozen=True)
class ResumePoint:
    """Where the checkpoint of a resumed run left off: ``iteration``, the updates it holds, and ``last_epoch``, the
    index of the last training epoch it completed (-1 for a checkpoint saved within the first epoch)."""

    iteration: int
    last_epoch: int


def resumed_checkpoint(task) -> Optional[ResumePoint]:
    """Where a resumed run starts from (VISSL's ``task.checkpoint``, loaded before the hooks start), in the primary
    process (the one that writes the logs); None in a fresh run and in the other processes. A killed run's logs go
    past it: cut them back."""
    checkpoint = getattr(task, "checkpoint", None)
    if checkpoint is None or not is_primary():
        return None
    return ResumePoint(iteration=checkpoint["iteration"], last_epoch=checkpoint["train_phase_idx"])


def truncate_json_lines(path: Path, keep) -> int:
    """Cut a JSON-lines file before its first line that ``keep(record)`` rejects, does not parse or has no
    newline (a write cut short by a kill). One truncate call: the kept lines are never rewritten, and an
    append-mode stream open on the file goes on writing at its new end. Returns the lines dropped."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    offset = 0
    for line in data.splitlines(keepends=True):
        try:
            kept = line.endswith(b"\n") and keep(json.loads(line))
        except ValueError:
            kept = False
        if not kept:
            break
        offset += len(line)
    if offset == len(data):
        return 0
    dropped = data[offset:].count(b"\n") + (not data.endswith(b"\n"))
    os.truncate(path, offset)
    return dropped


class SelectiveHook(ClassyHook):
    """A hook that does nothing at each of the events VISSL's trainer calls; subclasses override the ones
    they need (VISSL calls on_forward, on_loss_and_meter, on_backward and on_update besides classy's)."""

    on_start = ClassyHook._noop
    on_phase_start = ClassyHook._noop
    on_forward = ClassyHook._noop
    on_loss_and_meter = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_update = ClassyHook._noop
    on_step = ClassyHook._noop
    on_phase_end = ClassyHook._noop
    on_end = ClassyHook._noop


def trunk_of(task) -> Any:
    model = task.base_model
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.trunk
