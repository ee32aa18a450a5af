"""`convit-ssl finetune`: fine-tune a whole trunk plus a new head through VISSL's train engine.

examples:
  convit-ssl finetune --checkpoint runs/digits_simclr-... --recipe digits --labels 10%
  convit-ssl finetune --checkpoint random --recipe digits --labels 10%        # the same run from random init
  convit-ssl finetune --checkpoint RUN --recipe imagenet1k --labels 1percent.txt config.OPTIMIZER.layer_decay=0.65

--labels: all (default), a per-class percentage (10%, nested across percentages for one --seed),
N-per-class, or a file list in the ImageNet 1% / 10% format (one image file name per line). A held-out part of
each class's kept images (--heldout-fraction, 10% by default) chooses the best epoch; the test split (the
dataset's val split) is only reported.
Recipes (configs/config/convit_ssl/benchmark/finetune): digits, cifar10, cifar100, imagenet1k (DeiT's / ConViT's
supervised recipe). KEY=VALUE words are those of convit-ssl train (model=, data=, trunk.FIELD=, run_dir=, Hydra
overrides). Rerunning the same command resumes its run folder. Writes a result JSON (final and best-on-held-out
test accuracy, with a manifest recording the label subset) that convit-ssl results gathers.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from convit_ssl.evaluation.finetune import HELDOUT_FRACTION, recipe_names

    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="model=PRESET, data=NAME, trunk.FIELD=VALUE, run_dir=PATH, or a Hydra override "
                             "(config.OPTIMIZER.num_epochs=10)")
    parser.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT|random",
                        help="the trunk to start from: a run folder, a checkpoint (VISSL, timm, official, DINO), or "
                             "'random' for the recipe's model from random init")
    parser.add_argument("--recipe", required=True, help=f"fine-tuning recipe: {', '.join(recipe_names())}")
    parser.add_argument("--labels", help="10%% | N-per-class | FILE_LIST (default: all labels)")
    parser.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION, metavar="F",
                        help=f"share of each class's kept images held out to choose the best epoch (default "
                             f"{HELDOUT_FRACTION:g}; rounded half up, at least one, never a class's last image; 0: "
                             f"none, the final epoch counts). Raise it when few labels leave one held-out image "
                             f"a class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the label subset, held-out split and training")
    parser.add_argument("--arch", help="the checkpoint's preset, when its shapes leave it open (DeiT head counts)")
    parser.add_argument("--name", help="label of the model in result tables (default: the checkpoint)")
    parser.add_argument("--out", type=Path, help="folder for the result JSON (default: the run folder)")


def run(args: argparse.Namespace) -> int:
    from convit_ssl.evaluation.finetune import finetune

    result = finetune(args.checkpoint, args.recipe, labels=args.labels, words=args.overrides, seed=args.seed,
                      name=args.name, arch=args.arch, out=args.out, heldout_fraction=args.heldout_fraction)
    for row in result["rows"]:
        print(f"{row['selected_on']:>8} epoch {row['epoch']}: test top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%")
    print(f"result: {result['file']}")
    return 0
