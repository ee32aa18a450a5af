"""`convit-ssl export-timm CHECKPOINT OUT.pth`: a VISSL (or DINO, official) checkpoint's trunk as timm keys."""
from __future__ import annotations

import argparse

from convit_ssl.checkpoint import NETWORKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("The output loads into timm's model of the same size with strict=False (only its classifier "
                     "head.* is missing), e.g. timm.create_model('convit_small', num_classes=100), so SSL weights "
                     "can be fine-tuned with timm or the official ConViT code.")
    parser.add_argument("checkpoint", help="VISSL checkpoint (.torch), or any checkpoint convit-ssl reads, or a run "
                                           "folder (its latest checkpoint: checkpoint.torch, else the final one)")
    parser.add_argument("out", help="where to write the timm state dict (.pth); written atomically, never over an "
                                    "input")
    parser.add_argument("--arch", default=None, help="preset name, when the shapes are ambiguous (default: inferred)")
    parser.add_argument("--network", choices=NETWORKS, default=None,
                        help="a DINO run's student, or a training checkpoint's EMA (default: a DINO run's teacher, "
                             "else the trained model)")


def run(args: argparse.Namespace) -> int:
    from convit_ssl.checkpoint import checkpoint_file, export_timm, run_folder_note

    note = run_folder_note(args.checkpoint, checkpoint_file(args.checkpoint))
    if note:
        print(note)
    report = export_timm(args.checkpoint, args.out, arch=args.arch, network=args.network)
    print(f"{report}\nwrote {args.out}")
    return 0
