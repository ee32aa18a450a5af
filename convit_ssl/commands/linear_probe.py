"""convit-ssl linear-probe: a grid of linear heads on a frozen trunk, the best chosen on held-out training images.

  convit-ssl linear-probe --random convit_tiny --trunk-option patch_size=4        # digits: about a minute on CPU
  convit-ssl linear-probe --checkpoint runs/<run>/model_final_checkpoint_phase99.torch --recipe digits
  convit-ssl linear-probe --checkpoint convit_small.pth --recipe imagenet1k       # streamed: GPU, hours
  convit-ssl linear-probe --checkpoint ckpt.torch --data digits_val --recipe digits   # choose a recipe on held-out

Every (feature, lr, wd) of the recipe gets a head; all train in one pass over the features, and the head with the
best held-out top-1 is reported with its test (val split) accuracy, next to every other head's. The result JSON
(default runs/eval) also records that the trunk's weights did not change. A random-init trunk is the baseline to
beat: a tiny one reaches about 80% top-1 on digits.
"""
from __future__ import annotations

import time

from convit_ssl.evaluation import distributed
from convit_ssl.evaluation.arguments import (
    add_data_arguments, add_grid_arguments, add_model_arguments, cache_from_args, setup_from_args,
    write_command_result,
)


def add_arguments(parser) -> None:
    parser.epilog = __doc__
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_grid_arguments(parser)


def run(args) -> int:
    from convit_ssl.evaluation.linear_probe import linear_probe
    from convit_ssl.evaluation.results import markdown_table

    started = time.time()
    recipe, trunk, model = setup_from_args(args)
    try:
        body = linear_probe(trunk, recipe, fraction=args.fraction, subset_rule=args.subset_rule, seed=args.seed,
                            num_workers=args.workers, cache_dir=cache_from_args(args), model=model,
                            progress=not args.quiet, state_dir=args.out)
        path = write_command_result(body, args, recipe, model, "probe", started)
    finally:
        distributed.shutdown()
    if path is None:  # not rank 0
        return 0
    best = sorted(body["grid"], key=lambda entry: -entry.get("heldout_top1", entry.get("train_top1", 0.0)))[:5]
    print(markdown_table(best, ["feature", "lr", "wd", "heldout_top1", "test_top1", "test_top5"]), end="")
    chosen = body["chosen"]
    print(f"chosen on {chosen['selected_on']}: {chosen['feature']} lr {chosen['lr']:g} wd {chosen['wd']:g} -> "
          f"test top-1 {chosen['test_top1']:.2f}, top-5 {chosen['test_top5']:.2f} ({len(body['grid'])} heads); "
          f"result {path}")
    if not body["trunk"]["unchanged"]:
        print("error: the trunk's weights changed during the probe; the numbers are not those of the checkpoint")
        return 1
    return 0
