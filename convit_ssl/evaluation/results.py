"""Result files: one JSON per evaluation (probe, kNN, study), with a manifest, gathered into tables.

Every result is a dict ``{"schema": SCHEMA, "kind": ..., "manifest": {...}, "rows": [...], ...}``. ``rows`` are
flat summaries (one per reported number set: the chosen probe head, each k of a kNN run, each model and fraction
of a study) that ``gather`` collects from folders of results; the rest of the file holds everything behind them
(the whole probe grid, the recipe). The manifest says where the numbers came from: the model (checkpoint path and
the sha256 of the file, or the random-init preset and seed), the arguments, seeds, world size, library versions
and wall time.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from convit_ssl import atomic
from convit_ssl.errors import UsageError

SCHEMA = "convit_ssl.result/1"
# Columns of gathered tables, in this order when present; other row keys follow in first-seen order.
COLUMNS = ("kind", "model", "dataset", "fraction", "feature", "k", "temperature", "lr", "wd", "selected_on",
           "top1", "top5", "file")
_PACKAGES = ("torch", "torchvision", "vissl", "timm", "numpy", "scikit-learn", "convit-ssl")


def file_sha256(path: str | os.PathLike, block_size: int = 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def slug(text: str) -> str:
    """File-name-safe form of a label: 'ConViT (random)' -> 'ConViT-random'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "model"


def library_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the libraries that shape the numbers (None where not installed)."""
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def make_manifest(models: Sequence[Mapping], args: Mapping, seeds: Mapping[str, int], started: float) -> dict:
    """Manifest of a result; ``started`` is the ``time.time()`` at which the evaluation began."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": [dict(model) for model in models],
        "args": {key: str(value) if isinstance(value, os.PathLike) else value for key, value in dict(args).items()
                 if not callable(value)},
        "seeds": dict(seeds),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "versions": library_versions(),
        "wall_time_s": round(time.time() - started, 3),
    }


def write_result(result: Mapping, path: str | os.PathLike) -> Path:
    """Write ``result`` (with ``schema`` added) as JSON, atomically; returns the path."""
    path = Path(path)
    atomic.write_json({"schema": SCHEMA, **result}, path)
    return path


def _numbered(stem: str, attempt: int) -> str:
    return stem if attempt == 1 else f"{stem}-{attempt}"


def write_new_result(result: Mapping, folder: str | os.PathLike, stem: str) -> Path:
    """Write ``result`` (with ``schema`` added) as a new JSON file ``folder/stem.json``, else ``stem-2.json``, ...

    The file is complete before it appears and never replaces one: it is written to a temporary file and then
    hard-linked to the first free name, which fails on a name that exists, also one taken by another process
    in the meantime. Returns the path.
    """
    text = json.dumps({"schema": SCHEMA, **result}, indent=2) + "\n"
    names = (Path(folder) / f"{_numbered(stem, attempt)}.json" for attempt in itertools.count(1))
    return atomic.create_new(text, names)


def new_folder(parent: str | os.PathLike, stem: str) -> Path:
    """Create and return a new folder ``parent/stem``, else ``stem-2``, ...: never one that exists."""
    for attempt in itertools.count(1):
        path = Path(parent) / _numbered(stem, attempt)
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue


def read_result(path: str | os.PathLike) -> Optional[dict]:
    """The result in ``path``, or None when it is not a convit_ssl result file; ``UsageError`` naming it when it
    cannot be read (a broken link, no permission): its rows would be missing from every table."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    except OSError as error:
        raise UsageError(f"cannot read {path} ({error.strerror}): make it readable or remove it, or pass only the "
                         f"folders and files to gather") from None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def gather(paths: Iterable[str | os.PathLike]) -> List[dict]:
    """Rows of every result file in ``paths`` (files, or folders searched recursively, where folders named
    ``*.json`` are not files), each with its ``file``."""
    rows = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{path} does not exist: pass folders or files written by linear-probe, knn or study")
        files = [path] if path.is_file() else sorted(file for file in path.rglob("*.json") if not file.is_dir())
        for file in files:
            result = read_result(file)
            if result is not None:
                rows.extend({**row, "file": str(file)} for row in result.get("rows", []))
    return rows


def _columns(rows: Sequence[Mapping]) -> List[str]:
    seen = [key for key in COLUMNS if any(key in row for row in rows)]
    for row in rows:
        seen.extend(key for key in row if key not in seen)
    return seen


def format_value(column: str, value) -> str:
    """Percentages (columns naming top1, top5 or a gain) with two decimals, other floats short, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        percent = "top1" in column or "top5" in column or column.startswith("gain")
        return f"{value:.2f}" if percent else f"{value:g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping], columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or _columns(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_value(column, row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping], columns: Optional[Sequence[str]] = None) -> str:
    """CSV with full-precision numbers."""
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(columns or _columns(rows)), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()
