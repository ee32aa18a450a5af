"""The layout of a run folder and the rules that keep it trustworthy; no VISSL import.

A run folder (VISSL's checkpoint folder, ``config.CHECKPOINT.DIR``) holds one run::

    run.lock                       held (flock) by the launching process while the run lives: pid and host inside
    train_config.yaml              the config its checkpoints were trained with (written when the run starts)
    train_config_history.jsonl     one line per change accepted with continue_with_changes
    model_phase<N>.torch           checkpoint after epoch N + 1 (0-based phase N)
    model_iteration<N>.torch       mid-epoch checkpoint after iteration N
    model_final_checkpoint_phase<N>.torch
    checkpoint.torch               link to the newest checkpoint
    metrics.json, stdout.json      VISSL's per-epoch and per-iteration logs (EPOCH_LOG, STEP_LOG); log.txt
    tb_logs/                       TensorBoard events (TENSORBOARD_DIR), with TensorBoard on
    gating_metrics.jsonl           the gating hook's records (METRICS_FILE)
    health.jsonl                   the training-health hook's records (HEALTH_FILE)
    preemption_checkpoint.json     the checkpoint the preemption hook saved on a signal (PREEMPTION_MARKER)

Guarantees (each function says which it keeps): one run at a time (``owned``); the recorded config never
changes under its checkpoints unless the user continues with changes explicitly (``record_config``);
``latest_checkpoint`` is the one rule for "the newest checkpoint" (``run_checkpoint``, the one evaluations read, is
VISSL's link to the latest, else that one); ``prune_checkpoints`` deletes only
this run's superseded checkpoint files, never the newest, the linked one, the final one or a milestone.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from convit_ssl import atomic
from convit_ssl.errors import UsageError

LOCK_FILE = "run.lock"
CONFIG_FILE = "train_config.yaml"
CONFIG_HISTORY_FILE = "train_config_history.jsonl"
LATEST_LINK = "checkpoint.torch"
STEP_LOG, EPOCH_LOG = "stdout.json", "metrics.json"
TENSORBOARD_DIR = "tb_logs"
METRICS_FILE = "gating_metrics.jsonl"
HEALTH_FILE = "health.jsonl"
PREEMPTION_MARKER = "preemption_checkpoint.json"
# Checkpoint names VISSL writes for a consolidated (non-FSDP) model; only these are ever pruned.
_PRUNABLE = re.compile(r"model_(phase|iteration)(\d+)\.torch")
_FINAL = re.compile(r"model_final_checkpoint_phase(\d+)\.torch")
# Config keys that name where or how the processes meet, not what is trained.
_NOT_COMPARED = ("CHECKPOINT.DIR", "DISTRIBUTED.RUN_ID", "CONVIT_SSL.CONTINUE_WITH_CHANGES")


class RunFolderError(UsageError):
    """The run folder cannot be used as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_files(run_dir) -> List[Path]:
    """Every complete checkpoint of the run (atomic saves: a file under its final name is complete): the files of
    the names VISSL gives a consolidated checkpoint, no shards and no copy under a name of its own."""
    folder = Path(run_dir)
    return [p for p in folder.glob("model_*.torch")
            if (_PRUNABLE.fullmatch(p.name) or _FINAL.fullmatch(p.name)) and p.is_file()]


def outputs(run_dir) -> List[str]:
    """What the run folder holds for its user, as ``convit-ssl train``'s last line names it: checkpoints, the epoch
    log, TensorBoard's folder (only with TensorBoard on), those present."""
    folder = Path(run_dir)
    held = [("checkpoints", bool(checkpoint_files(folder))), (EPOCH_LOG, (folder / EPOCH_LOG).is_file()),
            (f"TensorBoard logs ({TENSORBOARD_DIR}/)", (folder / TENSORBOARD_DIR).is_dir())]
    return [name for name, present in held if present]


def final_checkpoint(run_dir) -> Optional[Path]:
    """The checkpoint VISSL writes at the end of training (of the most epochs, after a run was extended), or None."""
    finals = [(int(match.group(1)), p) for p in checkpoint_files(run_dir) if (match := _FINAL.fullmatch(p.name))]
    return max(finals)[1] if finals else None


