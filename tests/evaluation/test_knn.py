"""Weighted kNN: hand-computed votes, top-5 with k < 5, chunking, and a brute-force oracle."""
import math

import numpy as np
import pytest
import torch

from convit_ssl.evaluation.knn import knn_classify, knn_predict

# Unit vectors at known angles: cosine similarities with the queries below are read off directly.
TRAIN = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
TRAIN_LABELS = np.array([0, 1, 1, 2, 3])
QUERIES = np.array([[2.0, 0.0], [0.0, 3.0]])  # not unit length: kNN normalises them


def test_hand_computed_votes():
    # Query (1, 0): similarities 1, .8, .6, 0, -1. With T = 1, k = 3: class 0 gets e^1 = 2.72, class 1 gets
    # e^.8 + e^.6 = 4.05, so class 1 wins; with T = 0.1: e^10 = 22026 beats e^8 + e^6 = 3384, class 0 wins.
    assert knn_predict(TRAIN, TRAIN_LABELS, QUERIES[:1], ks=[3], temperature=1.0)[3].tolist() == [[1, 0, -1, -1, -1]]
    assert knn_predict(TRAIN, TRAIN_LABELS, QUERIES[:1], ks=[3], temperature=0.1)[3].tolist() == [[0, 1, -1, -1, -1]]
    assert math.e ** 0.8 + math.e ** 0.6 > math.e and math.e ** 10 > math.e ** 8 + math.e ** 6
    # Query (0, 1): similarities 0, .6, .8, 1, 0. k = 1: class 2 alone; k = 3 at T = 1: e^.8 + e^.6 > e^1: class 1.
    ranked = knn_predict(TRAIN, TRAIN_LABELS, QUERIES[1:], ks=[1, 3], temperature=1.0)
    assert ranked[1].tolist() == [[2, -1, -1, -1, -1]]
    assert ranked[3].tolist() == [[1, 2, -1, -1, -1]]
    # k = 5: every class gets a vote; class 0 (similarity 0, weight 1) and class 3 (weight 1) tie: lower index first.
    assert knn_predict(TRAIN, TRAIN_LABELS, QUERIES[1:], ks=[5], temperature=1.0)[5].tolist() == [[1, 2, 0, 3, -1]]


def test_top5_with_fewer_than_five_neighbours_counts_only_voted_classes():
    labels = [0, 3]  # query 1's true class 0 is the nearest; query 2's true class 3 gets no vote for k <= 3
    results = knn_classify(TRAIN, TRAIN_LABELS, QUERIES, labels, ks=[1, 3, 5], temperature=1.0)
    assert results[1] == {"top1": 50.0, "top5": 50.0}  # k = 1: top-5 is top-1
    assert results[3] == {"top1": 0.0, "top5": 50.0}  # query 1: class 1 wins, class 0 second; query 2: no vote for 3
    assert results[5] == {"top1": 0.0, "top5": 100.0}  # every class voted (4 classes <= 5)


def naive_knn(train, train_labels, test, k, temperature, num_classes):
    """One query at a time, straight from the definition (float64)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    predictions = []
    for query in test:
        query = query / np.linalg.norm(query)
        similarity = train @ query
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for index in nearest:
            votes[train_labels[index]] += np.exp(similarity[index] / temperature)
        ranked = [c for c in sorted(range(num_classes), key=lambda c: (-votes[c], c)) if votes[c] > 0][:5]
        predictions.append(ranked + [-1] * (5 - len(ranked)))
    return predictions


def test_matches_brute_force_oracle_and_chunking_changes_nothing():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 16)).astype(np.float32)
    labels = rng.integers(0, 7, size=200)
    test = rng.normal(size=(57, 16)).astype(np.float32)
    ks = [1, 3, 10, 20]
    whole = knn_predict(train, labels, test, ks, temperature=0.07, num_classes=7)
    for k in ks:
        assert whole[k].tolist() == naive_knn(train, labels, test, k, 0.07, 7)
    for chunk_size in (1, 7, 56):
        chunked = knn_predict(train, labels, test, ks, temperature=0.07, num_classes=7, chunk_size=chunk_size)
        assert all(torch.equal(chunked[k], whole[k]) for k in ks)
    test_labels = rng.integers(0, 7, size=57)
    assert knn_classify(train, labels, test, test_labels, ks, chunk_size=5) == knn_classify(train, labels, test,
                                                                                              test_labels, ks)


def test_k_larger_than_the_memory_is_an_error():
    with pytest.raises(ValueError, match=r"k must be between 1 and the number of training samples 5.*smaller --ks"):
        knn_predict(TRAIN, TRAIN_LABELS, QUERIES, ks=[20])


def test_cold_temperature_votes_do_not_overflow():
    # Similarities .99 (class 1) and .95 (class 0) at T = 0.01: weights e^99 and e^95, both beyond float32
    # (e^88.7). Class 1 must win, not tie with class 0 at infinity and lose on the lower index.
    train = np.array([[0.95, math.sqrt(1 - 0.95**2)], [0.99, math.sqrt(1 - 0.99**2)]])
    ranked = knn_predict(train, [0, 1], [[1.0, 0.0]], ks=[2], temperature=0.01)
    assert ranked[2].tolist() == [[1, 0, -1, -1, -1]]
    # At T = 0.001 the weights e^1000, e^0 and e^-1000 of similarities 1, 0 and -1 are out of any float's
    # range: still every class voted, ranked by similarity.
    train = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    ranked = knn_predict(train, [2, 1, 0], [[1.0, 0.0]], ks=[3], temperature=0.001)
    assert ranked[3].tolist() == [[2, 1, 0, -1, -1]]
