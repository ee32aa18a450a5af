"""Per-class label subsets: sizes, determinism, nesting, the official 'first files' rule, the held-out split."""
import numpy as np
import pytest

from convit_ssl.errors import UsageError
from convit_ssl.evaluation.subsets import FRACTIONS, class_subset, heldout_split, nested_subsets

# classes of 100, 50, 7 and 1 images, shuffled so that indices do not follow classes
LABELS = np.random.default_rng(1).permutation(np.repeat([0, 1, 2, 3], [100, 50, 7, 1]))


def per_class(indices):
    return np.bincount(LABELS[indices], minlength=4).tolist()


def test_sizes_floor_with_one_per_class_minimum():
    assert per_class(class_subset(LABELS, 0.1)) == [10, 5, 1, 1]
    assert per_class(class_subset(LABELS, 0.3)) == [30, 15, 2, 1]
    assert per_class(class_subset(LABELS, 0.01)) == [1, 1, 1, 1]
    assert class_subset(LABELS, 1.0).tolist() == list(range(len(LABELS)))


def test_deterministic_under_a_seed_and_different_across_seeds():
    first = class_subset(LABELS, 0.1, seed=3)
    assert np.array_equal(first, class_subset(LABELS, 0.1, seed=3))
    assert not np.array_equal(first, class_subset(LABELS, 0.1, seed=4))
    assert np.all(np.diff(first) > 0)  # sorted, no repeats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nested_across_fractions(seed):
    subsets = nested_subsets(LABELS, FRACTIONS, seed)
    ordered = [set(subsets[f].tolist()) for f in sorted(FRACTIONS)]
    for smaller, larger in zip(ordered, ordered[1:]):
        assert smaller < larger or smaller == larger


def test_first_rule_is_the_official_one():
    names = [f"img_{i:04d}.png" for i in np.random.default_rng(2).permutation(len(LABELS))]
    chosen = class_subset(LABELS, 0.1, rule="first", filenames=names)
    for label, count in enumerate([10, 5, 0, 0]):  # int(n * 0.1), no minimum: classes of 7 and 1 are dropped
        members = np.flatnonzero(LABELS == label)
        expected = sorted(members, key=lambda i: names[i])[:count]
        assert sorted(i for i in chosen if LABELS[i] == label) == sorted(expected)
    assert set(chosen) <= set(class_subset(LABELS, 0.5, rule="first", filenames=names))
    with pytest.raises(ValueError, match="needs the file names"):
        class_subset(LABELS, 0.1, rule="first")
    # int(n * 0.005) is 0 for every class (the largest holds 100): nothing to train on, said in one line
    with pytest.raises(UsageError, match=r"label fraction 0.005 keeps no training image under the 'first' rule .*"
                                         r"at least 1/100, .*--subset-rule random"):
        class_subset(LABELS, 0.005, rule="first", filenames=names)


def test_bad_fraction_and_rule():
    with pytest.raises(ValueError, match=r"label fraction 0 is outside \(0, 1\]"):
        class_subset(LABELS, 0)
    with pytest.raises(ValueError, match="unknown subset rule 'best'"):
        class_subset(LABELS, 0.5, rule="best")


def test_heldout_split_is_stratified_and_keeps_one_training_image():
    train, heldout = heldout_split(LABELS, 0.1, seed=0)
    assert per_class(heldout) == [10, 5, 1, 0]  # round(n * 0.1), at least 1, never the last image of a class
    assert sorted(train.tolist() + heldout.tolist()) == list(range(len(LABELS)))
    pool = class_subset(LABELS, 0.1)
    train, heldout = heldout_split(LABELS, 0.2, seed=0, indices=pool)
    assert per_class(heldout) == [2, 1, 0, 0] and set(train) | set(heldout) == set(pool)
    assert heldout_split(LABELS, 0.0)[1].size == 0
    assert np.array_equal(heldout_split(LABELS, 0.1, seed=5)[1], heldout_split(LABELS, 0.1, seed=5)[1])
