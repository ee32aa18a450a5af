"""Command-line pieces shared by ``linear-probe``, ``knn`` and ``study``: which trunk, which data, which recipe.

Built by functions (as DINO's parsers are) so each command adds only its own flags. Everything here validates
before any work starts and raises ``ValueError`` with a one-line message naming the fix.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from convit_ssl.checkpoint import NETWORKS
from convit_ssl.data import data_root, dataset_split_dir
from convit_ssl.errors import UsageError
from convit_ssl.evaluation import distributed
from convit_ssl.evaluation.features import image_folder
from convit_ssl.evaluation.linear_probe import Recipe, check_number, load_recipe, recipe_names
from convit_ssl.evaluation.results import file_sha256, make_manifest, slug, write_new_result
from convit_ssl.evaluation.subsets import class_subset

DEFAULT_RECIPE = "digits"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trunk (one of --checkpoint, --random)")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH",
                        help="checkpoint to evaluate: VISSL (.torch, from convit-ssl train), timm/official ConViT or "
                             "DeiT, DINO or convit_ssl, or a run folder (its checkpoint.torch, else the final "
                             "checkpoint, else the newest); the trunk is frozen and its classifier, if any, dropped")
    source.add_argument("--random", metavar="ARCH",
                        help="a randomly initialised preset (convit_tiny, deit_small, ...): the baseline that a "
                             "pretrained trunk must beat; set its shape with --trunk-option")
    group.add_argument("--arch", metavar="PRESET",
                       help="with --checkpoint: the preset, when the shapes leave it open (DeiT/ViT head counts)")
    group.add_argument("--network", choices=NETWORKS, default=None,
                       help="with --checkpoint: a DINO run's student, or a training checkpoint's EMA (model_ema, "
                            "state_dict_ema) (default: a DINO run's teacher, else the trained model)")
    group.add_argument("--trunk-option", action="append", default=[], metavar="KEY=VALUE",
                       help="trunk keyword (repeatable), e.g. patch_size=4 or local_up_to_layer=0; for --random the "
                            "image size defaults to the recipe's")
    group.add_argument("--name", help="label of the model in tables (default: RUN/CHECKPOINT for a checkpoint of a "
                                      "run folder, links resolved, else the file stem; the preset for --random)")


def add_data_arguments(parser: argparse.ArgumentParser, label_fraction: bool = True) -> None:
    """--data, --recipe, preprocessing overrides, seeds, cache and output; ``--fraction`` when ``label_fraction``."""
    group = parser.add_argument_group("data and recipe")
    group.add_argument("--data", metavar="NAME",
                       help="catalog dataset (convit-ssl prepare-data registers one); default: the recipe's dataset")
    group.add_argument("--recipe", metavar="NAME|PATH",
                       help=f"probe recipe: {', '.join(recipe_names())}, or a YAML path (copy the closest one); "
                            f"default: the recipe named like --data, else {DEFAULT_RECIPE}")
    group.add_argument("--image-size", type=int, help="override the recipe's image size (a multiple of the patch)")
    group.add_argument("--crop-ratio", type=float, help="override: centre crop = image size, resize = size / ratio")
    group.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    if label_fraction:
        group.add_argument("--fraction", type=float, default=1.0,
                           help="keep this fraction of the training labels per class, e.g. 0.01 (default 1: all)")
    group.add_argument("--subset-rule", choices=("random", "first"), default="random",
                       help="random: per-class draw with --seed, nested across fractions, >= 1 image per class; "
                            "first: the official ConViT code's first int(n * f) files per class by name")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the label subset, held-out split, head init, batch order and random trunks")
    group.add_argument("--workers", type=int, default=0, help="data-loading processes (0: in the main process)")
    group.add_argument("--threads", type=int,
                       help="CPU threads for torch (default: torch's, all cores); 1 is often faster on a busy machine")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="where the trunk runs (default: cuda when available)")
    group.add_argument("--cache", metavar="DIR", type=Path, default=None,
                       help="feature cache folder, reused across probes of the same trunk (default: "
                            "<data root>/feature_cache; --no-cache turns it off)")
    group.add_argument("--no-cache", action="store_true", help="extract features without writing them to disk")
    group.add_argument("--out", metavar="DIR", type=Path, default=Path("runs") / "eval",
                       help="folder for the result JSON (default runs/eval; convit-ssl results gathers it)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("probe grid (each overrides the recipe)")
    grid.add_argument("--features", nargs="+", metavar="KEY",
                      help="feature choices: lastCLS, lastPOOL, concatCLS<n>, concatPOOL<n>, blkCLS<i>, blkPOOL<i>, "
                           "or keys joined by '+' (lastCLS+lastPOOL)")
    grid.add_argument("--lrs", nargs="+", type=float, metavar="LR",
                      help="learning rates (features are standardised: 0.03-1 usually suits)")
    grid.add_argument("--wds", nargs="+", type=float, metavar="WD", help="weight decays, e.g. 0 0.001")
    grid.add_argument("--epochs", type=int, help="epochs over the training images")
    grid.add_argument("--heldout-fraction", type=float,
                      help="per-class share of the training images kept out to choose the head (0.1: 10%%)")
    grid.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                      help="augment and run the trunk every epoch (big datasets) instead of caching features once")


def parse_options(pairs: List[str]) -> Dict[str, object]:
    """``["patch_size=4", "qkv_bias=true"]`` -> ``{"patch_size": 4, "qkv_bias": True}`` (YAML scalars)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--trunk-option {pair!r} is not KEY=VALUE: write e.g. --trunk-option patch_size=4")
        options[key.strip()] = yaml.safe_load(value)
    return options


