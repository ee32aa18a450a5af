"""Our training hooks: what the gates learn, checkpoints on signals, resumed runs that are the same run.

``PreemptionCheckpointHook`` saves at the next step after SIGUSR2 or SIGTERM; ``SameRunHook`` derives every
random number from the position in training and cuts VISSL's logs back to the checkpoint on resume.

``GatingDiagnosticsHook`` keeps the first images of the first training batch it sees as a fixed
probe batch. Before the forward pass of every ``frequency``-th update, and at the end of every
training epoch, it measures each GPSA layer's gates and attention distances on that probe batch
and appends one JSON line to ``<checkpoint dir>/gating_metrics.jsonl``:

    {"iteration": 200, "epoch": 1, "probe_images": 16, "grid_size": [14, 14],
     "layers": [{"block": 0, "gates": [...], "positional_distance": [...],
                 "content_distance": [...], "mixed_distance": [...]}, ...]}

``iteration`` counts the optimizer updates applied to the parameters measured (0 = the
initialisation), ``epoch`` is the 0-based training phase. With TensorBoard on, the same numbers go
to ``<checkpoint dir>/tb_logs`` under ``gating/`` and ``attention_distance/``. Only the primary
process (rank 0) measures and writes; it runs the unwrapped trunk (``task.base_model.trunk``, no
DDP) under ``no_grad`` in eval mode and restores every module's mode, so training is unchanged.

This module imports classy_vision, not VISSL; ``build_gating_hook`` reads the config section
``HOOKS.CONVIT_GATING`` (keys ENABLE, FREQUENCY, PROBE_BATCH).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from classy_vision.generic.distributed_util import is_primary
from classy_vision.hooks.classy_hook import ClassyHook

from convit_ssl import atomic
from convit_ssl.diagnostics import DISTANCE_KINDS, diagnostics_record, gating_diagnostics
from convit_ssl.errors import UsageError
from convit_ssl.models.convit import ConViT
from convit_ssl.run_folder import EPOCH_LOG, METRICS_FILE, PREEMPTION_MARKER, STEP_LOG, TENSORBOARD_DIR

_log = logging.getLogger(__name__)


def _first_images(inputs: Any) -> torch.Tensor:
    """The first image tensor of a VISSL model input: a tensor, a list of crops or a dict of inputs."""
    while not isinstance(inputs, torch.Tensor):
        if isinstance(inputs, Mapping):
            inputs = next(iter(inputs.values()))
        else:  # list of crops (multi-crop) or VISSL's MultiDimensionalTensor: the first (global) crop
            inputs = inputs[0]
    return inputs


def truncate_json_lines(path: Path, keep) -> int:
    """Cut a JSON-lines file before its first line that ``keep(record)`` rejects, does not parse or has no
    newline (a write cut short by a kill). One truncate call: the kept lines are never rewritten, and an
    append-mode stream open on the file goes on writing at its new end. Returns the lines dropped."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    offset = 0
    for line in data.splitlines(keepends=True):
        try:
            kept = line.endswith(b"\n") and keep(json.loads(line))
        except ValueError:
            kept = False
        if not kept:
            break
        offset += len(line)
    if offset == len(data):
        return 0
    dropped = data[offset:].count(b"\n") + (not data.endswith(b"\n"))
    os.truncate(path, offset)
    return dropped


class _SelectiveHook(ClassyHook):
    """A hook that does nothing at each of the events VISSL's trainer calls; subclasses override the ones
    they need (VISSL calls on_forward, on_loss_and_meter, on_backward and on_update besides classy's)."""

    on_start = ClassyHook._noop
    on_phase_start = ClassyHook._noop
    on_forward = ClassyHook._noop
    on_loss_and_meter = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_update = ClassyHook._noop
    on_step = ClassyHook._noop
    on_phase_end = ClassyHook._noop
    on_end = ClassyHook._noop


def _trunk_of(task) -> Any:
    model = task.base_model
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.trunk


