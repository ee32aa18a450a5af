"""``convit-ssl report``: figures and a summary of what the gates learned (see ``convit_ssl.report``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from convit_ssl.errors import UsageError

EPILOG = """examples:
  convit-ssl report runs/dino_convit_tiny                 # writes runs/dino_convit_tiny/report/
  convit-ssl report model_final_checkpoint_phase99.torch --out report_ckpt
  convit-ssl report --compare runs/convit runs/convit_no_local_init --out report_compare

A run folder gives final gates, gate trajectories and attention distances over training (from
gating_metrics.jsonl, written when HOOKS.CONVIT_GATING.ENABLE is on), attention maps, the training loss
and collapse checks (metrics.json, health.jsonl) and the results of linear-probe and knn on the run's
checkpoints (found by the checkpoint named in each result's manifest, in the run folder, eval/ beside it,
runs/eval or --results DIR). Takes seconds on a CPU; a checkpoint is loaded once.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("source", nargs="?", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a VISSL run folder, or one checkpoint file (VISSL, timm, DINO or official format)")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                        help="overlay the gate trajectories and attention distances of two run folders")
    parser.add_argument("--out", metavar="DIR",
                        help="report folder (default RUN_DIR/report; required for a checkpoint file and --compare)")
    parser.add_argument("--results", nargs="+", metavar="DIR", default=[],
                        help="more folders of linear-probe/knn result files (searched besides the run folder, "
                             "eval/ beside it and runs/eval); results of this run's checkpoints are listed")
    parser.add_argument("--image", metavar="FILE",
                        help="image for the attention maps (default: the first image of the run's dataset, "
                             "else a synthetic pattern)")


def run(args: argparse.Namespace) -> int:
    from convit_ssl import report

    if args.compare and args.source:
        raise UsageError("give either RUN_DIR_OR_CHECKPOINT or --compare RUN_A RUN_B, not both")
    if args.compare:
        if args.out is None:
            raise UsageError("--compare needs --out DIR: the comparison belongs to neither run folder")
        if args.image is not None or args.results:
            raise UsageError("--image and --results are for the report of one run or checkpoint, not for --compare")
        for run_dir in args.compare:
            if not Path(run_dir).is_dir():
                raise UsageError(f"{run_dir} is not a folder: --compare takes two run folders")
        summary = report.write_comparison(*args.compare, out_dir=args.out)
    elif args.source:
        if args.results and not Path(args.source).is_dir():
            raise UsageError("--results lists the evaluations of a run folder's checkpoints: pass a run folder")
        for folder in args.results:
            if not Path(folder).is_dir():
                raise UsageError(f"--results {folder} is not a folder: pass folders of linear-probe/knn results")
        summary = report.write_report(args.source, out_dir=args.out, image_path=args.image, results=args.results)
    else:
        raise UsageError("give a run folder or a checkpoint file, or --compare RUN_A RUN_B --out DIR")
    print(f"wrote {summary.parent}: {', '.join(sorted(p.name for p in summary.parent.iterdir()))}")
    return 0
