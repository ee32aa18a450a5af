"""The ``convit-ssl`` command: one subcommand per module of ``convit_ssl.commands``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only
when its subcommand runs, so ``convit-ssl --help`` stays fast. Errors that a user can fix
(``convit_ssl.errors.UsageError`` and its subclasses) print one line; any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from convit_ssl.errors import UsageError

# (subcommand, module under convit_ssl.commands, one-line help)
COMMANDS = [
    ("train", "train", "SSL pretraining from a config: convit-ssl train config=dino model=convit_tiny data=digits"),
    ("finetune", "finetune", "fine-tune a trunk and a new head on all or some labels, through VISSL's engine"),
    ("linear-probe", "linear_probe", "grid of linear probes on a frozen trunk, best head chosen on held-out data"),
    ("knn", "knn", "weighted kNN evaluation of a frozen trunk (DINO protocol)"),
    ("study", "study", "studies over several runs; 'study low-data' is the paper's sample-efficiency protocol"),
    ("results", "results", "gather result JSON files into one Markdown (and CSV) table"),
    ("report", "report", "figures and a summary of what the gates learned, for a run folder or a checkpoint"),
    ("prepare-data", "prepare_data", "turn an image folder or a CIFAR archive into a dataset VISSL reads"),
    ("export-timm", "export_timm", "write the trunk of a VISSL checkpoint as a timm state dict"),
    ("demo", "demo", "the main job: pretrain on digits, probe ConViT vs DeiT vs random init, print one table"),
]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a mistake on the command line in one line (and exit status 2), without the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convit-ssl",
        description="ConViT trunks for self-supervised pretraining and evaluation with VISSL.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def _command_parser(name: str, module_name: str, help_text: str):
    module = importlib.import_module(f"convit_ssl.commands.{module_name}")
    parser = OneLineParser(prog=f"convit-ssl {name}", description=help_text,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return module, parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    by_name = {name: (module, help_text) for name, module, help_text in COMMANDS}
    if argv[0] not in by_name:
        print(f"convit-ssl: error: unknown command {argv[0]!r}; choose from {', '.join(by_name)}", file=sys.stderr)
        return 2
    module, parser = _command_parser(argv[0], *by_name[argv[0]])
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exit_:  # --help (0), or a mistake OneLineParser printed in one line (2)
        return exit_.code
    try:
        return int(module.run(args) or 0)
    except UsageError as error:
        print(f"convit-ssl {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"convit-ssl {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
