"""Training hook that records what the gates learn (see ``convit_ssl.diagnostics``).

``GatingDiagnosticsHook`` keeps the first images of the first training batch it sees as a fixed
probe batch. Before the forward pass of every ``frequency``-th update, and at the end of every
training epoch, it measures each GPSA layer's gates and attention distances on that probe batch
and appends one JSON line to ``<checkpoint dir>/gating_metrics.jsonl``:

    {"iteration": 200, "epoch": 1, "probe_images": 16, "grid_size": [14, 14],
     "layers": [{"block": 0, "gates": [...], "positional_distance": [...],
                 "content_distance": [...], "mixed_distance": [...]}, ...]}

``iteration`` counts the optimizer updates applied to the parameters measured (0 = the
initialisation), ``epoch`` is the 0-based training phase. With TensorBoard on, the same numbers go
to ``<checkpoint dir>/tb_logs`` under ``gating/`` and ``attention_distance/``. Only the primary
process (rank 0) measures and writes; it runs the unwrapped trunk (``task.base_model.trunk``, no
DDP) under ``no_grad`` in eval mode and restores every module's mode, so training is unchanged.

This module imports classy_vision, not VISSL; ``build_gating_hook`` reads the config section
``HOOKS.CONVIT_GATING`` (keys ENABLE, FREQUENCY, PROBE_BATCH).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Mapping, Optional

import torch
from classy_vision.generic.distributed_util import is_primary
from classy_vision.hooks.classy_hook import ClassyHook

from convit_ssl.diagnostics import DISTANCE_KINDS, diagnostics_record, gating_diagnostics
from convit_ssl.models.convit import ConViT

_log = logging.getLogger(__name__)

METRICS_FILE = "gating_metrics.jsonl"
TENSORBOARD_DIR = "tb_logs"  # VISSL's own TensorBoard folder inside the checkpoint dir


def _first_images(inputs: Any) -> torch.Tensor:
    """The first image tensor of a VISSL model input: a tensor, a list of crops or a dict of inputs."""
    while not isinstance(inputs, torch.Tensor):
        if isinstance(inputs, Mapping):
            inputs = next(iter(inputs.values()))
        else:  # list of crops (multi-crop) or VISSL's MultiDimensionalTensor: the first (global) crop
            inputs = inputs[0]
    return inputs


class _SelectiveHook(ClassyHook):
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


def _trunk_of(task) -> Any:
    model = task.base_model
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.trunk


class GatingDiagnosticsHook(_SelectiveHook):
    """Every ``frequency`` updates, log gates and attention distances of every GPSA layer and head.

    Args:
        frequency: record before the forward pass of every update whose index is a multiple of it
            (update 0 = the initial parameters), and at the end of every training epoch.
        probe_batch: how many images of the first training batch form the fixed probe batch.
        output_dir: folder of ``gating_metrics.jsonl`` and ``tb_logs``; default: the task's
            checkpoint folder (``task.checkpoint_folder``, set by VISSL's trainer).
        tensorboard: also write TensorBoard scalars.
    """

    def __init__(self, frequency: int, probe_batch: int, output_dir: Optional[str] = None, tensorboard: bool = False):
        super().__init__()
        if frequency < 1 or probe_batch < 1:
            raise ValueError(f"gating hook: FREQUENCY ({frequency}) and PROBE_BATCH ({probe_batch}) must be "
                             f"positive integers; set HOOKS.CONVIT_GATING.ENABLE=False to turn the hook off")
        self.frequency = frequency
        self.probe_batch = probe_batch
        self.output_dir = output_dir
        self.tensorboard = tensorboard
        self.probe: Optional[torch.Tensor] = None
        self.last_iteration: Optional[int] = None
        self.disabled = False
        self._writer = None

    def on_forward(self, task) -> None:
        """Keep the probe batch from the first training batch; record every ``frequency`` updates."""
        if self.disabled or not task.train or not is_primary():
            return
        if self.probe is None:
            self.probe = _first_images(task.last_batch.sample["input"])[: self.probe_batch].detach().clone()
        if task.iteration % self.frequency == 0:
            self._record(task)

    def on_phase_end(self, task) -> None:
        """Record the parameters at the end of a training epoch (the final ones after the last)."""
        if self.disabled or not task.train or not is_primary() or self.probe is None:
            return
        self._record(task)

    def on_end(self, task) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _record(self, task) -> None:
        """Measure the task's trunk on the probe batch and append one record (once per iteration)."""
        if task.iteration == self.last_iteration:
            return
        trunk = _trunk_of(task)
        if not isinstance(trunk, ConViT) or trunk.local_up_to_layer == 0:
            _log.info("gating hook: the trunk has no GPSA layers (%s); nothing to record, hook disabled",
                      type(trunk).__name__)
            self.disabled = True
            return
        diagnostics = gating_diagnostics(trunk, self.probe)
        record = {
            "iteration": int(task.iteration),
            "epoch": int(getattr(task, "train_phase_idx", -1)),
            "probe_images": int(self.probe.shape[0]),
            **diagnostics_record(diagnostics),
        }
        output_dir = self.output_dir or task.checkpoint_folder
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, METRICS_FILE), "a") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self._write_tensorboard(record, output_dir)
        self.last_iteration = task.iteration

    def _write_tensorboard(self, record: dict, output_dir: str) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.path.join(output_dir, TENSORBOARD_DIR))
        step = record["iteration"]
        for layer_number, layer in enumerate(record["layers"], start=1):
            gates = layer["gates"]
            self._writer.add_scalar(f"gating/layer{layer_number}/mean", sum(gates) / len(gates), step)
            for head, gate in enumerate(gates, start=1):
                self._writer.add_scalar(f"gating/layer{layer_number}/head{head}", gate, step)
            for kind in DISTANCE_KINDS:
                values = layer[f"{kind}_distance"]
                self._writer.add_scalar(f"attention_distance/layer{layer_number}/{kind}", sum(values) / len(values),
                                        step)
        self._writer.flush()


