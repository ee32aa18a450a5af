"""Is the SSL run learning or collapsing? Per-sample training loss and collapse symptoms, measured as it trains.

Pure functions first (each on plain tensors or lists, hand-checkable), then ``TrainingHealthHook``, which runs
them during training and writes:

* ``<checkpoint dir>/health.jsonl``: one record every ``frequency`` updates and at the end of each epoch,

      {"iteration": 200, "epoch": 1, "method": "dino_loss", "loss": 9.7, "loss_steps": 20,
       "feature_std": 0.081, "feature_std_healthy": 0.102, "effective_rank": 41.3, "embedding_dim": 96,
       "teacher_entropy": 6.2, "max_entropy": 6.93, "symptoms": {}}

  ``loss`` is the mean per-step loss since the previous record (``loss_steps`` steps); ``feature_std`` and
  ``effective_rank`` are measured on the trunk's features of a fixed probe batch (the first images of the first
  training batch; eval mode, no gradients); ``teacher_entropy`` (DINO only) is the mean entropy of the
  teacher's centred, sharpened distribution over the ``output_dim`` prototypes at the last step, whose
  maximum ``max_entropy`` = ln(output_dim) is the uniform collapse.
* ``train_loss`` and ``train_loss_steps`` added to VISSL's line of the epoch in ``metrics.json``: the method's
  loss per sample averaged over the epoch's steps (each step's loss, as the method defines it, is already a mean
  over the batch's samples and crop pairs; VISSL's ``task.losses`` multiplies it by the batch's target count).
  After a resume inside an epoch, the mean covers the steps after the resume (``train_loss_steps`` says how many).

  ``symptoms`` maps each symptom found at that record to the sentence naming it (``symptoms`` below gives the
  kinds); ``symptom_lines`` sums a run's records up, one line per kind.

Each symptom found is logged once as a warning naming it. The thresholds are the checks DINO's and solo-learn's
users make: the per-dimension std of L2-normalised features is about 1/sqrt(D) for spread-out features and 0 when
every image maps to one point (SimSiam, Chen & He 2021, section 4); the effective rank (RankMe, Garrido et al.
2023) is near 1 when all features lie on a line; DINO's loss stays at ln(K) when the teacher is uniform, SwAV's
at ln(prototypes) when its predictions are.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from classy_vision.generic.distributed_util import is_primary

from convit_ssl.atomic import write_text
from convit_ssl.errors import UsageError
from convit_ssl.hooks import SelectiveHook, first_images, resumed_checkpoint, trunk_of, truncate_json_lines
from convit_ssl.resume_hooks import preserved_random_state
from convit_ssl.run_folder import EPOCH_LOG, HEALTH_FILE

_log = logging.getLogger(__name__)

COLLAPSED_STD_FRACTION = 0.1  # feature std below this fraction of 1/sqrt(D): the features collapsed to a point
COLLAPSED_RANK = 2.0  # effective rank below it: the features lie on a line
UNIFORM_FRACTION = 0.98  # DINO: loss and teacher entropy above this fraction of ln(K): a uniform teacher
RISE_FRACTION = 0.1  # a loss that ends this fraction above where its window started, on a rising trend
RISING_LOSSES = ("barlow_twins_loss", "swav_loss")  # methods whose rising loss is a symptom
_NUMBER = re.compile(r"\d+(\.\d+)?")


# ---------------------------------------------------------------- measures

def feature_std(features: torch.Tensor) -> float:
    """Mean over dimensions of the std over samples of the L2-normalised features (N, D); 0 when collapsed."""
    normalised = F.normalize(features.double(), dim=1)
    return normalised.std(dim=0, unbiased=False).mean().item()


def effective_rank(features: torch.Tensor, eps: float = 1e-12) -> float:
    """exp of the entropy of the normalised singular values of the features (N, D) (RankMe): between 1 and
    min(N, D); 1 when every row is a multiple of one vector."""
    singular = torch.linalg.svdvals(features.double())
    p = singular / (singular.sum() + eps) + eps
    return math.exp(-(p * p.log()).sum().item())


def mean_entropy(probabilities: torch.Tensor) -> float:
    """Mean over rows of the entropy (nats) of probability rows (N, K); at most ln(K), reached by uniform rows."""
    p = probabilities.double()
    return -(p * p.clamp_min(1e-30).log()).sum(dim=1).mean().item()


def is_rising(losses: Sequence[float], window: int, fraction: float = RISE_FRACTION) -> bool:
    """Whether the last ``window`` losses rise: a positive least-squares slope and a last value more than
    ``fraction`` of the first's magnitude above the first. False with fewer than ``window`` losses."""
    if window < 2 or len(losses) < window:
        return False
    values = list(losses)[-window:]
    mean_x, mean_y = (window - 1) / 2, sum(values) / window
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return slope > 0 and values[-1] - values[0] > fraction * abs(values[0])