# Command-line numbers that are not recipe fields (those are checked with the recipe): rule and good values.
_ARGUMENT_RANGES = {"fraction": ("(0, 1]", "0.01 for 1% of the labels"), "fractions": ("(0, 1]", "0.01 0.1 1"),
                    "ks": (">= 1", "10 20 100 200"), "temperature": ("> 0", "0.07"), "workers": (">= 0", "4"),
                    "threads": (">= 1", "1"), "finetune": (">= 1", "6")}


def check_arguments(args: argparse.Namespace) -> None:
    """Fail in one line naming the flag when a number of ``_ARGUMENT_RANGES`` is out of range (``recipe_from_args``
    checks the recipe's)."""
    for name, (rule, example) in _ARGUMENT_RANGES.items():
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else ([] if value is None else [value]):
            check_number(item, rule, f"--{name.replace('_', '-')}", example)
    if getattr(args, "network", None) and not getattr(args, "checkpoint", None):
        raise UsageError(f"--network {args.network} chooses a network of a --checkpoint: drop it with --random")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe (``--recipe``, else the one named like ``--data``, else digits) with the flags applied."""
    name = args.recipe
    if name is None:
        if args.data is None or args.data in recipe_names():
            name = args.data or DEFAULT_RECIPE
        else:
            raise UsageError(f"no recipe is named like dataset {args.data!r}: pass --recipe with one of "
                             f"{', '.join(recipe_names())} or a YAML path")
    overrides = {key: getattr(args, key, None) for key in
                 ("image_size", "crop_ratio", "batch_size", "epochs", "lrs", "wds", "features", "heldout_fraction",
                  "stream")}
    return load_recipe(name).replace(dataset=args.data, **overrides)


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def check_dataset(name: str) -> None:
    """Fail now, in one line, when the dataset is unknown or its folders are gone."""
    for split in ("train", "val"):
        dataset_split_dir(name, split)


def check_label_subsets(dataset: str, fractions: Sequence[float], rule: str, seed: int) -> None:
    """Fail now, in one line, when a label fraction keeps no training image (only the 'first' rule can drop every
    class: ``subsets.class_subset``)."""
    if rule != "first":
        return
    split = image_folder(dataset, "train")
    files = [path for path, _ in split.samples]
    for fraction in fractions:
        class_subset(split.targets, fraction, seed, rule, files)


def cache_from_args(args: argparse.Namespace) -> Optional[Path]:
    return None if args.no_cache else (args.cache or data_root() / "feature_cache")


def checkpoint_label(file: Path) -> str:
    """How results name a checkpoint file: ``<run folder>/<file stem>`` with links resolved
    (``runs/dino/checkpoint.torch`` -> ``dino/model_final_checkpoint_phase29``), or the file stem outside a run."""
    from convit_ssl.run_folder import is_run_folder

    resolved = Path(file).resolve()
    return f"{resolved.parent.name}/{resolved.stem}" if is_run_folder(resolved.parent) else resolved.stem


def checkpoint_model(path: Path, name: Optional[str] = None, arch: Optional[str] = None,
                     network: Optional[str] = None, **options) -> Tuple[torch.nn.Module, dict]:
    """(trunk, description for the result manifest) of a checkpoint file or a run folder (its latest checkpoint);
    ``network`` as ``load_trunk``'s.

    The description holds the path given, the file read (links resolved), its run folder's name, the sha256 of
    the file, the format, the network asked for and the arch; ``name`` defaults to ``checkpoint_label``.
    """
    from convit_ssl.checkpoint import checkpoint_file, load_trunk, run_folder_note
    from convit_ssl.run_folder import is_run_folder

    file = checkpoint_file(path)
    note = run_folder_note(path, file)
    if note:
        print(note)
    trunk, report = load_trunk(file, arch=arch, network=network, **options)
    resolved = file.resolve()
    return trunk, {"name": name or checkpoint_label(file), "source": "checkpoint", "checkpoint": str(path),
                   "file": str(resolved), "run": resolved.parent.name if is_run_folder(resolved.parent) else None,
                   "sha256": file_sha256(resolved), "format": report.source_format, "network": network,
                   "arch": report.arch,
                   "options": options, "load_report": str(report)}


def setup_from_args(args: argparse.Namespace) -> Tuple[Recipe, torch.nn.Module, dict]:
    """What linear-probe and knn start with, every check first: numbers, threads, recipe, the process group (when
    the environment names one, see ``distributed``), dataset, label subset, then the trunk."""
    check_arguments(args)
    apply_threads(args)
    recipe = recipe_from_args(args)
    args.device = distributed.init_from_env(args.device)
    check_dataset(recipe.dataset)
    check_label_subsets(recipe.dataset, [args.fraction], args.subset_rule, args.seed)
    trunk, model = model_from_args(args, recipe)
    return recipe, trunk, model


def write_command_result(body: dict, args: argparse.Namespace, recipe: Recipe, model: dict, prefix: str,
                         started: float) -> Optional[Path]:
    """Add the manifest and write ``<out>/<prefix>-<model>-<dataset>-f<fraction>-<weights>-<time>.json``.

    ``<weights>`` is the start of the trunk's state sha256; a name taken already (the same weights evaluated in
    the same second) gets ``-2``, ``-3``, ... (``write_new_result``): no result replaces another. Returns the path;
    with several processes only rank 0 writes (the others return None).
    """
    if not distributed.is_main():
        return None
    body["manifest"] = make_manifest([model], vars(args), {"seed": args.seed}, started)
    name = (f"{prefix}-{slug(model['name'])}-{recipe.dataset}-f{args.fraction:g}-{body['trunk']['sha256_before'][:8]}-"
            f"{time.strftime('%Y%m%d-%H%M%S')}")
    return write_new_result(body, args.out, name)


def model_from_args(args: argparse.Namespace, recipe: Recipe) -> Tuple[torch.nn.Module, dict]:
    """(trunk on ``--device``, description for the result manifest) from --checkpoint or --random."""
    from convit_ssl.models import create_trunk

    options = parse_options(args.trunk_option)
    if args.checkpoint:
        trunk, info = checkpoint_model(args.checkpoint, args.name, args.arch, args.network, **options)
    else:
        options.setdefault("img_size", recipe.image_size)
        torch.manual_seed(args.seed)
        trunk = create_trunk(args.random, **options)
        info = {"name": args.name or args.random, "source": "random", "arch": args.random, "options": options,
                "init_seed": args.seed}
    return trunk.to(args.device), info