def _trained(path: Path) -> tuple:
    """How far checkpoint ``path`` (one of ``checkpoint_files``) is trained, as a sort key: the optimizer updates
    it holds (an iteration file's number, the ``iteration`` stored in an epoch's or the final one), an epoch's
    checkpoint after an iteration one of the same update, then the number; an epoch's or the final
    checkpoint that cannot be read counts as trained least. Not by file time: a copy (``cp -r``) gives its files
    the time they were copied."""
    from convit_ssl.checkpoint import CheckpointError, load_checkpoint_file

    match = _PRUNABLE.fullmatch(path.name)
    if match is not None and match.group(1) == "iteration":  # VISSL names it by task.iteration, its updates
        return int(match.group(2)), 0, int(match.group(2))
    number = int((match or _FINAL.fullmatch(path.name)).groups()[-1])
    try:
        updates = load_checkpoint_file(path, mmap=True).get("iteration", -1)
    except (CheckpointError, AttributeError):
        updates = -1
    return updates, 1, number


def latest_checkpoint(run_dir, skip_final: bool = False, nth: int = 1) -> Optional[Path]:
    """The checkpoint a resume starts from: the final one unless ``skip_final``, else the ``nth`` furthest trained.

    By the updates each file holds (``_trained``), not by number alone: a run that checkpoints by epoch and by
    iteration has both kinds, and VISSL's own rule (highest phase, or only iteration files) would resume from an
    older state.
    """
    final = final_checkpoint(run_dir)
    if final is not None and not skip_final:
        return final
    others = sorted((p for p in checkpoint_files(run_dir) if not _FINAL.fullmatch(p.name)), key=_trained,
                    reverse=True)
    if not others:
        return None
    return others[min(len(others), max(1, nth)) - 1]


LATEST_RULE = f"{LATEST_LINK} if present, else the final checkpoint, else the newest model_*.torch"


def run_checkpoint(run_dir) -> Optional[Path]:
    """The checkpoint that stands for a run folder in evaluations and reports (``LATEST_RULE``), or None when it
    holds none: ``checkpoint.torch`` (VISSL's link to the latest) when it points at a file, else the checkpoint a
    resume would start from (``latest_checkpoint``: the final one, else the one trained furthest)."""
    link = Path(run_dir) / LATEST_LINK
    return link if link.is_file() else latest_checkpoint(run_dir)


def is_run_folder(folder) -> bool:
    """Whether ``folder`` is a VISSL run folder: it holds ``train_config.yaml`` or a checkpoint of VISSL's names."""
    return (Path(folder) / CONFIG_FILE).is_file() or run_checkpoint(folder) is not None


def prune_checkpoints(run_dir, keep_last: int, keep_every_epochs: int) -> List[Path]:
    """Delete superseded checkpoints; returns the deleted files.

    Kept: the ``keep_last`` newest (furthest trained, ``_trained``), the final checkpoint, the target of
    ``checkpoint.torch``, every ``model_phase<N>`` that ends an epoch divisible by ``keep_every_epochs`` (0: no
    milestones), every epoch checkpoint that cannot be read (how far it is trained is unknown: it may be the
    newest), and every file whose name is not one VISSL gives a consolidated checkpoint. ``keep_last=-1``
    keeps everything. Call it only after the newest checkpoint is complete (saves are atomic) and linked.
    """
    if keep_last < 1:
        return []
    folder = Path(run_dir)
    trained = {path: _trained(path) for path in checkpoint_files(folder)}
    files = sorted(trained, key=trained.get, reverse=True)
    link = folder / LATEST_LINK
    linked = (folder / os.readlink(link)).name if link.is_symlink() else None
    deleted = []
    for path in files[keep_last:]:
        match = _PRUNABLE.fullmatch(path.name)
        if match is None or path.name == linked or trained[path][0] < 0:
            continue
        kind, number = match.group(1), int(match.group(2))
        if kind == "phase" and keep_every_epochs > 0 and (number + 1) % keep_every_epochs == 0:
            continue
        path.unlink()
        deleted.append(path)
    return deleted


# ---------------------------------------------------------------------------------------------- ownership
@contextlib.contextmanager
def owned(run_dir) -> Iterator[Path]:
    """Hold the run folder for one run: an exclusive ``flock`` on ``run.lock`` for the duration of the block.

    A second start fails at once in one line naming the holder (pid, host). The kernel drops the lock
    when the holding process dies, so a killed run never leaves it stuck. On NFS, flock is emulated with
    POSIX locks (NFSv4, or NFSv3 with lockd): it works across nodes, and a crashed client's lock lasts
    until the server's lease expires (about 90 s on NFSv4); some shared file systems ignore locks.
    """
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    stream = open(path, "a+")
    try:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            holder = stream.read().strip() or "another process (it has not written its pid yet)"
            raise RunFolderError(f"run folder {folder} is in use by {holder}: wait for that run to end, stop it, "
                                 f"or pick another run_dir") from None
        stream.seek(0)
        stream.truncate()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        stream.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {started})\n")
        stream.flush()
        try:
            yield folder
        finally:
            stream.seek(0)
            stream.truncate()
            stream.flush()
    finally:
        stream.close()  # releases the lock


