"""convit-ssl prepare-data: register a dataset in the catalog that VISSL and the evaluation commands read.

  convit-ssl prepare-data digits                                    # built-in, seconds, no download
  convit-ssl prepare-data cifar10 --from cifar-10-python.tar.gz     # writes 60,000 PNGs (under a minute)
  convit-ssl prepare-data cifar100 --from cifar-100-python          # the extracted folder works too
  convit-ssl prepare-data imagenet1k --from imagenet/               # train/ and val/ class folders, used in place
  convit-ssl prepare-data pets --from pets/ --like imagenet1k       # read with imagenet1k's crops and statistics

CIFAR is written under the data root ($CONVIT_SSL_DATA, else ~/.cache/convit_ssl/data) unless --out says where;
an image folder is only checked (same classes in train/ and val/, images in every class, every image readable)
and registered, no copy. The class folders and image counts are recorded; evaluation and training check them.
Nothing is downloaded: fetch the archive yourself.
"""
from __future__ import annotations

import sys
from pathlib import Path

from convit_ssl.errors import UsageError


def add_arguments(parser) -> None:
    parser.epilog = __doc__
    parser.add_argument("name", help="catalog name to register, e.g. cifar10; 'digits' needs no --from")
    parser.add_argument("--from", dest="source", type=Path, metavar="PATH",
                        help="CIFAR-10/100 python archive or its extracted folder, or an ImageNet-layout folder")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where CIFAR PNGs go (default: <data root>/NAME); ignored for image folders")
    parser.add_argument("--like", metavar="DATA",
                        help="for an image folder: the data config whose crop sizes, statistics and patch size suit it "
                             "(imagenet1k, cifar10, cifar100, digits), used by 'train data=NAME'; default: NAME when "
                             "a data config has that name. CIFAR copies take their variant's")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from convit_ssl import data
    from convit_ssl.images import IMAGE_EXTENSIONS

    data.check_dataset_name(args.name)
    if args.source is None:
        if args.name not in ("digits", "digits_val"):
            raise UsageError(f"dataset {args.name!r} needs --from PATH (a CIFAR archive or an image folder); only "
                             f"'digits' is built in")
        folder = data.ensure_digits()
        print(f"digits and digits_val ready in {folder} (catalog {data.catalog_path()})")
        return 0
    description = data.prepare_dataset(args.name, args.source, out_dir=args.out, progress=not args.quiet,
                                       like=args.like)
    counts = description["counts"]
    print(f"registered {args.name} ({description['kind']}): train {description['train']} ({counts['train']} images), "
          f"val {description['val']} ({counts['val']} images); catalog {data.catalog_path()}")
    left_out = description["left_out"]
    if left_out:
        print(f"convit-ssl prepare-data: warning: left out {len(left_out)} file(s) without an image extension or "
              f"outside a class folder: {', '.join(left_out[:5])}{', ...' if len(left_out) > 5 else ''}; to train "
              f"on them, convert them to {' '.join(IMAGE_EXTENSIONS)} (any case) in a class folder", file=sys.stderr)
    return 0