def build_gating_hook(config: Mapping, output_dir: Optional[str] = None) -> Optional[GatingDiagnosticsHook]:
    """The gating hook described by ``config.HOOKS.CONVIT_GATING``, or None when it is off or absent.

    Keys (defaults live in the base YAML config): ENABLE (bool), FREQUENCY (updates between
    records), PROBE_BATCH (images in the probe batch). TensorBoard output follows
    ``HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD``. ``output_dir`` defaults to the task's checkpoint folder.
    """
    hooks = config.get("HOOKS", None) or {}
    section = hooks.get("CONVIT_GATING", None) or {}
    if not section.get("ENABLE", False):
        return None
    values = {}
    for key in ("FREQUENCY", "PROBE_BATCH"):
        value = section.get(key, None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"HOOKS.CONVIT_GATING.{key} must be a positive integer, got {value!r}: "
                             f"set it in the config (e.g. FREQUENCY: 100, PROBE_BATCH: 16)")
        values[key] = value
    tensorboard = bool((hooks.get("TENSORBOARD_SETUP", None) or {}).get("USE_TENSORBOARD", False))
    return GatingDiagnosticsHook(frequency=values["FREQUENCY"], probe_batch=values["PROBE_BATCH"],
                                 output_dir=output_dir, tensorboard=tensorboard)


PREEMPTION_MARKER = "preemption_checkpoint.json"


class PreemptionCheckpointHook(_SelectiveHook):
    """Save an iteration checkpoint at the next step after SIGUSR2, the signal SLURM sends before a time limit
    or a preemption (``--signal=USR2@120``), so a requeued run loses only the step in flight.

    Every rank installs the handler; the ranks agree through an all-reduce of the flag at each step (one
    integer), save together through VISSL's checkpoint hook, and rank 0 then writes ``PREEMPTION_MARKER``
    in the run folder (the launcher waits for it before it requeues the job).
    """

    def __init__(self, signum: int = signal.SIGUSR2):
        super().__init__()
        self.requested = False
        self.previous_handler = None
        if threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signum, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = (signum, frame)

    def on_step(self, task) -> None:
        if not task.train:
            return
        flag = torch.tensor([int(bool(self.requested))], device=task.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return
        request, self.requested = self.requested, False
        checkpointer = next(hook for hook in task.hooks if hasattr(hook, "_checkpoint_model"))
        checkpointer._checkpoint_model(task, mode_frequency=1, mode_num=task.iteration, mode="iteration")
        if is_primary():
            marker = os.path.join(task.checkpoint_folder, PREEMPTION_MARKER)
            with open(marker + ".tmp", "w") as stream:
                json.dump({"iteration": task.iteration, "checkpoint": f"model_iteration{task.iteration}.torch"}, stream)
            os.replace(marker + ".tmp", marker)
            logging.info(f"Saved the preemption checkpoint of iteration {task.iteration}")
        # Training in the launcher's own process (one process per node): hand the signal on to the handler it
        # replaced, submitit's, which requeues the job now that the checkpoint exists.
        if request and callable(self.previous_handler):
            self.previous_handler(*request)