# ---------------------------------------------------------------------------------------------- config
def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, Mapping):
        flat: Dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def config_differences(recorded: Mapping, config: Mapping) -> Dict[str, tuple]:
    """``{dotted key: (recorded value, new value)}`` for every setting that differs, in key order.

    Where the processes meet (``DISTRIBUTED.RUN_ID``) and where the folder is (``CHECKPOINT.DIR``, and any
    value equal to it, such as a loss's output folder) are not compared: a moved folder is the same run.
    """
    old, new = _flatten(recorded), _flatten(config)
    old_dir, new_dir = old.get("CHECKPOINT.DIR"), new.get("CHECKPOINT.DIR")
    differences = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if key in _NOT_COMPARED or before == after or (before == old_dir and after == new_dir):
            continue
        differences[key] = (before, after)
    return differences


def recorded_config(run_dir) -> Optional[dict]:
    """The run's recorded ``train_config.yaml`` as a plain dict, or None when the folder has none."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def record_config(run_dir, config: Mapping, continue_with_changes: bool = False) -> Dict[str, tuple]:
    """Write ``config`` (plain dict) as the run's ``train_config.yaml``, atomically; returns what changed.

    A folder that holds checkpoints but no recorded config (copied or downloaded there) is refused in one line:
    they are not this run's to resume from or prune. A folder that holds checkpoints keeps its recorded config: a
    different one is refused in one line naming the first differing keys, unless ``continue_with_changes``; then
    the change (keys, old and new values, the checkpoint it continues from) is appended to
    ``train_config_history.jsonl`` and the new config recorded, in that order: a retry after a crash between the
    two records the config and does not append the same change again. Without checkpoints the folder has no
    trained state to protect.
    """
    import yaml

    folder = Path(run_dir)
    path = folder / CONFIG_FILE
    text = yaml.safe_dump(dict(config), sort_keys=True)
    new = yaml.safe_load(text)
    latest = latest_checkpoint(folder)
    recorded = recorded_config(folder) if latest is not None else None
    if latest is not None and recorded is None:
        raise RunFolderError(
            f"run folder {folder} holds checkpoints ({latest.name}) but no {CONFIG_FILE}: no run of ours trained "
            f"them, and training would resume from them (or count itself finished) and prune them; pick a new "
            f"run_dir, or move the checkpoints out")
    differences: Dict[str, tuple] = {}
    if recorded is not None:
        differences = config_differences(recorded, new)
        if not differences:
            return {}
        if not continue_with_changes:
            shown = "; ".join(f"{key}: {old!r} -> {value!r}" for key, (old, value) in list(differences.items())[:3])
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            raise RunFolderError(
                f"run folder {folder} holds checkpoints of another config ({shown}{more}): pick a new run_dir, "
                f"or add continue_with_changes=true to continue this run with the new settings")
        final = final_checkpoint(folder)
        if final is not None:  # VISSL trains nothing after a final checkpoint: only the record would change
            raise RunFolderError(
                f"run folder {folder} has finished ({final.name}): continue_with_changes would train nothing and "
                f"only rewrite its record; pick a new run_dir (config.MODEL.WEIGHTS_INIT.PARAMS_FILE={final} "
                f"starts from its weights)")
        change = {"continues_from": latest.name,
                  "changes": {key: {"old": old, "new": value} for key, (old, value) in differences.items()}}
        if _last_change(folder) != json.loads(json.dumps(change, default=str)):  # else a retry after a crash
            entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **change}
            with open(folder / CONFIG_HISTORY_FILE, "a") as stream:
                stream.write(json.dumps(entry, default=str) + "\n")
                stream.flush()
                os.fsync(stream.fileno())
    atomic.write_text(text, path)  # after the history line: a crash in between leaves the change to the retry
    return differences


def _last_change(folder: Path) -> Optional[dict]:
    """The last line of the run's ``train_config_history.jsonl`` without its time, or None."""
    path = folder / CONFIG_HISTORY_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines:
        return None
    try:
        entry = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return {key: value for key, value in entry.items() if key != "time"}


def describe(differences: Mapping[str, Sequence]) -> str:
    """The changed keys of ``differences`` in one line (for the log of a continued run)."""
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())