class GatingDiagnosticsHook(_SelectiveHook):
    """Every ``frequency`` updates, log gates and attention distances of every GPSA layer and head.

    Args:
        frequency: record before the forward pass of every update whose index is a multiple of it
            (update 0 = the initial parameters), and at the end of every training epoch.
        probe_batch: how many images of the first training batch form the fixed probe batch.
        output_dir: folder of ``gating_metrics.jsonl`` and ``tb_logs``; default: the task's
            checkpoint folder (``task.checkpoint_folder``, set by VISSL's trainer).
        tensorboard: also write TensorBoard scalars.
    """

    def __init__(self, frequency: int, probe_batch: int, output_dir: Optional[str] = None, tensorboard: bool = False):
        super().__init__()
        if frequency < 1 or probe_batch < 1:
            raise UsageError(f"gating hook: FREQUENCY ({frequency}) and PROBE_BATCH ({probe_batch}) must be "
                             f"positive integers; set HOOKS.CONVIT_GATING.ENABLE=False to turn the hook off")
        self.frequency = frequency
        self.probe_batch = probe_batch
        self.output_dir = output_dir
        self.tensorboard = tensorboard
        self.probe: Optional[torch.Tensor] = None
        self.last_iteration: Optional[int] = None
        self.disabled = False
        self._writer = None

    def on_start(self, task) -> None:
        """On resume, drop the records after the checkpoint (the killed run wrote them; they come again)
        and do not record the checkpoint's iteration twice."""
        checkpoint = getattr(task, "checkpoint", None)
        if checkpoint is None or not is_primary():
            return
        iteration = checkpoint["iteration"]
        path = Path(self.output_dir or task.checkpoint_folder) / METRICS_FILE
        truncate_json_lines(path, lambda record: record["iteration"] <= iteration)
        records = path.read_text().splitlines() if path.is_file() else []
        if records and json.loads(records[-1])["iteration"] == iteration:
            self.last_iteration = iteration

    def on_forward(self, task) -> None:
        """Keep the probe batch from the first training batch; record every ``frequency`` updates."""
        if self.disabled or not task.train or not is_primary():
            return
        if self.probe is None:
            self.probe = _first_images(task.last_batch.sample["input"])[: self.probe_batch].detach().clone()
        if task.iteration % self.frequency == 0:
            self._record(task)

    def on_phase_end(self, task) -> None:
        """Record the parameters at the end of a training epoch (the final ones after the last)."""
        if self.disabled or not task.train or not is_primary() or self.probe is None:
            return
        self._record(task)

    def on_end(self, task) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _record(self, task) -> None:
        """Measure the task's trunk on the probe batch and append one record (once per iteration)."""
        if task.iteration == self.last_iteration:
            return
        trunk = _trunk_of(task)
        if not isinstance(trunk, ConViT) or trunk.local_up_to_layer == 0:
            _log.info("gating hook: the trunk has no GPSA layers (%s); nothing to record, hook disabled",
                      type(trunk).__name__)
            self.disabled = True
            return
        diagnostics = gating_diagnostics(trunk, self.probe)
        record = {
            "iteration": int(task.iteration),
            "epoch": int(getattr(task, "train_phase_idx", -1)),
            "probe_images": int(self.probe.shape[0]),
            **diagnostics_record(diagnostics),
        }
        output_dir = self.output_dir or task.checkpoint_folder
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, METRICS_FILE), "a") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self._write_tensorboard(record, output_dir)
        self.last_iteration = task.iteration

    def _write_tensorboard(self, record: dict, output_dir: str) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.path.join(output_dir, TENSORBOARD_DIR))
        step = record["iteration"]
        for layer_number, layer in enumerate(record["layers"], start=1):
            gates = layer["gates"]
            self._writer.add_scalar(f"gating/layer{layer_number}/mean", sum(gates) / len(gates), step)
            for head, gate in enumerate(gates, start=1):
                self._writer.add_scalar(f"gating/layer{layer_number}/head{head}", gate, step)
            for kind in DISTANCE_KINDS:
                values = layer[f"{kind}_distance"]
                self._writer.add_scalar(f"attention_distance/layer{layer_number}/{kind}", sum(values) / len(values),
                                        step)
        self._writer.flush()


def build_gating_hook(config: Mapping, output_dir: Optional[str] = None) -> Optional[GatingDiagnosticsHook]:
    """The gating hook described by ``config.HOOKS.CONVIT_GATING``, or None when it is off or absent.

    Keys (defaults live in the base YAML config): ENABLE (bool), FREQUENCY (updates between
    records), PROBE_BATCH (images in the probe batch). TensorBoard output follows
    ``HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD``. ``output_dir`` defaults to the task's checkpoint folder.
    """
    hooks = config.get("HOOKS", None) or {}
    section = hooks.get("CONVIT_GATING", None) or {}
    if not section.get("ENABLE", False):
        return None
    values = {}
    for key in ("FREQUENCY", "PROBE_BATCH"):
        value = section.get(key, None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"HOOKS.CONVIT_GATING.{key} must be a positive integer, got {value!r}: "
                             f"set it in the config (e.g. FREQUENCY: 100, PROBE_BATCH: 16)")
        values[key] = value
    tensorboard = bool((hooks.get("TENSORBOARD_SETUP", None) or {}).get("USE_TENSORBOARD", False))
    return GatingDiagnosticsHook(frequency=values["FREQUENCY"], probe_batch=values["PROBE_BATCH"],
                                 output_dir=output_dir, tensorboard=tensorboard)


