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
import sys
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


def _evaluate(trunk, dataset: str, name: str, model: Dict, out: Path) -> Dict[str, float]:
    """Linear-probe grid and kNN of a frozen trunk; both results (with manifests) are written into ``out``."""
    from convit_ssl.evaluation.knn import knn_evaluation
    from convit_ssl.evaluation.linear_probe import linear_probe, load_recipe
    from convit_ssl.evaluation.results import make_manifest, write_result

    started = time.time()
    recipe = load_recipe("digits")
    model = {"name": name, **model}
    probe = linear_probe(trunk, recipe, dataset=dataset, model=model)
    knn = knn_evaluation(trunk, dataset, recipe.preprocess, features=("lastCLS",), ks=(KNN_K,), model=model)
    for kind, body in (("linear_probe", probe), ("knn", knn)):
        body["manifest"] = make_manifest([model], {"command": "demo", "dataset": dataset}, {"seed": 0}, started)
        write_result(body, out / f"{kind}-{name}.json")
    chosen = probe["chosen"]
    return {"linear_top1": chosen["test_top1"], "linear_feature": chosen["feature"],
            "knn_top1": knn["accuracy"]["lastCLS"][str(KNN_K)]["top1"]}


def _pretrain_in_parallel(jobs: Dict[str, List[str]], out: Path) -> float:
    """Run ``convit-ssl train`` for every job at once, one thread each (small matrices use two cores better
    as two processes than as two threads of one), printing progress; returns the wall time."""
    import re
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    processes, logs = {}, {}
    started = time.time()
    for label, words in jobs.items():
        logs[label] = out / f"{_slug(label)}.log"
        with open(logs[label], "w") as log:
            processes[label] = subprocess.Popen([sys.executable, "-m", "convit_ssl", "train", *words], env=env,
                                                stdout=log, stderr=subprocess.STDOUT)
    epoch = re.compile(r"\[ep: (\d+)\] iter: (\d+)")
    while any(process.poll() is None for process in processes.values()):
        time.sleep(10)
        status = []
        for label in jobs:
            found = epoch.findall(logs[label].read_text(errors="replace"))
            status.append(f"{label} epoch {int(found[-1][0]) + 1}" if found else f"{label} starting")
        print(f"[demo] {time.time() - started:4.0f} s: " + ", ".join(status), flush=True)
    failed = [label for label, process in processes.items() if process.returncode != 0]
    if failed:
        tail = logs[failed[0]].read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"pretraining of {', '.join(failed)} failed; end of {logs[failed[0]]}:\n" + "\n".join(tail))
    return time.time() - started


def _slug(label: str) -> str:
    return label.lower().replace(" ", "_")


def run(args: argparse.Namespace) -> int:
    import torch

    from convit_ssl import engine
    from convit_ssl.checkpoint import load_trunk
    from convit_ssl.models import ConViT
    from convit_ssl.report import write_report
    from convit_ssl.trunk_config import trunk_kwargs

    out = Path(args.out or Path(os.environ.get("CONVIT_SSL_RUNS", "runs")) / "demo").resolve()
    out.mkdir(parents=True, exist_ok=True)
    epochs = [f"config.OPTIMIZER.num_epochs={args.epochs}"] if args.epochs else []
    jobs, configs = {}, {}
    for label, extra in TRUNKS.items():
        words = [f"config={RECIPE}", f"data={args.dataset}", *extra, *epochs, f"run_dir={out / _slug(label)}"]
        configs[label] = engine.compose(words)  # validates before anything runs
        jobs[label] = words
        print(f"[demo] {label}: convit-ssl train {' '.join(words)}", flush=True)
    try:
        pretrain_s = _pretrain_in_parallel(jobs, out)
    except RuntimeError as error:
        print(f"convit-ssl demo: {error}", file=sys.stderr)
        return 1
    print(f"[demo] pretraining done in {pretrain_s:.0f} s; probing the frozen trunks", flush=True)

    rows: List[dict] = []
    for label, config in configs.items():
        run_dir = Path(config.CHECKPOINT.DIR)
        trunk, _ = load_trunk(run_dir / "checkpoint.torch")
        torch.manual_seed(config.SEED_VALUE)
        random_trunk = ConViT(**trunk_kwargs(config.MODEL))
        models = (("SimCLR", trunk, {"source": "checkpoint", "checkpoint": str(run_dir / "checkpoint.torch")}),
                  ("random init", random_trunk, {"source": "random", "init_seed": config.SEED_VALUE}))
        for method, model, description in models:
            started = time.time()
            scores = _evaluate(model, args.dataset, f"{_slug(method)}-{_slug(label)}", description, run_dir / "eval")
            spent = time.time() - started + (pretrain_s if method == "SimCLR" else 0.0)
            rows.append({"method": method, "trunk": label, **scores, "wall_s": round(spent, 1)})

    table = _table(rows)
    (out / "demo_results.json").write_text(json.dumps({"dataset": args.dataset, "recipe": RECIPE, "rows": rows}, indent=2))
    (out / "demo_results.md").write_text(table + "\n")
    convit_dir = Path(configs["ConViT"].CHECKPOINT.DIR)
    report_dir = write_report(convit_dir)
    convit, random_convit = rows[0], rows[1]
    wins = convit["linear_top1"] > random_convit["linear_top1"] and convit["knn_top1"] > random_convit["knn_top1"]
    print("\n" + table)
    print("(SimCLR wall time: both pretrainings ran side by side, plus the probes)")
    print(f"\nSSL-pretrained ConViT {'beats' if wins else 'does NOT beat'} its random initialisation on both the "
          f"linear probe and kNN (test split of {args.dataset}).")
    print(f"runs, checkpoints, metrics.json, TensorBoard logs: {out}")
    print(f"gate report of the ConViT run: {report_dir}")
    print("\nthe same, one override away:\n"
          f"  convit-ssl train config={RECIPE} data={args.dataset}                 # this demo's ConViT\n"
          f"  convit-ssl train config=dino model=convit_tiny data={args.dataset}   # another method and size\n"
          "  convit-ssl train config=simclr model=convit_small data=imagenet1k   # the cluster recipe\n"
          f"  convit-ssl linear-probe --checkpoint {convit_dir / 'checkpoint.torch'} --recipe digits\n"
          f"  convit-ssl report {convit_dir}")
    return 0


def _table(rows: List[dict]) -> str:
    lines = ["| method | trunk | linear-probe top-1 | kNN top-1 (k=20) | wall time |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['trunk']} | {row['linear_top1']:.1f}% ({row['linear_feature']}) | "
                     f"{row['knn_top1']:.1f}% | {row['wall_s']:.0f} s |")
    return "\n".join(lines)
