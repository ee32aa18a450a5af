"""convit-ssl knn: weighted k-nearest-neighbour accuracy of a frozen trunk (DINO's protocol).

  convit-ssl knn --random convit_tiny --trunk-option patch_size=4                  # digits, seconds
  convit-ssl knn --checkpoint runs/<run>/model_final_checkpoint_phase99.torch --features lastCLS lastPOOL
  convit-ssl knn --checkpoint convit_small.pth --recipe imagenet1k --ks 20 200     # one pass over train and val

The training split is the memory, the val split the queries: cosine similarity of L2-normalised features, the k
nearest vote with weight exp(similarity / T). Top-5 counts only classes that received a vote (exact for k < 5).
Image preprocessing and the dataset come from the recipe (see linear-probe). No training: cost is one feature
pass plus a (val x train) similarity product, chunked. Runs on several processes (torchrun, or the launcher's
multi-node jobs): each extracts its shard and ranks its share of the queries; rank 0 writes the result.
"""
from __future__ import annotations

import time

from convit_ssl.evaluation import distributed
from convit_ssl.evaluation.arguments import (
    add_data_arguments, add_model_arguments, cache_from_args, setup_from_args, write_command_result,
)
from convit_ssl.evaluation.knn import KS, TEMPERATURE


def add_arguments(parser) -> None:
    parser.epilog = __doc__
    add_model_arguments(parser)
    add_data_arguments(parser)
    group = parser.add_argument_group("kNN")
    group.add_argument("--features", nargs="+", default=["lastCLS"], metavar="KEY",
                       help="feature choices, each evaluated on its own (default lastCLS; lastCLS+lastPOOL joins two)")
    group.add_argument("--ks", nargs="+", type=int, default=list(KS), metavar="K",
                       help=f"numbers of neighbours (default {' '.join(map(str, KS))}; 20 is DINO's headline)")
    group.add_argument("--temperature", type=float, default=TEMPERATURE,
                       help=f"vote weight exp(similarity / T) (default {TEMPERATURE}, DINO's)")


def run(args) -> int:
    from convit_ssl.evaluation.knn import knn_evaluation
    from convit_ssl.evaluation.results import markdown_table

    started = time.time()
    recipe, trunk, model = setup_from_args(args)
    try:
        body = knn_evaluation(trunk, recipe.dataset, recipe.preprocess, args.features, args.ks, args.temperature,
                              args.fraction, args.subset_rule, args.seed, recipe.batch_size, args.workers,
                              cache_from_args(args), model, progress=not args.quiet)
        path = write_command_result(body, args, recipe, model, "knn", started)
    finally:
        distributed.shutdown()
    if path is None:  # not rank 0
        return 0
    print(markdown_table(body["rows"], ["feature", "k", "top1", "top5"]), end="")
    if body["skipped_ks"]:
        print(f"skipped k = {', '.join(map(str, body['skipped_ks']))}: more than the {body['dataset']['train']} "
              f"training images kept")
    print(f"result {path}")
    if not body["trunk"]["unchanged"]:
        print("error: the trunk's weights changed during the evaluation")
        return 1
    return 0