class PreemptionCheckpointHook(_SelectiveHook):
    """Save an iteration checkpoint soon after SIGUSR2 or SIGTERM, so a requeued run loses at most a step or two.

    SLURM sends SIGUSR2 before a time limit or a preemption (``--signal=USR2@120``) and SIGTERM on
    ``scontrol requeue`` (and on cancellation), some seconds before SIGKILL. Every rank installs the handler.
    The ranks must save at the same step without a host-device synchronisation at every step: each training
    step starts an asynchronous all-reduce (MAX) of the rank's flag on a CPU (gloo) process group and reads the
    result of the previous step's one, so all ranks see the same answer, one step after the signal. A single
    process reads its flag directly. The ranks save together through VISSL's checkpoint hook, rank 0 then
    writes ``PREEMPTION_MARKER`` in the run folder (the launcher waits for it before it requeues the job), and
    each rank that got a signal hands it on to the handler it replaced: submitit's in the launcher's own process
    (it requeues on SIGUSR2 and ignores SIGTERM, which SLURM follows with SIGKILL), else the default one, so a
    SIGTERM still ends the process, after the checkpoint.
    """

    def __init__(self, signums=(signal.SIGUSR2, signal.SIGTERM)):
        super().__init__()
        self.requested = None  # (signum, frame) of the first signal not yet answered by a checkpoint
        self.previous_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in signums:
                self.previous_handlers[signum] = signal.signal(signum, self._request)
        self._group = None  # gloo group of every rank, for the flag
        self._pending = None  # (work, flag) of the all-reduce started at the previous step

    def _request(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = (signum, frame)

    def on_start(self, task) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            self._group = torch.distributed.new_group(backend="gloo")  # collective: every rank calls on_start

    def on_step(self, task) -> None:
        if not task.train or not self._agreed():
            return
        if self._pending is not None:  # the all-reduce of this step carries the signal just answered
            self._pending[0].wait()
            self._pending = None
        request, self.requested = self.requested, None
        checkpointer = next(hook for hook in task.hooks if hasattr(hook, "_checkpoint_model"))
        checkpointer._checkpoint_model(task, mode_frequency=1, mode_num=task.iteration, mode="iteration")
        if is_primary():
            marker = os.path.join(task.checkpoint_folder, PREEMPTION_MARKER)
            atomic.write_json({"iteration": task.iteration, "checkpoint": f"model_iteration{task.iteration}.torch"},
                              marker)
            logging.info(f"Saved the preemption checkpoint of iteration {task.iteration}")
        if request is not None:
            self._hand_on(*request)

    def on_end(self, task) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def _agreed(self) -> bool:
        """Whether any rank had a signal by the previous step (every rank gets the same answer)."""
        if self._group is None:
            return self.requested is not None
        flag = torch.tensor([int(self.requested is not None)])
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group,
                                            async_op=True)
        previous, self._pending = self._pending, (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].item())

    def _hand_on(self, signum, frame) -> None:
        previous = self.previous_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL and signum != signal.SIGUSR2:  # SIGTERM: end the process as it asked
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


# Streams of position seeds, so that a step and a sample never share a seed.
STEP_STREAM, SAMPLE_STREAM = 0, 1


def seed_from_position(*position: int, cuda: bool = True) -> None:
    """Seed Python's, numpy's and torch's global generators (and CUDA's, where initialised and ``cuda``) from
    a hash of a tuple of integers, in tens of microseconds (``torch.manual_seed`` takes about 1 ms: it visits every
    backend, so the CPU generator is seeded directly)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in position).encode(), digest_size=24).digest()
    python_seed, numpy_seed, torch_seed = (int.from_bytes(digest[i:i + 8], "little") for i in (0, 8, 16))
    random.seed(python_seed)
    np.random.seed(numpy_seed % 2**32)
    torch.default_generator.manual_seed(torch_seed)
    if cuda and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(torch_seed)


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run a block without changing the global Python, numpy and torch (CPU) generators."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SameRunHook(_SelectiveHook):
    """Make a run that is killed and resumed the same run as one that never stopped.

    * Randomness is a function of the position in training, which every checkpoint holds: at the start of
      every training step (``on_phase_start`` and ``on_step``, after the other hooks) each rank seeds Python's,
      numpy's and torch's generators from ``(SEED_VALUE, rank, iteration)``. Drop path, MoCo's batch shuffle
      and whatever else draws from them in the step draw the same numbers after a resume; the data
      augmentations are seeded per sample (``convit_ssl.vissl_glue``), independent of workers and resumes.
    * On resume, rank 0 cuts VISSL's logs back to the checkpoint's iteration: ``stdout.json`` lines of the
      steps after it (``iter`` counts the updates before the logged one) and ``metrics.json`` lines of later
      epochs were written by the killed run and are written again, so no entry appears twice.
    """

    def on_start(self, task) -> None:
        checkpoint = getattr(task, "checkpoint", None)
        if checkpoint is None or not is_primary():
            return
        iteration = checkpoint["iteration"]
        folder = Path(task.checkpoint_folder)
        dropped = truncate_json_lines(folder / STEP_LOG, lambda record: record["iter"] < iteration)
        dropped += truncate_json_lines(folder / EPOCH_LOG, lambda record: record["iteration"] <= iteration)
        if dropped:
            _log.info("resumed at iteration %d: dropped %d log lines written after it", iteration, dropped)

    def on_phase_start(self, task) -> None:
        self._seed(task)

    def on_step(self, task) -> None:
        self._seed(task)

    @staticmethod
    def _seed(task) -> None:
        if task.train:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            seed_from_position(task.config["SEED_VALUE"], rank, task.iteration, STEP_STREAM)
