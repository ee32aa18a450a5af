"""Is the SSL run learning or collapsing? The measures and symptoms of training health, as pure functions (each on
plain tensors or lists, hand-checkable); ``convit_ssl.health_hook`` runs them during training and writes
``health.jsonl`` (its docstring gives the record). No classy-vision or VISSL import: the report and the demo read
records with ``symptom_lines``.

``symptoms`` maps each symptom found to the sentence naming it; ``symptom_lines`` sums a run's records up, one line
per kind. The thresholds are the checks DINO's and solo-learn's users make: the per-dimension std of L2-normalised
features is about 1/sqrt(D) for spread-out features and 0 when every image maps to one point (SimSiam, Chen & He
2021, section 4); the effective rank (RankMe, Garrido et al. 2023) is near 1 when all features lie on a line; DINO's
loss stays at ln(K) when the teacher is uniform, SwAV's at ln(prototypes) when its predictions are.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

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
