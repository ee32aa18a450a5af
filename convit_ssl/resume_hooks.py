"""Resumable runs: checkpoints on signals, and a resumed run that is the same run as one that never stopped.

``PreemptionCheckpointHook`` saves at the next step after SIGUSR2 or SIGTERM; ``SameRunHook`` derives every
random number from the position in training and cuts VISSL's logs back to the checkpoint on resume.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from classy_vision.generic.distributed_util import is_primary

from convit_ssl import atomic
from convit_ssl.hooks import SelectiveHook, resumed_checkpoint, truncate_json_lines
from convit_ssl.run_folder import EPOCH_LOG, PREEMPTION_MARKER, STEP_LOG

_log = logging.getLogger(__name__)


class PreemptionCheckpointHook(SelectiveHook):
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
        if self._group is not None:  # ours: released here, not by the interpreter's exit (gloo aborts there)
            torch.distributed.destroy_process_group(self._group)
            self._group = None

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


class SameRunHook(SelectiveHook):
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
        resumed = resumed_checkpoint(task)
        if resumed is None:
            return
        iteration = resumed.iteration
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
