"""`convit-ssl demo`: SSL on the digits, ConViT vs its DeiT twin vs random init, one table.

Steps: pretrain a small ConViT with the demo recipe (``config=digits_simclr``, chosen on the ``digits_val``
split, never on the test split), then its DeiT twin (the same recipe with ``trunk.local_up_to_layer=0``);
measure the four frozen trunks (both pretrained, both at random init) with the digits linear-probe recipe
(a grid of heads chosen on held-out training images) and weighted kNN (k = 20, T = 0.07) on the test split;
print one table, write it as JSON and Markdown, and write the gate report of the ConViT run. Rerunning
resumes the runs (finished ones are not trained again).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Dict, List

RECIPE = "digits_simclr"
TRUNKS = {"ConViT": [], "DeiT twin": ["trunk.local_up_to_layer=0"]}
KNN_K = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help="folder of the demo's runs and results (default: $CONVIT_SSL_RUNS/demo, else runs/demo)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the recipe's)")
    parser.add_argument("--dataset", default="digits", help="catalog dataset to pretrain and evaluate on")


def _evaluate(trunk, dataset: str, name: str) -> Dict[str, float]:
    from convit_ssl.evaluation.knn import knn_evaluation
    from convit_ssl.evaluation.linear_probe import linear_probe, load_recipe

    recipe = load_recipe("digits")
    probe = linear_probe(trunk, recipe, dataset=dataset, model={"name": name})
    knn = knn_evaluation(trunk, dataset, recipe.preprocess, features=("lastCLS",), ks=(KNN_K,), model={"name": name})
    chosen = probe["chosen"]
    return {"linear_top1": chosen["test_top1"], "linear_feature": chosen["feature"],
            "knn_top1": knn["accuracy"]["lastCLS"][str(KNN_K)]["top1"]}


def run(args: argparse.Namespace) -> int:
    import torch

    from convit_ssl import engine
    from convit_ssl.checkpoint import load_trunk
    from convit_ssl.models import ConViT
    from convit_ssl.report import write_report
    from convit_ssl.vissl_glue import trunk_kwargs

    out = Path(args.out or Path(os.environ.get("CONVIT_SSL_RUNS", "runs")) / "demo").resolve()
    epochs = [f"config.OPTIMIZER.num_epochs={args.epochs}"] if args.epochs else []
    rows: List[dict] = []
    run_dirs = {}
    for label, extra in TRUNKS.items():
        words = [f"config={RECIPE}", f"data={args.dataset}", *extra, *epochs]
        run_dir = out / label.lower().replace(" ", "_")
        config = engine.compose(words, run_dir=str(run_dir))
        print(f"[demo] pretraining {label} with SimCLR: convit-ssl train {' '.join(words)} run_dir={run_dir}",
              flush=True)
        started = time.time()
        engine.train(config)
        pretrain_s = time.time() - started
        run_dirs[label] = run_dir
        trunk, _ = load_trunk(run_dir / "checkpoint.torch")
        started = time.time()
        rows.append({"method": "SimCLR", "trunk": label, **_evaluate(trunk, args.dataset, f"simclr-{label}"),
                     "wall_s": round(pretrain_s + time.time() - started, 1)})
        torch.manual_seed(config.SEED_VALUE)
        random_trunk = ConViT(**trunk_kwargs(config.MODEL))
        started = time.time()
        rows.append({"method": "random init", "trunk": label,
                     **_evaluate(random_trunk, args.dataset, f"random-{label}"),
                     "wall_s": round(time.time() - started, 1)})
        print(f"[demo] {label}: " + "; ".join(f"{r['method']} linear {r['linear_top1']:.1f}% kNN {r['knn_top1']:.1f}%"
                                               for r in rows[-2:]), flush=True)

    table = _table(rows)
    (out / "demo_results.json").write_text(json.dumps({"dataset": args.dataset, "recipe": RECIPE, "rows": rows}, indent=2))
    (out / "demo_results.md").write_text(table + "\n")
    report_dir = write_report(run_dirs["ConViT"])
    convit, random_convit = rows[0], rows[1]
    wins = convit["linear_top1"] > random_convit["linear_top1"] and convit["knn_top1"] > random_convit["knn_top1"]
    print("\n" + table)
    print(f"\nSSL-pretrained ConViT {'beats' if wins else 'does NOT beat'} its random initialisation on "
          f"{'both the linear probe and kNN' if wins else 'both measures'} (test split of {args.dataset}).")
    print(f"runs, checkpoints, metrics.json, TensorBoard logs: {out}")
    print(f"gate report of the ConViT run: {report_dir}")
    print("\nthe same, one override away:\n"
          f"  convit-ssl train config={RECIPE} data={args.dataset}                 # this demo's ConViT\n"
          f"  convit-ssl train config=dino model=convit_tiny data={args.dataset}   # another method and size\n"
          "  convit-ssl train config=simclr model=convit_small data=imagenet1k   # the cluster recipe\n"
          f"  convit-ssl linear-probe --checkpoint {run_dirs['ConViT'] / 'checkpoint.torch'} --recipe digits\n"
          f"  convit-ssl report {run_dirs['ConViT']}")
    return 0


def _table(rows: List[dict]) -> str:
    lines = ["| method | trunk | linear-probe top-1 | kNN top-1 (k=20) | wall time |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['trunk']} | {row['linear_top1']:.1f}% ({row['linear_feature']}) | "
                     f"{row['knn_top1']:.1f}% | {row['wall_s']:.0f} s |")
    return "\n".join(lines)
