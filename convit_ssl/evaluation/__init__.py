"""Evaluation of frozen trunks: features, kNN, linear-probe grids, label subsets, low-data studies, result files.

Plain PyTorch and numpy (no VISSL import). Modules:

* ``features``: one trunk pass per batch for several feature keys, an on-disk memmap cache, ``state_digest``.
* ``accuracy``: top-1 and top-5 hits, the one definition.
* ``knn``: DINO's weighted kNN, exact top-5 for any k, chunked over queries.
* ``linear_probe``: recipes (``configs/config/convit_ssl/benchmark/linear``) and a grid of linear heads trained
  together, the best chosen on held-out training images.
* ``subsets``: nested per-class label subsets and the held-out split.
* ``study``: the low-data study (ConViT vs its DeiT twin over label fractions), table and plot.
* ``finetune``: fine-tuning of the whole trunk on a label subset, through VISSL's train engine (imported only
  when a fine-tuning runs).
* ``results``: result JSON with a manifest, ``gather``, Markdown and CSV.
* ``arguments``: the command-line pieces that ``linear-probe``, ``knn`` and ``study`` share.
"""
from convit_ssl.evaluation.features import Features, Preprocess, split_features, state_digest
from convit_ssl.evaluation.knn import knn_classify, knn_evaluation
from convit_ssl.evaluation.linear_probe import Recipe, linear_probe, load_recipe, probe_features
from convit_ssl.evaluation.results import gather, markdown_table, write_result
from convit_ssl.evaluation.study import low_data_study, twin_models
from convit_ssl.evaluation.subsets import class_subset, heldout_split, nested_subsets

__all__ = [
    "Features", "Preprocess", "Recipe", "class_subset", "gather", "heldout_split", "knn_classify", "knn_evaluation",
    "linear_probe", "load_recipe", "low_data_study", "markdown_table", "nested_subsets", "probe_features",
    "split_features", "state_digest", "twin_models", "write_result",
]
