"""Weighted k-nearest-neighbour classification of frozen features, the protocol of DINO (Caron et al. 2021).

Features are L2-normalised; a test image's k most similar training images (cosine similarity s) vote for their
labels with weight exp(s / T), T = 0.07. The predicted classes are the classes ranked by their total vote,
summed in log space so that no weight overflows float32 (DINO's exp(s / T) is infinite for s / T > 88.7, e.g.
s = 0.9 at T = 0.01, and infinite votes tie).

Exact where DINO's code is not: only classes that received a vote are predictions. DINO sorts all classes and
takes the first ``min(5, k)``, so classes with no vote (score 0) fill the ranks after the voted ones in an order
that depends on the sort, and can count as top-5 hits; here a class with no vote never does. So with k < 5, or
when fewer than 5 classes got votes, top-5 is "the true class got a vote" (top-5 equals top-1 for k = 1).
Equal votes rank the lower class index first. The test set is processed in chunks (memory is chunk x train),
and the result does not depend on the chunk size. With several processes (``distributed``) every rank holds the
gathered training features and ranks its shard of the queries; the predictions are gathered, so the numbers are
those of one process, exactly.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from convit_ssl.errors import UsageError
from convit_ssl.evaluation import distributed
from convit_ssl.evaluation.accuracy import ranked_hits
from convit_ssl.evaluation.features import (
    Preprocess, check_feature_choices, frozen_check, split_features, state_digest, trunk_keys,
)
from convit_ssl.evaluation.subsets import class_subset

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
_CHUNK_BYTES = 2**28  # similarity matrix budget per chunk: 256 MiB


def _log_votes(logits: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log of each class's vote, sum of exp(s / T) over its neighbours, (M, num_classes); -inf without a vote.

    logits s / T (M, k), neighbour_labels (M, k). Summed per class after subtracting the class's largest logit, so
    no class's vote overflows or vanishes whatever T (exp(0.99 / 0.01) is beyond float32).
    """
    shape = (len(logits), num_classes)
    class_max = torch.full(shape, -math.inf).scatter_reduce_(1, neighbour_labels, logits, "amax")
    shifted = (logits - class_max.gather(1, neighbour_labels)).exp()
    return class_max + torch.zeros(shape).scatter_add_(1, neighbour_labels, shifted).log()


