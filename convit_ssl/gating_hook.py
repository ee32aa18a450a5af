"""The gating hook: what the gates of every GPSA layer learn during training.

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

``build_gating_hook`` reads the config section ``HOOKS.CONVIT_GATING`` (keys ENABLE, FREQUENCY, PROBE_BATCH).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from classy_vision.generic.distributed_util import is_primary

from convit_ssl.diagnostics import DISTANCE_KINDS, diagnostics_record, gating_diagnostics
from convit_ssl.errors import UsageError
from convit_ssl.hooks import SelectiveHook, first_images, resumed_checkpoint, trunk_of, truncate_json_lines
from convit_ssl.models.convit import ConViT
from convit_ssl.run_folder import METRICS_FILE, TENSORBOARD_DIR

_log = logging.getLogger(__name__)


class GatingDiagnosticsHook(SelectiveHook):
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
            raise UsageError(f"gating hook: FREQUENCY ({frequency}) and PROBE_BATCH ({probe_batch}) must be "
                             f"positive integers; set HOOKS.CONVIT_GATING.ENABLE=False to turn the hook off")
        self.frequency = frequency
        self.probe_batch = probe_batch
        self.output_dir = output_dir
        self.tensorboard = tensorboard
        self.probe: Optional[torch.Tensor] = None
        self.last_iteration: Optional[int] = None
        self.disabled = False
        self._writer = None

    def on_start(self, task) -> None:
        """Cut the log back to where the run starts. On resume, drop the records after the checkpoint (the
        killed run wrote them; they come again) and do not record the checkpoint's iteration twice; in a fresh
        run, drop every record (a run killed before its first checkpoint wrote them; this one starts over)."""
        if not is_primary():
            return
        resumed = resumed_checkpoint(task)
        iteration = resumed.iteration if resumed is not None else -1
        path = Path(self.output_dir or task.checkpoint_folder) / METRICS_FILE
        truncate_json_lines(path, lambda record: record["iteration"] <= iteration)
        records = path.read_text().splitlines() if path.is_file() else []
        if records and json.loads(records[-1])["iteration"] == iteration:
            self.last_iteration = iteration

    def on_forward(self, task) -> None:
        """Keep the probe batch from the first training batch; record every ``frequency`` updates."""
        if self.disabled or not task.train or not is_primary():
            return
        if self.probe is None:
            self.probe = first_images(task.last_batch.sample["input"])[: self.probe_batch].detach().clone()
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
        trunk = trunk_of(task)
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
            raise UsageError(f"HOOKS.CONVIT_GATING.{key} must be a positive integer, got {value!r}: "
                             f"set it in the config (e.g. FREQUENCY: 100, PROBE_BATCH: 16)")
        values[key] = value
    tensorboard = bool((hooks.get("TENSORBOARD_SETUP", None) or {}).get("USE_TENSORBOARD", False))
    return GatingDiagnosticsHook(frequency=values["FREQUENCY"], probe_batch=values["PROBE_BATCH"],
                                 output_dir=output_dir, tensorboard=tensorboard)
