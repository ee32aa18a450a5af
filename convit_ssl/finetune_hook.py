"""The fine-tuning hook: held-out and test accuracy of the model at the end of every training epoch.

``FinetuneEvaluationHook`` runs the whole model (trunk and head, unwrapped, eval mode, ``no_grad``) over the
held-out training images (``CONVIT_SSL.HELDOUT_IMAGES`` / ``HELDOUT_LABELS``, file lists that
``convit-ssl finetune`` writes) and over the test split (``DATA.TEST``), both read by VISSL's dataset with the TEST
transforms. Every process scores every ``world``-th image and the hits are summed over the processes, so a
distributed run evaluates each image once. The primary process appends one JSON line per epoch to
``<checkpoint dir>/finetune_eval.jsonl``:

    {"epoch": 0, "iteration": 40, "heldout_images": 144, "heldout_top1": 61.8, "test_images": 360,
     "test_top1": 60.3, "test_top5": 93.1}

It runs before VISSL's checkpoint hook, so an epoch's line exists when its checkpoint does; a resumed run drops
the lines after its checkpoint (the killed run wrote them; they come again), a fresh run every line.
``convit_ssl.evaluation.finetune`` reads the file: the final epoch's test accuracy and that of the epoch best on the
held-out images.
``build_finetune_hook`` reads ``HOOKS.CONVIT_FINETUNE.ENABLE``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from classy_vision.generic.distributed_util import is_primary
from torch.utils.data import DataLoader, Subset

from convit_ssl.evaluation import distributed
from convit_ssl.evaluation.accuracy import score_hits
from convit_ssl.hooks import SelectiveHook, resumed_checkpoint, truncate_json_lines
from convit_ssl.models.modes import eval_mode

EVAL_FILE = "finetune_eval.jsonl"


def _collate(items):
    return torch.stack([item["data"][0] for item in items]), torch.tensor([int(item["label"][0]) for item in items])


def _shard(dataset, batch_size: int) -> DataLoader:
    """This process's share of ``dataset`` (``distributed.shard_indices``: every image in one process)."""
    return DataLoader(Subset(dataset, distributed.shard_indices(len(dataset)).tolist()), batch_size=batch_size,
                      collate_fn=_collate)


def _hits(model, loader, device) -> torch.Tensor:
    """[images, top-1 hits, top-5 hits] of ``model`` on ``loader`` (batches of images and labels), summed over the
    processes (``convit_ssl.evaluation.accuracy``'s definition of a hit)."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        logits = model(images.to(device))[0]
        counts[0] += len(labels)
        counts[1:] += score_hits(logits, labels.to(device)).double()
    distributed.all_reduce_sum_([counts])
    return counts


class FinetuneEvaluationHook(SelectiveHook):
    """Score the model on the held-out images and the test split after every training epoch (module docstring)."""

    def __init__(self, config, output_dir: Optional[str] = None):
        super().__init__()
        self.config = config
        self.output_dir = output_dir
        self.datasets: Optional[Dict[str, object]] = None

    def _path(self, task) -> Path:
        return Path(self.output_dir or task.checkpoint_folder) / EVAL_FILE

    def on_start(self, task) -> None:
        """Keep the lines of the epochs the resumed checkpoint completed; none in a fresh run (a run killed before
        its first checkpoint wrote them; this one starts over)."""
        if not is_primary():
            return
        resumed = resumed_checkpoint(task)
        last_epoch = resumed.last_epoch if resumed is not None else -1
        truncate_json_lines(self._path(task), lambda record: record["epoch"] <= last_epoch)

    def _build_datasets(self) -> Dict[str, object]:
        from convit_ssl import vissl_glue

        ours = self.config["CONVIT_SSL"]
        datasets = {"test": vissl_glue.evaluation_dataset(self.config)}
        if ours.get("HELDOUT_IMAGES", ""):
            datasets["heldout"] = vissl_glue.evaluation_dataset(self.config, ours["HELDOUT_IMAGES"],
                                                                ours["HELDOUT_LABELS"])
        return datasets

    def on_phase_end(self, task) -> None:
        if not task.train:
            return
        if self.datasets is None:
            self.datasets = self._build_datasets()
        model = task.base_model
        device = next(model.parameters()).device
        batch = self.config["DATA"]["TEST"]["BATCHSIZE_PER_REPLICA"]
        record = {"epoch": task.train_phase_idx, "iteration": task.iteration}
        with torch.no_grad(), eval_mode(model):
            for part, dataset in self.datasets.items():
                images, top1, top5 = _hits(model, _shard(dataset, batch), device).tolist()
                record[f"{part}_images"] = int(images)
                record[f"{part}_top1"] = 100.0 * top1 / max(images, 1)
                if part == "test":
                    record["test_top5"] = 100.0 * top5 / max(images, 1)
        if is_primary():
            with open(self._path(task), "a") as stream:
                stream.write(json.dumps(record) + "\n")
                stream.flush()


def build_finetune_hook(config) -> Optional[FinetuneEvaluationHook]:
    section = config["HOOKS"].get("CONVIT_FINETUNE", None) or {}
    return FinetuneEvaluationHook(config) if section.get("ENABLE", False) else None
