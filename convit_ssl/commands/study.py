"""convit-ssl study low-data: ConViT vs its DeiT twin when only a fraction of the labels is kept (paper, Table 2).

  convit-ssl study low-data                                   # digits, random-init convit_tiny pair, ~2 min on CPU
  convit-ssl study low-data --checkpoints runs/convit/model_final_checkpoint_phase99.torch \
                                          runs/deit/model_final_checkpoint_phase99.torch   # two pretrained trunks
  convit-ssl study low-data --checkpoints runs/convit runs/deit --random-init --finetune 6   # SSL vs random init
  convit-ssl study low-data --data cifar10 --arch convit_small --trunk-option patch_size=4 --knn

For each fraction of the training labels per class (nested subsets, at least one image per class) both trunks get
the recipe's linear-probe grid (head chosen on held-out images of the subset; with a single image per class it
falls back to training accuracy and says so) and, with --knn, kNN on the same images. Features are extracted once
per trunk. --random-init adds random-init trunks of the checkpoints' shapes, a second pair in the same table
(one row per init and fraction). Writes study.md / study.csv (top-1, top-5 and the relative gain of the first
model), low_data.png and one result JSON per model and fraction. --finetune EPOCHS adds the paper's own protocol
next to the probes: each trunk fine-tuned with a new head on each subset through VISSL's engine (the fine-tuning
recipe named like the dataset, see convit-ssl finetune), EPOCHS / f epochs. The paper (trained from scratch on
ImageNet) reports ConViT-S 47.8 vs DeiT-S 34.8 top-1 at 5% of the labels, a 37% relative gain, shrinking to 2% with all of them.
"""
from __future__ import annotations

import time

from convit_ssl.errors import UsageError
from convit_ssl.evaluation.arguments import (
    add_data_arguments, add_grid_arguments, apply_threads, cache_from_args, check_arguments, check_dataset,
    check_label_subsets,
    checkpoint_model, parse_options, recipe_from_args,
)
from convit_ssl.evaluation.knn import KS
from convit_ssl.evaluation.results import new_folder
from convit_ssl.evaluation.subsets import FRACTIONS

DEFAULT_TRUNK_OPTIONS = ["patch_size=4"]


def add_arguments(parser) -> None:
    parser.epilog = __doc__
    parser.add_argument("study", choices=["low-data"], help="which study (low-data: the sample-efficiency table)")
    models = parser.add_argument_group("models (a preset and its twin, or two checkpoints)")
    models.add_argument("--arch", default="convit_tiny",
                        help="ConViT preset; its twin is the same preset with local_up_to_layer=0 (default "
                             "convit_tiny); both random-init from --seed unless --checkpoints")
    models.add_argument("--trunk-option", action="append", default=None, metavar="KEY=VALUE",
                        help=f"trunk keyword (repeatable). Random trunks: default {' '.join(DEFAULT_TRUNK_OPTIONS)} "
                             f"(32 px images), image size from the recipe. Checkpoints: none by default; a DeiT "
                             f"twin's head count is not in its weights, so pass e.g. num_heads=4")
    models.add_argument("--checkpoints", nargs=2, metavar=("CONVIT", "DEIT"),
                        help="two checkpoints instead of random trunks, the ConViT first (relative gains are its)")
    models.add_argument("--random-init", action="store_true",
                        help="with --checkpoints: also random-init --arch trunks of the checkpoints' shapes (from "
                             "--seed), in the same table: SSL vs random init")
    models.add_argument("--names", nargs=2, default=["ConViT", "DeiT"], metavar=("FIRST", "SECOND"),
                        help="labels of the two models in tables and the plot")
    add_data_arguments(parser, label_fraction=False)
    add_grid_arguments(parser)
    study = parser.add_argument_group("study")
    study.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS), metavar="F",
                       help=f"label fractions (default {' '.join(f'{f:g}' for f in FRACTIONS)})")
    study.add_argument("--knn", action="store_true", help="also kNN on each subset (first feature of the recipe)")
    study.add_argument("--ks", nargs="+", type=int, default=list(KS), metavar="K",
                       help="k for --knn; k above a subset's size are skipped and listed")
    study.add_argument("--finetune", type=int, metavar="EPOCHS",
                       help="also fine-tune each trunk with a new head on every subset, EPOCHS / f epochs (the "
                            "paper's protocol): each run sees EPOCHS x the training set, so EPOCHS=6 on digits took "
                            "20 minutes on a loaded CPU for two trunks and 5 fractions")
    study.add_argument("--finetune-recipe", metavar="NAME",
                       help="fine-tuning recipe (convit-ssl finetune --recipe; default: the one named like the dataset)")
    study.add_argument("--finetune-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a word of the fine-tuning runs (repeatable), e.g. config.DATA.NUM_DATALOADER_WORKERS=0")

def _models(args, recipe):
    from convit_ssl.evaluation.study import StudyModel, random_twins, twin_models

    if args.checkpoints:
        options = parse_options(args.trunk_option or [])
        models = [StudyModel(name, *checkpoint_model(path, name, **options))
                  for name, path in zip(args.names, args.checkpoints)]
        if args.random_init:
            models += random_twins(models, args.arch, args.seed)
    else:
        options = parse_options(DEFAULT_TRUNK_OPTIONS if args.trunk_option is None else args.trunk_option)
        options.setdefault("img_size", recipe.image_size)
        models = twin_models(args.arch, seed=args.seed, names=args.names, **options)
    for model in models:
        model.trunk.to(args.device)
    return models


def run(args) -> int:
    from convit_ssl.evaluation.study import low_data_study

    check_arguments(args)
    if args.random_init and not args.checkpoints:
        raise UsageError("--random-init adds random trunks beside --checkpoints; without --checkpoints the study "
                         "already compares random trunks: drop --random-init or pass --checkpoints CONVIT DEIT")
    apply_threads(args)
    recipe = recipe_from_args(args)
    check_dataset(recipe.dataset)
    check_label_subsets(recipe.dataset, args.fractions, args.subset_rule, args.seed)
    models = _models(args, recipe)
    out = new_folder(args.out, f"low-data-{recipe.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    study = low_data_study(models, recipe, out, fractions=args.fractions, subset_rule=args.subset_rule,
                           seed=args.seed, knn_ks=args.ks if args.knn else None, finetune_epochs=args.finetune,
                           finetune_recipe=args.finetune_recipe, finetune_words=args.finetune_option,
                           cache_dir=cache_from_args(args),
                           num_workers=args.workers, args=vars(args), progress=not args.quiet)
    print((out / "study.md").read_text(), end="")
    print(f"plot {out / study['plot']}; results in {out}")
    return 0
