"""``TrainingHealthHook``: the measures of ``convit_ssl.health`` taken as the SSL run trains, written as:

* ``<checkpoint dir>/health.jsonl``: one record every ``frequency`` updates and at the end of each epoch,

      {"iteration": 200, "epoch": 1, "method": "dino_loss", "loss": 9.7, "loss_steps": 20,
       "feature_std": 0.081, "feature_std_healthy": 0.102, "effective_rank": 41.3, "embedding_dim": 96,
       "teacher_entropy": 6.2, "max_entropy": 6.93, "symptoms": {}}

  ``loss`` is the mean per-step loss since the previous record (``loss_steps`` steps); ``feature_std`` and
  ``effective_rank`` are measured on the trunk's features of a fixed probe batch (the first images of the first
  training batch; eval mode, no gradients); ``teacher_entropy`` (DINO only) is the mean entropy of the
  teacher's centred, sharpened distribution over the ``output_dim`` prototypes at the last step, whose
  maximum ``max_entropy`` = ln(output_dim) is the uniform collapse; ``symptoms`` is ``health.symptoms``'s.
* ``train_loss`` and ``train_loss_steps`` added to VISSL's line of the epoch in ``metrics.json``: the method's
  loss per sample averaged over the epoch's steps (each step's loss, as the method defines it, is already a mean
  over the batch's samples and crop pairs; VISSL's ``task.losses`` multiplies it by the batch's target count).
  After a resume inside an epoch, the mean covers the steps after the resume (``train_loss_steps`` says how many).

Each symptom found is logged once as a warning naming it. ``build_health_hook`` reads ``HOOKS.CONVIT_HEALTH``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, List, Mapping, Optional

import torch
import torch.nn.functional as F
from classy_vision.generic.distributed_util import is_primary

from convit_ssl.atomic import write_text
from convit_ssl.errors import UsageError
from convit_ssl.health import effective_rank, feature_std, mean_entropy, symptoms
from convit_ssl.hooks import SelectiveHook, first_images, resumed_checkpoint, trunk_of, truncate_json_lines
from convit_ssl.resume_hooks import preserved_random_state
from convit_ssl.run_folder import EPOCH_LOG, HEALTH_FILE

_log = logging.getLogger(__name__)


def dino_teacher_entropy(loss: Any) -> Optional[tuple]:
    """(mean entropy, ln(K)) of a VISSL DINO loss's teacher distribution for its current ``teacher_output``
    (B x crops, K), centred and sharpened as the loss does; None before the DINO hook has set it."""
    teacher_output = getattr(loss, "teacher_output", None)
    if teacher_output is None:
        return None
    probabilities = F.softmax((teacher_output.detach().float() - loss.center) / loss.teacher_temp, dim=-1)
    return mean_entropy(probabilities), math.log(teacher_output.shape[-1])


def _trunk_features(trunk: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The trunk's (N, D) output features of a batch, in eval mode without gradients; module modes restored."""
    modes = {module: module.training for module in trunk.modules()}
    try:
        trunk.eval()
        with torch.no_grad(), preserved_random_state():
            features = trunk(images)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    features = features[0] if isinstance(features, (list, tuple)) else features
    return features.flatten(1)


def add_to_last_line(path: Path, iteration: int, values: Mapping) -> bool:
    """Merge ``values`` into the last JSON line of ``path`` when its ``iteration`` is ``iteration``; the file is
    replaced atomically. Returns whether it was."""
    if not path.is_file():
        return False
    lines = path.read_text().splitlines()
    try:
        last = json.loads(lines[-1]) if lines else None
    except ValueError:
        return False
    if not isinstance(last, dict) or last.get("iteration") != iteration:
        return False
    lines[-1] = json.dumps({**last, **values})
    write_text("\n".join(lines) + "\n", path)
    return True


