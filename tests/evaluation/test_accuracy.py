"""Top-1/top-5 hits: equal to scikit-learn's top_k_accuracy_score, per head of a grid; padded rankings by hand."""
import numpy as np
import torch
from sklearn.metrics import top_k_accuracy_score

from convit_ssl.evaluation.accuracy import ranked_hits, score_hits


def test_score_hits_of_every_head_match_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, 12, generator=generator)  # 3 heads, 50 samples, 12 classes
    targets = torch.randint(0, 12, (50,), generator=generator)
    hits = score_hits(scores, targets)
    assert hits.shape == (3, 2)
    for head in range(3):
        expected = [top_k_accuracy_score(targets.numpy(), scores[head].numpy(), k=k, labels=np.arange(12),
                                          normalize=False) for k in (1, 5)]
        assert hits[head].tolist() == expected


def test_fewer_than_five_classes_make_top5_every_class():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert score_hits(scores, torch.tensor([0, 0])).tolist() == [1, 2]


def test_padding_never_hits():
    ranked = torch.tensor([[2, -1, -1, -1, -1], [0, 3, -1, -1, -1], [1, 0, 2, 3, 4]])
    assert ranked_hits(ranked, torch.tensor([2, 3, 4])).tolist() == [1, 3]