def symptoms(method: str, losses: Sequence[float], std: float, rank: float, embedding_dim: int, window: int,
             teacher_entropy: Optional[float] = None, max_entropy: Optional[float] = None,
             first: Optional[tuple] = None) -> Dict[str, str]:
    """Collapse symptoms of one measurement: {kind: a sentence naming it}; {} for a healthy run. Kinds:
    ``feature_std``, ``rank``, ``uniform_teacher`` (DINO), ``uniform_assignment`` (SwAV: its loss stays at
    ``max_entropy`` = ln(prototypes)), ``uniform_contrast`` (MoCo: its loss stays at ``max_entropy`` = ln(queue
    + 1), a query matches its key no better than the queue's keys), ``rising_loss`` (Barlow Twins, SwAV).

    ``losses`` are the recorded losses so far (the last is the current one), ``std`` and ``rank`` the
    ``feature_std`` and ``effective_rank`` of ``embedding_dim``-wide embeddings; ``first`` is the (std, rank) of
    the run's first record: a small net's embeddings are alike already at init, so low std and rank count as
    collapse only once they fell below the first record's.
    """
    found = {}
    healthy_std = 1 / math.sqrt(embedding_dim)
    first_std, first_rank = first if first is not None else (math.inf, math.inf)
    if std < COLLAPSED_STD_FRACTION * healthy_std and std < first_std:
        found["feature_std"] = (f"feature std {std:.4f} is near 0 (spread-out features: about {healthy_std:.3f}): "
                                f"every image maps to almost the same feature")
    if rank < COLLAPSED_RANK and rank < first_rank:
        found["rank"] = f"effective rank {rank:.2f} of {embedding_dim} dimensions: the features lie on a line"
    if method == "dino_loss" and teacher_entropy is not None and losses:
        if losses[-1] > UNIFORM_FRACTION * max_entropy and teacher_entropy > UNIFORM_FRACTION * max_entropy:
            found["uniform_teacher"] = (f"DINO loss {losses[-1]:.3f} and teacher entropy {teacher_entropy:.3f} are "
                                        f"at ln(output_dim) = {max_entropy:.3f}: the teacher is uniform (collapse)")
    if method == "swav_loss" and max_entropy is not None and len(losses) >= window \
            and min(losses[-window:]) > UNIFORM_FRACTION * max_entropy:
        found["uniform_assignment"] = (f"SwAV loss stayed at ln(prototypes) = {max_entropy:.3f} over the last "
                                       f"{window} records ({losses[-1]:.3f}): uniform predictions (collapse)")
    if method == "moco_loss" and max_entropy is not None and len(losses) >= window \
            and min(losses[-window:]) > UNIFORM_FRACTION * max_entropy:
        found["uniform_contrast"] = (f"MoCo loss stayed at ln(queue + 1) = {max_entropy:.3f} over the last "
                                     f"{window} records ({losses[-1]:.3f}): a query matches its key no better than "
                                     f"the queue's keys (collapse)")
    if method in RISING_LOSSES and is_rising(losses, window):
        found["rising_loss"] = (f"{method} rose over the last {window} records, from {losses[-window]:.4g} to "
                                f"{losses[-1]:.4g}")
    return found


def symptom_lines(records: Sequence[Mapping]) -> List[str]:
    """One line per symptom kind that health records (``health.jsonl``'s, in order) report, in order of first
    report: the latest record's sentence, how many records reported it and at which updates, e.g. ``effective rank
    1.71 of 1024 dimensions: the features lie on a line (latest of 15 records, updates 20 to 580)``. A record
    written before symptoms had kinds lists sentences: each counts under its wording with its numbers masked."""
    kinds: Dict[str, dict] = {}
    for record in records:
        found = record.get("symptoms") or {}
        if isinstance(found, list):
            found = {_NUMBER.sub("#", sentence): sentence for sentence in found}
        for kind, sentence in found.items():
            seen = kinds.setdefault(kind, {"count": 0, "first": record["iteration"]})
            seen.update(sentence=sentence, count=seen["count"] + 1, last=record["iteration"])
    return [f"{seen['sentence']} (latest of {seen['count']} records, updates {seen['first']} to {seen['last']})"
            if seen["count"] > 1 else f"{seen['sentence']} (update {seen['first']})" for seen in kinds.values()]


# ---------------------------------------------------------------- the hook

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
        """On resume, keep the records up to the checkpoint and read their losses back."""
        resumed = resumed_checkpoint(task)
        if resumed is None:
            return
        iteration = resumed.iteration
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
