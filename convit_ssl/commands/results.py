"""convit-ssl results: one table from the result files of linear-probe, knn and study.

  convit-ssl results runs/eval                       # Markdown table on stdout
  convit-ssl results runs/eval runs/study --csv all.csv --markdown all.md
  convit-ssl results runs/eval --kind knn

Each row is one reported number set: the chosen head of a probe, one k of a kNN run, one model and fraction of a
study. The files behind the rows hold the rest (the whole probe grid, the manifest).
"""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.epilog = __doc__
    parser.add_argument("paths", nargs="+", type=Path, metavar="DIR",
                        help="folders (searched recursively) or result JSON files")
    parser.add_argument("--kind", choices=("linear_probe", "knn", "low_data_probe", "finetune"),
                        help="keep only rows of this kind")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the rows as CSV (full precision)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the Markdown table to FILE")


def run(args) -> int:
    from convit_ssl import atomic
    from convit_ssl.errors import UsageError
    from convit_ssl.evaluation.results import csv_text, gather, markdown_table

    rows = [row for row in gather(args.paths) if args.kind is None or row.get("kind") == args.kind]
    if not rows:
        raise UsageError(f"no result rows in {', '.join(map(str, args.paths))}: point at folders that linear-probe, "
                         f"knn or study wrote (default runs/eval)")
    table = markdown_table(rows)
    print(table, end="")
    if args.markdown:
        atomic.write_text(table, args.markdown)
    if args.csv:
        atomic.write_text(csv_text(rows), args.csv)
    return 0