def knn_predict(train_features, train_labels, test_features, ks: Sequence[int] = KS,
                temperature: float = TEMPERATURE, num_classes: Optional[int] = None,
                chunk_size: Optional[int] = None, max_rank: int = 5) -> Dict[int, torch.Tensor]:
    """Ranked class predictions ``{k: (M, max_rank) int64}``; -1 where fewer than ``max_rank`` classes got votes.

    train_features (N, C), train_labels (N,), test_features (M, C): tensors or arrays. ``chunk_size`` test images
    at a time (default: as many as fit 256 MiB of similarities).
    """
    train = F.normalize(torch.as_tensor(np.asarray(train_features), dtype=torch.float32), dim=1)
    test = torch.as_tensor(np.asarray(test_features), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > len(train):
        raise UsageError(f"k must be between 1 and the number of training samples {len(train)}, got {ks}: "
                         f"pass smaller --ks")
    num_classes = int(num_classes or int(labels.max()) + 1)
    chunk_size = chunk_size or max(1, _CHUNK_BYTES // (4 * len(train)))
    predictions = {k: [] for k in ks}
    for start in range(0, len(test), chunk_size):
        queries = F.normalize(test[start:start + chunk_size], dim=1)
        top_similarity, top_index = (queries @ train.T).topk(ks[-1], dim=1)
        neighbour_labels = labels[top_index]
        for k in ks:
            log_votes = _log_votes(top_similarity[:, :k] / temperature, neighbour_labels[:, :k], num_classes)
            ranked_votes, ranked = log_votes.sort(dim=1, descending=True, stable=True)
            ranked = ranked[:, :max_rank].masked_fill(ranked_votes[:, :max_rank] == -math.inf, -1)
            predictions[k].append(F.pad(ranked, (0, max_rank - ranked.shape[1]), value=-1))
    return {k: torch.cat(chunks) for k, chunks in predictions.items()}


def knn_classify(train_features, train_labels, test_features, test_labels, ks: Sequence[int] = KS,
                 temperature: float = TEMPERATURE, num_classes: Optional[int] = None,
                 chunk_size: Optional[int] = None) -> Dict[int, Dict[str, float]]:
    """``{k: {"top1": %, "top5": %}}`` of weighted kNN (see the module docstring for the exact rule).

    With several processes every rank calls this with all the features; each ranks its shard of the queries.
    """
    targets = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64)
    queries = distributed.shard_indices(len(targets))  # each rank ranks its share of the queries
    shard = knn_predict(train_features, train_labels, np.asarray(test_features)[queries], ks, temperature,
                        num_classes, chunk_size)
    predictions = {k: torch.from_numpy(distributed.gather_rows(ranked.numpy(), queries, len(targets)))
                   for k, ranked in shard.items()}
    results = {}
    for k, ranked in predictions.items():
        top1, top5 = ranked_hits(ranked, targets).tolist()
        results[k] = {"top1": 100.0 * top1 / len(targets), "top5": 100.0 * top5 / len(targets)}
    return results


def knn_evaluation(trunk: nn.Module, dataset: str, preprocess: Preprocess, features: Sequence[str] = ("lastCLS",),
                   ks: Sequence[int] = KS, temperature: float = TEMPERATURE, fraction: float = 1.0,
                   subset_rule: str = "random", seed: int = 0, batch_size: int = 256, num_workers: int = 0,
                   cache_dir: Optional[Path] = None, model: Optional[Mapping] = None, progress: bool = False) -> dict:
    """kNN accuracy of ``trunk`` on catalog dataset ``dataset`` (train split as memory, val split as queries).

    ``fraction`` < 1 keeps that fraction of the training labels per class (``subsets.class_subset``). Values of k
    above the number of kept training images are skipped and listed under ``skipped_ks``. Returns the result body.
    """
    started = time.time()
    model = dict(model or {})
    digest = state_digest(trunk)
    sizes = check_feature_choices(trunk, features, preprocess.image_size)
    run = dict(batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir, trunk_digest=digest,
               model=model, progress=progress)
    train = split_features(trunk, dataset, "train", trunk_keys(features), preprocess, **run)
    test = split_features(trunk, dataset, "val", trunk_keys(features), preprocess, **run)
    memory = class_subset(train.labels, fraction, seed, subset_rule, train.files)
    usable = [k for k in ks if k <= len(memory)]
    if not usable:
        raise UsageError(f"every k in {list(ks)} exceeds the {len(memory)} training images kept: pass smaller --ks")
    rows, accuracies = [], {}
    for choice in features:
        accuracies[choice] = knn_classify(train.choice(choice, memory), train.labels[memory], test.choice(choice),
                                          test.labels, usable, temperature, num_classes=len(train.classes))
        rows += [{"kind": "knn", "model": model.get("name", ""), "dataset": dataset, "fraction": fraction,
                  "feature": choice, "k": k, "temperature": temperature, **accuracy}
                 for k, accuracy in accuracies[choice].items()]
    return {
        "kind": "knn",
        "dataset": {"name": dataset, "fraction": fraction, "subset_rule": subset_rule, "train": len(memory),
                    "test": len(test.labels), "classes": len(train.classes)},
        "preprocess": dataclasses.asdict(preprocess), "seed": seed, "temperature": temperature, "ks": usable,
        "skipped_ks": [k for k in ks if k not in usable],
        "accuracy": {choice: {str(k): value for k, value in by_k.items()} for choice, by_k in accuracies.items()},
        "trunk": frozen_check(trunk, digest, sizes),
        "eval_time_s": round(time.time() - started, 3),
        "rows": rows,
    }