class TrainingHealthHook(SelectiveHook):
    """Every ``frequency`` updates and at each epoch's end, append a health record and warn once per symptom.

    Args:
        frequency: updates between records.
        probe_batch: how many images of the first training batch form the fixed probe batch.
        loss_window: how many consecutive records of a rising loss make the symptom (Barlow Twins, SwAV).
        output_dir: folder of ``health.jsonl``; default: the task's checkpoint folder.
    """

    def __init__(self, frequency: int, probe_batch: int, loss_window: int, output_dir: Optional[str] = None):
        super().__init__()
        self.frequency, self.probe_batch, self.loss_window, self.output_dir = frequency, probe_batch, loss_window, \
            output_dir
        self.probe: Optional[torch.Tensor] = None
        self.losses: List[float] = []  # every record's loss, for the rising-loss check
        self.first: Optional[tuple] = None  # (feature_std, effective_rank) of the run's first record
        self.warned: set = set()
        self._since_record: List[float] = []
        self._epoch: List[tuple] = []  # (loss, images) of this epoch's steps
        self._teacher: Optional[tuple] = None
        self._batch_images = 0
        self._choices = 0  # what the loss's softmax chooses among: SwAV's prototypes, MoCo's key and queue
        self._embedding: Optional[torch.Tensor] = None  # the head's output of the last step, (B x crops, D)

    def _folder(self, task) -> Path:
        return Path(self.output_dir or task.checkpoint_folder)

    def on_start(self, task) -> None:
        """On resume, keep the records up to the checkpoint and read their losses back; in a fresh run, drop every
        record (a run killed before its first checkpoint wrote them; this one starts over)."""
        if not is_primary():
            return
        resumed = resumed_checkpoint(task)
        iteration = resumed.iteration if resumed is not None else -1
        path = self._folder(task) / HEALTH_FILE
        truncate_json_lines(path, lambda record: record["iteration"] <= iteration)
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        self.losses = [record["loss"] for record in records]
        if records:
            self.first = (records[0]["feature_std"], records[0]["effective_rank"])

    def on_phase_start(self, task) -> None:
        self._epoch = []

    def on_forward(self, task) -> None:
        if not task.train or not is_primary():
            return
        images = first_images(task.last_batch.sample["input"])
        if self.probe is None:
            self.probe = images[: self.probe_batch].detach().clone()
        output = task.last_batch.model_output
        self._embedding = (output[0] if isinstance(output, (list, tuple)) else output).detach()
        if task.config["LOSS"]["name"] == "dino_loss":
            self._teacher = dino_teacher_entropy(task.loss)
        if task.config["LOSS"]["name"] == "swav_loss":  # output: [embeddings, prototype scores (B x crops, K)]
            self._choices = int(output[-1].shape[-1])
        if task.config["LOSS"]["name"] == "moco_loss":  # the queue: embedding_dim x queue_size
            self._choices = int(task.loss.queue.shape[1]) + 1
        self._batch_images = int(images.shape[0])

    def on_loss_and_meter(self, task) -> None:
        if not task.train or not is_primary():
            return
        loss = float(task.last_batch.loss)
        self._since_record.append(loss)
        self._epoch.append((loss, self._batch_images))

    def on_update(self, task) -> None:
        """Record after every ``frequency``-th update (VISSL counts the update in ``task.iteration`` after it)."""
        if task.train and is_primary() and (task.iteration + 1) % self.frequency == 0:
            self._record(task, task.iteration + 1)

    def on_phase_end(self, task) -> None:
        """Record (when steps ran since the last record) and add the epoch's loss to VISSL's metrics.json line,
        which VISSL's own hook, run before ours, has just written."""
        if not task.train or not is_primary() or not self._epoch:
            return
        if self._since_record:
            self._record(task, task.iteration)
        images = sum(count for _, count in self._epoch)
        train_loss = sum(loss * count for loss, count in self._epoch) / images
        add_to_last_line(self._folder(task) / EPOCH_LOG, task.iteration,
                         {"train_loss": train_loss, "train_loss_steps": len(self._epoch)})

    def _record(self, task, updates: int) -> None:
        """Append the record of the parameters after ``updates`` updates."""
        if not self._since_record or self.probe is None:
            return
        loss = sum(self._since_record) / len(self._since_record)
        self.losses.append(loss)
        embedding = self._embedding.float()
        std, rank, width = feature_std(embedding), effective_rank(embedding), embedding.shape[1]
        trunk_features = _trunk_features(trunk_of(task), self.probe)
        method = task.config["LOSS"]["name"]
        record = {"iteration": int(updates), "epoch": int(getattr(task, "train_phase_idx", -1)),
                  "method": method, "loss": loss, "loss_steps": len(self._since_record),
                  "feature_std": std, "feature_std_healthy": 1 / math.sqrt(width),
                  "effective_rank": rank, "embedding_dim": int(width),
                  "trunk_feature_std": feature_std(trunk_features),
                  "trunk_effective_rank": effective_rank(trunk_features),
                  "trunk_dim": int(trunk_features.shape[1])}
        entropy, max_entropy = self._teacher if self._teacher is not None else (None, None)
        if self._choices:
            max_entropy = math.log(self._choices)
            record["max_entropy"] = max_entropy
        if entropy is not None:
            record.update(teacher_entropy=entropy, max_entropy=max_entropy)
        self.first = self.first or (std, rank)
        found = symptoms(method, self.losses, std, rank, width, self.loss_window, entropy, max_entropy, self.first)
        record["symptoms"] = found
        self._since_record = []
        folder = self._folder(task)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / HEALTH_FILE, "a") as stream:
            stream.write(json.dumps(record) + "\n")
        for kind, sentence in found.items():
            if kind not in self.warned:
                self.warned.add(kind)
                _log.warning("collapse? after %d updates: %s", updates, sentence)


def build_health_hook(config: Mapping, output_dir: Optional[str] = None) -> Optional[TrainingHealthHook]:
    """The hook described by ``config.HOOKS.CONVIT_HEALTH`` (ENABLE, FREQUENCY, PROBE_BATCH, LOSS_WINDOW), or
    None when it is off or absent."""
    section = (config.get("HOOKS", None) or {}).get("CONVIT_HEALTH", None) or {}
    if not section.get("ENABLE", False):
        return None
    values = {}
    for key, least in (("FREQUENCY", 1), ("PROBE_BATCH", 2), ("LOSS_WINDOW", 2)):
        value = section.get(key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsageError(f"HOOKS.CONVIT_HEALTH.{key} must be an integer >= {least}, got {value!r}: set it in "
                             f"the config (e.g. FREQUENCY: 20, PROBE_BATCH: 64, LOSS_WINDOW: 5) or ENABLE: False")
        values[key] = value
    return TrainingHealthHook(frequency=values["FREQUENCY"], probe_batch=values["PROBE_BATCH"],
                              loss_window=values["LOSS_WINDOW"], output_dir=output_dir)
