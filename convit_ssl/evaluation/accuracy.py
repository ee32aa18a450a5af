"""Top-1 and top-5 accuracy: the one definition that the linear probe, kNN and supervised training use.

A sample is a top-k hit when its label is among the first k predictions. With fewer than 5 classes, "top-5" is
top-K over all K classes.
"""
import torch


def ranked_hits(ranked: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 and top-5 hit counts (..., 2) of predictions ranked best first (..., B, R) for labels (B,).

    Entries that are no class (e.g. -1 where fewer than R classes got votes) never hit.
    """
    hits = ranked[..., :5] == targets.view(-1, 1)
    return torch.stack([hits[..., 0].sum(dim=-1), hits.any(dim=-1).sum(dim=-1)], dim=-1)


def score_hits(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 and top-5 hit counts (..., 2) of class scores (..., B, C) for labels (B,)."""
    return ranked_hits(scores.topk(min(5, scores.shape[-1]), dim=-1).indices, targets)
