"""`convit-ssl demo`: SSL on the digits, ConViT vs its DeiT twin vs random init, one table.

Steps, for one method (``--method simclr``, the default and ``make demo``) or each of them (``--method all``):
pretrain a small ConViT with the method's digits recipe (``config=digits_<method>``, chosen on the ``digits_val``
split, never on the test split) and its DeiT twin (the same recipe with ``trunk.local_up_to_layer=0``), side by
side, each through ``convit_ssl.engine.train`` (the code path of ``convit-ssl train``) in a process of its own;
measure the frozen trunks (both pretrained, both at random init) with the digits linear-probe recipe (a grid of
heads chosen on held-out training images) and weighted kNN (k = 20, T = 0.07) on the test split; write the table
(Markdown and JSON) and the gate report of the ConViT run, which shows the run's training loss and health.
Progress and results are read from the run folders (``metrics.json``, ``health.jsonl``, the final checkpoint).
Rerunning resumes the runs (finished ones are not trained again).

Layout of ``--out`` (default ``runs/demo``): ``<method>/convit`` and ``<method>/deit_twin`` (run folders, with
the evaluation results in ``eval/``), ``<method>/demo_results.{md,json}``, ``<method>/pretraining_wall_s.json``
(the pretrainings' wall times, kept when a rerun finds them finished), ``random_init/<trunk>/`` (the random
trunks' results, measured once for all methods), and ``demo_methods.{md,json}``: the rows of every method
demonstrated into ``--out`` on that dataset, by one ``--method all`` or by single-method runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from convit_ssl.errors import UsageError

# method -> (name in tables, digits recipe)
METHODS = {
    "simclr": ("SimCLR", "digits_simclr"),
    "dino": ("DINO", "digits_dino"),
    "moco": ("MoCo v2", "digits_moco"),
    "swav": ("SwAV", "digits_swav"),
    "barlow_twins": ("Barlow Twins", "digits_barlow_twins"),
}
TRUNKS = {"ConViT": [], "DeiT twin": ["trunk.local_up_to_layer=0"]}
RANDOM_INIT = "random init"
KNN_K = 20
POLL_S = 10.0
WALL_TIMES = "pretraining_wall_s.json"  # in <out>/<method>: each trunk's pretraining wall time, when it trained
COLUMNS = ("method", "trunk", "linear_top1", "knn_top1", "linear_feature", "beats_random_init", "pretrain_s",
           "eval_s", "symptoms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="simclr", choices=[*METHODS, "all"],
                        help="SSL method to demonstrate (default simclr, the quick one of make demo); all: every "
                             "method, one after the other, and one table of them (about 5 minutes a method on 2 "
                             "cores)")
    parser.add_argument("--out", default=None,
                        help="folder of the demo's runs and results (default: $CONVIT_SSL_RUNS/demo, else runs/demo)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the recipe's)")
    parser.add_argument("--dataset", default="digits",
                        help="catalog dataset to pretrain and evaluate on (digits_val: the held-out split that "
                             "recipes are chosen on)")


def plan(methods: Sequence[str], dataset: str, out: Path, epochs: Optional[int]) -> Dict[str, Dict[str, List[str]]]:
    """``convit-ssl train`` words of every pretraining: ``{method: {trunk label: words}}``."""
    extra = [f"config.OPTIMIZER.num_epochs={epochs}"] if epochs is not None else []
    return {method: {label: [f"config={METHODS[method][1]}", f"data={dataset}", *trunk, *extra,
                             f"run_dir={out / method / _slug(label)}"]
                     for label, trunk in TRUNKS.items()}
            for method in methods}


def _slug(label: str) -> str:
    return label.lower().replace(" ", "_")


# ---------------------------------------------------------------------------------------------- pretraining
def _train_in_own_process(config, threads: int, log_path: str) -> None:
    """``engine.train(config)`` with ``threads`` threads, its output (VISSL's log) appended to ``log_path``."""
    import torch

    from convit_ssl import engine

    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the data-loading processes VISSL starts
    torch.set_num_threads(threads)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    engine.train(config)


def epoch_progress(run_dir: Path, epochs: int) -> str:
    """``epoch 3/30, loss 4.1234`` from the run folder's ``metrics.json``, or ``starting`` before its first epoch."""
    from convit_ssl.report import load_epoch_losses

    done = load_epoch_losses(run_dir)
    if not done:
        return "starting"
    return f"epoch {len(done)}/{epochs}, loss {done[-1]['train_loss']:.4f}"


def pretrain_side_by_side(configs: Mapping[str, object], logs: Path) -> Dict[str, float]:
    """Train every config at once, each in a process of its own with an equal share of the cores (small matrices
    use two cores better as two processes than as two threads of one), printing each run's progress; returns
    each run's wall time in seconds. Raises RuntimeError naming the runs that failed, with the end of a log."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")  # a fresh interpreter each, as `convit-ssl train` would be
    threads = max(1, (os.cpu_count() or 1) // len(configs))
    processes, paths, wall = {}, {}, {}
    started = time.time()
    for label, config in configs.items():
        paths[label] = logs / f"{_slug(label)}.log"
        processes[label] = context.Process(target=_train_in_own_process, args=(config, threads, str(paths[label])),
                                           name=f"demo-{_slug(label)}")
        processes[label].start()
    try:
        while len(wall) < len(processes):
            ended = wait([process.sentinel for label, process in processes.items() if label not in wall],
                         timeout=POLL_S)
            for label, process in processes.items():
                if label not in wall and (process.sentinel in ended or not process.is_alive()):
                    process.join()  # its sentinel is ready a moment (seconds, under load) before it has exited
                    wall[label] = time.time() - started
            status = [f"{label} " + ("done" if label in wall else epoch_progress(
                Path(config.CHECKPOINT.DIR), config.OPTIMIZER.num_epochs)) for label, config in configs.items()]
            print(f"[demo] {time.time() - started:4.0f} s: " + ", ".join(status), flush=True)
    finally:  # interrupted (Ctrl-C): a training still running checkpoints on SIGTERM and resumes on a rerun
        for process in processes.values():
            if process.is_alive():
                process.terminate()
                process.join()
    failed = [label for label, process in processes.items()
              if process.exitcode != 0 or _final_checkpoint(configs[label]) is None]
    if failed:
        tail = paths[failed[0]].read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"pretraining of {', '.join(failed)} failed; end of {paths[failed[0]]}:\n" + "\n".join(tail))
    return wall


def pretraining_wall_times(configs: Mapping[str, object], folder: Path) -> Dict[str, Optional[float]]:
    """Train the configs whose run has no final checkpoint yet (side by side) and record their wall times in
    ``folder/WALL_TIMES``; returns the recorded wall time of every config (None: finished before any record). A
    rerun trains nothing that finished, so the table keeps the times of the runs that trained."""
    from convit_ssl import atomic

    path = folder / WALL_TIMES
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    unfinished = {label: config for label, config in configs.items() if not finished(config)}
    if unfinished:
        print("[demo] pretraining " + " and ".join(unfinished) + " side by side", flush=True)
        recorded.update({label: round(wall, 1) for label, wall in pretrain_side_by_side(unfinished, folder).items()})
        atomic.write_json(recorded, path)
    return {label: recorded.get(label) for label in configs}


def finished(config) -> bool:
    """Whether the run of ``config`` has its final checkpoint; a run folder that finished with another config is
    refused (a UsageError naming the first differences), since the demo would report the old run."""
    from convit_ssl import engine, run_folder

    run_dir = Path(config.CHECKPOINT.DIR)
    final, recorded = _final_checkpoint(config), run_folder.recorded_config(run_dir)
    if final is None or recorded is None:
        return False
    differences = run_folder.config_differences(recorded, engine.plain_config(config))
    if differences:
        raise UsageError(f"{run_dir} holds a finished run of another config ({run_folder.describe(dict(list(differences.items())[:3]))}): "
                         f"pass another --out, or delete that run folder to train it again")
    return True


def _final_checkpoint(config) -> Optional[Path]:
    from convit_ssl.run_folder import final_checkpoint

    return final_checkpoint(config.CHECKPOINT.DIR)


def run_symptoms(run_dir: Path) -> List[str]:
    """The collapse symptoms the health hook recorded in the run's ``health.jsonl``: one line per kind, its latest
    sentence and how often (``health.symptom_lines``)."""
    from convit_ssl.health import symptom_lines
    from convit_ssl.report import load_gating_metrics
    from convit_ssl.run_folder import HEALTH_FILE

    path = run_dir / HEALTH_FILE
    return symptom_lines(load_gating_metrics(path, "health record") if path.is_file() else [])


# ---------------------------------------------------------------------------------------------- evaluation
def _evaluate(trunk, dataset: str, name: str, model: Dict, out: Path) -> Dict[str, object]:
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
            "knn_top1": knn["accuracy"]["lastCLS"][str(KNN_K)]["top1"], "eval_s": round(time.time() - started, 1)}


def _random_init_row(config, label: str, dataset: str, out: Path, measured: Dict[str, dict]) -> dict:
    """The random-init row of trunk ``label``: measured once per trunk shape and seed (the same for every method)."""
    import torch

    from convit_ssl.models import ConViT
    from convit_ssl.trunk_config import trunk_kwargs

    kwargs = trunk_kwargs(config.MODEL)
    key = json.dumps([kwargs, config.SEED_VALUE], sort_keys=True, default=str)
    if key not in measured:
        torch.manual_seed(config.SEED_VALUE)
        trunk = ConViT(**kwargs)
        scores = _evaluate(trunk, dataset, f"random_init-{_slug(label)}", {"source": "random",
                           "init_seed": config.SEED_VALUE}, out / "random_init" / _slug(label))
        measured[key] = {"method": RANDOM_INIT, "trunk": label, **scores}
    return measured[key]


def beats(row: Mapping, baseline: Mapping) -> bool:
    """Whether ``row`` is above ``baseline`` on both the linear probe and kNN."""
    return row["linear_top1"] > baseline["linear_top1"] and row["knn_top1"] > baseline["knn_top1"]


def verdicts(rows: Sequence[Mapping]) -> List[str]:
    """One line per pretrained method: does its ConViT beat its random init, and its DeiT twin, on both measures."""
    by_key = {(row["method"], row["trunk"]): row for row in rows}
    lines = []
    for method in dict.fromkeys(row["method"] for row in rows if row["method"] != RANDOM_INIT):
        convit, twin = by_key[(method, "ConViT")], by_key.get((method, "DeiT twin"))
        line = (f"{method}: the pretrained ConViT {'beats' if beats(convit, by_key[(RANDOM_INIT, 'ConViT')]) else 'does NOT beat'}"
                f" its random initialisation on both the linear probe and kNN")
        if twin is not None:
            line += f", and {'beats' if beats(convit, twin) else 'does NOT beat'} its pretrained DeiT twin on both"
        lines.append(line + ".")
    return lines


def write_tables(rows: Sequence[Mapping], out: Path, stem: str, about: Mapping) -> str:
    """``<stem>.md`` (the table and the verdicts) and ``<stem>.json`` (``about`` and the rows) in ``out``; returns
    the Markdown."""
    from convit_ssl import atomic
    from convit_ssl.evaluation.results import markdown_table

    shown = [{**row, "symptoms": "; ".join(row.get("symptoms") or []) or None} for row in rows]
    text = markdown_table(shown, COLUMNS) + "\n" + "\n".join(verdicts(rows)) + "\n"
    atomic.write_text(text, out / f"{stem}.md")
    atomic.write_json({**about, "rows": list(rows)}, out / f"{stem}.json")
    return text


def write_method_tables(out: Path, dataset: str) -> Optional[str]:
    """``demo_methods.{md,json}`` in ``out``: the rows of every method whose last demo into ``out`` measured
    ``dataset`` (``<method>/demo_results.json``, each method's demo run on its own or by ``--method all``), in
    ``METHODS`` order, random init once per trunk, and the verdicts; the JSON names the methods not measured.
    Returns the Markdown, or None (and writes nothing) when no method measured ``dataset`` there."""
    rows: List[dict] = []
    measured = {}
    for method in METHODS:
        path = out / method / "demo_results.json"
        if not path.is_file():
            continue
        try:
            result = json.loads(path.read_text())
            if result["dataset"] != dataset:
                continue
            method_rows = result["rows"]
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{path} is not a demo result ({error}): delete it and rerun "
                             f"`convit-ssl demo --method {method}`")
        measured[method] = METHODS[method][1]
        shown = {(row["method"], row["trunk"]) for row in rows}
        rows += [row for row in method_rows if (row["method"], row["trunk"]) not in shown]
    if not rows:
        return None
    about = {"dataset": dataset, "methods": measured, "not_measured": [m for m in METHODS if m not in measured],
             "pretraining": "per method, both trunks side by side, one process each; each method's rows from its "
                            "last demo into this folder"}
    return write_tables(rows, out, "demo_methods", about)


# ---------------------------------------------------------------------------------------------- the command
def _demonstrate(method: str, configs: Mapping[str, object], dataset: str, out: Path,
                 random_rows: Dict[str, dict]) -> None:
    """Pretrain and measure one method (both trunks); its rows, random init first, go to
    ``<method>/demo_results.{md,json}``."""
    from convit_ssl.checkpoint import load_trunk
    from convit_ssl.report import write_report

    name, recipe = METHODS[method]
    wall = pretraining_wall_times(configs, out / method)
    print(f"[demo] {name}: pretraining done ({', '.join(f'{label} {wall.get(label) or 0:.0f} s' for label in configs)});"
          f" probing the frozen trunks", flush=True)
    rows = []
    for label, config in configs.items():
        baseline = _random_init_row(config, label, dataset, out, random_rows)
        run_dir = Path(config.CHECKPOINT.DIR)
        checkpoint = _final_checkpoint(config)
        trunk, _ = load_trunk(checkpoint)
        scores = _evaluate(trunk, dataset, f"{method}-{_slug(label)}", {"source": "checkpoint",
                           "checkpoint": str(checkpoint)}, run_dir / "eval")
        row = {"method": name, "trunk": label, **scores, "pretrain_s": wall.get(label),
               "epochs": config.OPTIMIZER.num_epochs, "recipe": recipe, "run_dir": str(run_dir),
               "symptoms": run_symptoms(run_dir)}
        rows += [baseline, {**row, "beats_random_init": beats(row, baseline)}]
    about = {"dataset": dataset, "method": method, "recipe": recipe,
             "pretraining": "both trunks side by side, one process each"}
    print("\n" + write_tables(rows, out / method, "demo_results", about), flush=True)
    print(f"gate report of the ConViT run (training loss and health too): "
          f"{write_report(configs['ConViT'].CHECKPOINT.DIR)}", flush=True)


def run(args: argparse.Namespace) -> int:
    from convit_ssl import engine

    out = Path(args.out or Path(os.environ.get("CONVIT_SSL_RUNS", "runs")) / "demo").resolve()
    methods = list(METHODS) if args.method == "all" else [args.method]
    words = plan(methods, args.dataset, out, args.epochs)
    configs = {method: {label: engine.compose(w) for label, w in trunks.items()}  # validates before anything runs
               for method, trunks in words.items()}
    for trunks in configs.values():
        for config in trunks.values():
            finished(config)  # refuses a finished run of another config before anything runs
    for method, trunks in words.items():
        for label, w in trunks.items():
            print(f"[demo] {METHODS[method][0]}, {label}: convit-ssl train {' '.join(w)}", flush=True)
    for method in methods:
        (out / method).mkdir(parents=True, exist_ok=True)
    random_rows: Dict[str, dict] = {}
    try:
        for method in methods:
            _demonstrate(method, configs[method], args.dataset, out, random_rows)
    except RuntimeError as error:
        print(f"convit-ssl demo: {error}", file=sys.stderr)
        return 1
    table = write_method_tables(out, args.dataset)
    if args.method == "all":
        print("\nall methods:\n" + table, flush=True)
    print(f"every method demonstrated on {args.dataset} in this folder, one table: {out / 'demo_methods.md'}")
    print(f"runs, checkpoints, metrics.json, health.jsonl, TensorBoard logs: {out}")
    convit_dir = configs[methods[0]]["ConViT"].CHECKPOINT.DIR
    print("\nthe same, one override away:\n"
          f"  convit-ssl train config={METHODS[methods[0]][1]} data={args.dataset}   # this demo's ConViT\n"
          f"  convit-ssl train config=dino model=convit_tiny data={args.dataset}   # another method and size\n"
          "  convit-ssl train config=simclr model=convit_small data=imagenet1k   # the cluster recipe\n"
          f"  convit-ssl linear-probe --checkpoint {convit_dir} --recipe digits\n"
          f"  convit-ssl report {convit_dir}")
    return 0
