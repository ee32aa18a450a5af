"""Launch pretraining on SLURM with submitit: one job over many nodes, sweeps as job arrays,
evaluations chained after pretraining or as jobs of their own, checkpoint and requeue on time-out or preemption.

    python launchers/slurm.py --nodes 4 --gpus-per-node 8 --partition P config=dino model=convit_small data=imagenet1k
    python launchers/slurm.py --nodes 2 --gpus-per-node 8 --partition P linear-probe --checkpoint RUN --recipe imagenet1k

``launchers/slurm.py`` only calls ``main``. ``--local`` runs the same jobs through submitit's
``LocalExecutor`` on this machine, each node as one process, and waits for them.

How a job runs
--------------
sbatch asks for ``--nodes N --ntasks-per-node 1 --gpus-per-node G``; srun starts one Python process per
node, which unpickles a ``PretrainJob`` and calls it. That process composes the config on the node
(the launcher composed it once already, to fail early) with ``DISTRIBUTED.NUM_NODES=N`` and
``NUM_PROC_PER_NODE=G``, takes its node rank from the allocation (``SLURM_PROCID``; one task per
node), and calls ``convit_ssl.engine.train``, which spawns the G per-GPU processes itself. The
rendezvous (``DISTRIBUTED.RUN_ID``) is the first node of the allocation and a port that node 0 finds
free, starting from one derived from the job id, and publishes in ``<run folder>/.rendezvous/``; no
port is fixed, so jobs sharing a node do not collide. ``--cpu``: gloo, one process per node, no GPUs.

Folders: a run lives in ``--job-dir`` (default ``$CONVIT_SSL_RUNS/<job name>-<job id>``, or
``./runs/...`` when ``CONVIT_SSL_RUNS`` is unset), on a file system every node sees. It holds
submitit's files (``<job id>_<node>_log.out`` and ``.err``, the pickled job and its result), VISSL's
checkpoints (``CHECKPOINT.DIR``), TensorBoard (``tb_logs/``), and one folder per chained evaluation
(``linear-probe/``, ``knn/``; ``finetune-2/`` for a second ``--then finetune``). A sweep is one job array in
``<job name>-<array id>/`` with one run folder per point, named after its values
(``base_value=0.1,model=convit_small``). A ``--job-dir`` without ``%j`` that already holds a run continues it.

Preemption and time limits
--------------------------
submitit submits with ``--signal=USR2@<delay>``: SLURM sends SIGUSR2 to every process of the job
``--signal-delay-s`` seconds before the time limit (and on preemption, where the cluster's
PreemptMode sends it). USR2 and not USR1, because NCCL may install its own SIGUSR1 handler, which
swallowed the signal and broke requeue for GPU jobs; ``SUBMITIT_PREEMPT_SIGNAL`` changes it (both
at submission and in the job). The training processes get the signal too: their
``PreemptionCheckpointHook`` (convit_ssl.resume_hooks) saves an iteration checkpoint at the next step, also
mid-epoch, and marks it done. On node 0, submitit's handler calls ``PretrainJob.checkpoint``, which
waits for that checkpoint (up to 90 s) and returns the same run (same job folder, so the same
``CHECKPOINT.DIR`` and ``tb_logs``); submitit runs ``scontrol requeue``, and the requeued job starts
again with VISSL's ``AUTO_RESUME`` loading the newest complete checkpoint: the one saved on the
signal, else the last one written at the end of an epoch or every
``CHECKPOINT.CHECKPOINT_ITER_FREQUENCY`` iterations. Checkpoints are written atomically, so an
interrupted save leaves the previous one. Requeues after a time-out are counted against
``--max-requeues``; preemptions are not. Jobs are submitted with ``--requeue``, so SLURM may also
requeue them after a node failure, and ``scontrol requeue JOBID`` restarts a run by hand: SLURM sends
SIGTERM first (KillWait seconds before SIGKILL), on which the training processes also save at the next step
(submitit ignores SIGTERM), so the requeued run resumes there rather than at the last epoch checkpoint.

Evaluations (``linear-probe``, ``knn``) run one task per GPU (one per node with ``--cpu``), each a rank of one
torch.distributed group (``EvaluationJob`` sets torchrun's ``env://`` variables from the allocation; the
rendezvous is node 0 and a port found as above). ``launchers/slurm.py [options] EVAL ARGS`` submits one on
``--nodes`` nodes, ARGS as for ``convit-ssl EVAL`` (results in the job folder unless ``--out``); ``--then
EVAL=ARGS`` runs one after each pretraining, on as many nodes (``--eval-nodes`` for another count). An evaluation
job is requeued like a pretraining: a streamed linear probe resumes after the last epoch whose heads it saved.

Chained evaluations (``--then``) are submitted with ``--dependency=afterok:<pretraining>`` and
``--kill-on-invalid-dep=yes``: when the pretraining fails or is cancelled, SLURM cancels them instead of
leaving them pending for ever (``DependencyNeverSatisfied``). ``--dry-run`` runs the cluster checks
(partition, node count) where SLURM answers, and otherwise prints that it skipped them.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from convit_ssl import atomic
from convit_ssl.errors import UsageError

RUNS_ENV = "CONVIT_SSL_RUNS"
EVALUATIONS = ("linear-probe", "knn", "finetune")
TRAINING_EVALUATIONS = ("finetune",)  # VISSL training runs: one task per node, its engine spawns one process per GPU
PORT_RANGE = (15000, 30000)  # below Linux's ephemeral range (32768+), where client sockets live
RENDEZVOUS_TIMEOUT_S = 600
FINAL_CHECKPOINT = "<final checkpoint>"  # what a --then evaluation is given as --checkpoint when it is checked


class LaunchError(UsageError):
    """A problem found before anything is submitted; the message names it and the fix, in one line."""


# ---------------------------------------------------------------------------------------------- parser
def add_cluster_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Resources and scheduling options; shared by SLURM and ``--local`` runs."""
    resources = parser.add_argument_group("resources")
    resources.add_argument("--nodes", type=int, default=1, help="nodes; one submitit task per node")
    resources.add_argument("--gpus-per-node", type=int, default=8,
                           help="GPUs per node; VISSL starts one training process per GPU (default: 8)")
    resources.add_argument("--cpus-per-task", type=int, default=None,
                           help="CPUs per node, shared by its GPU processes and their data loaders: "
                                "about 8-10 per GPU (default: the cluster's)")
    resources.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the cluster's)")
    resources.add_argument("--time", default="1440",
                           help="time limit: minutes, HH:MM:SS or D-HH:MM:SS; the run checkpoints and is requeued "
                                "when it runs out (default: 1440, one day)")
    resources.add_argument("--cpu", action="store_true",
                           help="CPU-only nodes: gloo backend, one process per node, no GPUs requested")

    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--partition", default=None, help="partition (default: the cluster's default partition)")
    for name, help_text in (("account", "account to charge"), ("qos", "quality of service"),
                            ("constraint", "node features, e.g. volta32gb"), ("comment", "job comment"),
                            ("exclude", "nodes to avoid, e.g. node[12-14]")):
        slurm.add_argument(f"--{name}", default=None, help=help_text)
    slurm.add_argument("--job-name", default=None,
                       help="job name (default: from the config choices, e.g. dino-convit_tiny-digits)")
    slurm.add_argument("--job-dir", default=None,
                       help=f"job folder (or run_dir=), on a file system every node sees; %%j is the job id (%%A "
                            f"for a sweep) (default: ${RUNS_ENV}/NAME-%%j, or ./runs/NAME-%%j)")
    slurm.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, repeatable: --slurm mail-type=END --slurm reservation=R")
    slurm.add_argument("--max-requeues", type=int, default=10,
                       help="requeues after time-outs before the run gives up; preemptions do not count "
                            "(default: 10; submitit's own default is 3)")
    slurm.add_argument("--signal-delay-s", type=int, default=120,
                       help="seconds between SIGUSR2 and the time limit, for the requeue (default: 120)")

    plan = parser.add_argument_group("what to launch")
    plan.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                      help="sweep an override over values, repeatable; the grid is one job array, e.g. "
                           "--sweep config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.0005,0.001 "
                           "--sweep model=convit_tiny,convit_small")
    plan.add_argument("--then", action="append", default=[], metavar="EVAL=ARGS",
                      help="evaluation to run when pretraining succeeds, repeatable: linear-probe=ARGS, knn=ARGS or "
                           "finetune=ARGS, "
                           "ARGS as for 'convit-ssl linear-probe' (--checkpoint and --out are added); it "
                           "runs on as many nodes and GPUs as the pretraining (see --eval-nodes)")
    plan.add_argument("--eval-nodes", type=int, default=None, metavar="N",
                      help="nodes of each --then evaluation, each with --gpus-per-node processes (default: --nodes)")
    plan.add_argument("--dry-run", action="store_true",
                      help="print the sbatch script and the resolved config; submit nothing")
    plan.add_argument("--local", action="store_true",
                      help="run on this machine through submitit's LocalExecutor (each node is a process); waits")
    plan.add_argument("--wait", action="store_true", help="wait for every job and exit non-zero if one failed")
    return parser


EPILOG = """examples:
  launchers/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu config=dino model=convit_small data=imagenet1k
  launchers/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu linear-probe --checkpoint RUN --recipe imagenet1k
  launchers/slurm.py --nodes 1 --gpus-per-node 8 --partition gpu knn --checkpoint RUN --recipe imagenet1k
  launchers/slurm.py --nodes 2 --partition gpu --sweep model=convit_tiny,deit_tiny --then 'knn=--recipe imagenet1k' \\
      config=dino data=imagenet1k
  launchers/slurm.py --local --cpu --nodes 2 --time 30 config=dino model=convit_tiny data=digits
  launchers/slurm.py --dry-run --nodes 4 config=dino model=convit_small data=imagenet1k   # the sbatch script"""


def build_evaluation_parser() -> argparse.ArgumentParser:
    """The cluster options of ``launchers/slurm.py [options] EVAL ARGS``; EVAL's own options follow EVAL."""
    from convit_ssl import cli

    parser = cli.OneLineParser(prog="launchers/slurm.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                               description="Submit an evaluation (linear-probe, knn) to SLURM as one multi-node job.")
    parser.epilog = EPILOG
    return add_cluster_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    """``convit-ssl train``'s arguments (the overrides, --print-config) and the cluster options."""
    from convit_ssl import cli
    from convit_ssl.commands import train

    parser = cli.OneLineParser(prog="launchers/slurm.py",
                               description="Submit ConViT SSL pretraining (or an evaluation: linear-probe, knn) to "
                                           "SLURM as one multi-node job.",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(parser)
    parser.epilog = EPILOG
    return add_cluster_arguments(parser)


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Point:
    """One pretraining run: its overrides, and its folder inside the job folder ('' outside a sweep)."""
    overrides: List[str]
    subdir: str = ""
    config: object = None


@dataclass
class Plan:
    """What passed every check: the runs, their job folder and name, the evaluations, the partition."""
    points: List[Point]
    job_dir: str
    job_name: str
    evaluations: List[Tuple[str, List[str]]] = field(default_factory=list)
    partition: Optional[str] = None
    cluster_check: str = ""  # --dry-run: what the cluster checks found, or why they were skipped


def parse_minutes(text: str) -> int:
    """SLURM time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) to whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise LaunchError(f"--time {text!r} is not a SLURM time: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        numbers += [0] * (3 - len(numbers))
        seconds = ((int(days) * 24 + numbers[0]) * 60 + numbers[1]) * 60 + numbers[2]
    elif len(numbers) == 3:
        seconds = (numbers[0] * 60 + numbers[1]) * 60 + numbers[2]
    else:  # M or M:S
        seconds = numbers[0] * 60 + (numbers[1] if len(numbers) == 2 else 0)
    if seconds <= 0:
        raise LaunchError(f"--time {text!r} is zero: give the run some time")
    return -(-seconds // 60)


def check_time(args: argparse.Namespace) -> None:
    """``--time`` is a SLURM time, and ``--signal-delay-s`` leaves the job some of it before SLURM's signal."""
    seconds = parse_minutes(args.time) * 60
    if args.signal_delay_s < 0:  # submitit would ask for --signal=USR2@-5, no signal before the limit
        raise LaunchError(f"--signal-delay-s {args.signal_delay_s} is negative: give the seconds before the time "
                          f"limit at which the job checkpoints, e.g. --signal-delay-s 120")
    if args.signal_delay_s >= seconds:  # signalled at the start: checkpointed and requeued until --max-requeues
        raise LaunchError(f"--signal-delay-s {args.signal_delay_s} is not below --time {args.time} ({seconds} s): "
                          f"the job would be told to checkpoint and requeue as it starts; raise --time or lower "
                          f"--signal-delay-s")


def check_memory(args: argparse.Namespace) -> None:
    """``--mem-gb`` is at least the 1 MB that sbatch's ``--mem`` counts in: ``--mem=0`` is all of a node's memory."""
    if args.mem_gb is not None and not 1 <= args.mem_gb * 1024 < float("inf"):
        raise LaunchError(f"--mem-gb {args.mem_gb:g} is under 1 MB or not a size (sbatch reads --mem=0 as all of "
                          f"the node's memory): give GB per node, e.g. --mem-gb 64, or leave it to the cluster")


def check_job_name(args: argparse.Namespace) -> None:
    """``--job-name``, which names the job's folder (``NAME-%j``), is one folder name: not empty, no ``/``."""
    if args.job_name is None:
        return
    if not args.job_name:
        raise LaunchError("--job-name '' is empty: give a name, or leave --job-name out for one from the config")
    if "/" in args.job_name:
        raise LaunchError(f"--job-name {args.job_name!r} would make nested folders (it names the job's folder): "
                          f"e.g. --job-name {_name_part(args.job_name)}, or choose where with --job-dir")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _split_values(text: str) -> List[str]:
    """Split 'a,[1,2],b' at the commas outside brackets and quotes."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    return values + [current]


def sweep_points(overrides: Sequence[str], sweeps: Sequence[str]) -> List[Point]:
    """The grid of --sweep KEY=V1,V2 options; each point's values replace the same key in ``overrides``."""
    if not sweeps:
        return [Point(list(overrides))]
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise LaunchError(f"--sweep {sweep!r} is not KEY=V1,V2: e.g. --sweep model=convit_tiny,convit_small")
        axes.append([(key, value) for value in _split_values(values)])
    keys = [_key(axis[0][0]) for axis in axes]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:  # each point would hold both values, the last one winning whatever its folder says
        raise LaunchError(f"--sweep {twice} is given twice: list all its values in one --sweep {twice}=V1,V2")
    short = [key.rsplit(".", 1)[-1] for key, _ in (axis[0] for axis in axes)]
    names = short if len(set(short)) == len(short) else [axis[0][0] for axis in axes]
    points = []
    for combination in itertools.product(*axes):
        swept = {_key(key) for key, _ in combination}
        kept = [o for o in overrides if _key(o) not in swept]
        subdir = ",".join(f"{name}={value}" for name, (_, value) in zip(names, combination))
        points.append(Point(kept + [f"{key}={value}" for key, value in combination],
                            subdir=re.sub(r"[^\w.,=+-]", "_", subdir)))
    subdirs = [point.subdir for point in points]
    shared = next((subdir for subdir in subdirs if subdirs.count(subdir) > 1), None)
    if shared is not None:  # two array tasks would train into one folder, each overwriting the other's checkpoints
        raise LaunchError(f"two points of --sweep share the run folder {shared}: give each value once (characters "
                          f"other than letters, digits and . , = + - become _ in folder names)")
    return points


def _name_part(text: str) -> str:
    """``text`` as part of a job name, which names folders: characters other than letters, digits and . + - as _."""
    return re.sub(r"[^\w.+-]", "_", text)


def default_job_name(overrides: Sequence[str]) -> str:
    """'config=dino model=convit_tiny data=digits' -> 'dino-convit_tiny-digits'."""
    choices = [o.split("=", 1)[1] for o in overrides if "=" in o and "." not in _key(o) and not o.startswith("~")]
    name = "-".join(_name_part(choice.rsplit("/", 1)[-1]) for choice in choices)
    return name or "convit-ssl"


def launcher_overrides(args: argparse.Namespace, nodes: Optional[int] = None) -> List[str]:
    """What the allocation decides: nodes (``args.nodes`` unless given), processes per node, device and backend."""
    procs = 1 if args.cpu else args.gpus_per_node
    return [
        f"config.DISTRIBUTED.NUM_NODES={nodes or args.nodes}",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}",
        "config.DISTRIBUTED.INIT_METHOD=tcp",
        f"config.DISTRIBUTED.BACKEND={'gloo' if args.cpu else 'nccl'}",
        f"config.MACHINE.DEVICE={'cpu' if args.cpu else 'gpu'}",
    ]


def check_evaluation_args(name: str, argv: Sequence[str], where: str) -> argparse.Namespace:
    """``argv`` parsed by ``convit-ssl NAME``'s own parser; a mistake is a ``LaunchError`` starting with ``where``."""
    from convit_ssl import cli

    modules = {command: module for command, module, _ in cli.COMMANDS}

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise LaunchError(f"{where}: {message}")

    # no abbreviations: the jobs add --out and --device unless ARGS spell them, and would override a --ou or --dev
    parser = Parser(prog=f"convit-ssl {name}", exit_on_error=False, allow_abbrev=False)
    importlib.import_module(f"convit_ssl.commands.{modules[name]}").add_arguments(parser)
    try:
        args, unknown = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as error:
        raise LaunchError(f"{where}: {error}") from None
    if unknown:
        raise LaunchError(f"{where}: unknown arguments {' '.join(unknown)}; see convit-ssl {name} --help "
                          f"(spell options out in full)")
    try:  # what the command checks before any work, so that the job does not fail on the nodes for it
        if name in TRAINING_EVALUATIONS:
            from convit_ssl.evaluation.finetune import recipe_config

            recipe_config(args.recipe)
        else:
            from convit_ssl.evaluation.arguments import check_arguments, recipe_from_args

            check_arguments(args)
            recipe_from_args(args)
    except UsageError as error:
        raise LaunchError(f"{where}: {error}") from None
    return args


def parse_then(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``--then linear-probe=ARGS``: the command and its arguments, checked by the command's own parser."""
    evaluations = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        if name not in EVALUATIONS:
            raise LaunchError(f"--then {spec!r}: choose {' or '.join(EVALUATIONS)}, "
                              f"e.g. --then 'linear-probe=--recipe digits'")
        given = check_evaluation_args(name, ["--checkpoint", FINAL_CHECKPOINT, *shlex.split(rest)], f"--then {name}")
        if given.checkpoint != FINAL_CHECKPOINT:  # the job would evaluate it, not the pretraining
            raise LaunchError(f"--then {name}: --checkpoint is the pretraining's final checkpoint, added by the "
                              f"launcher: drop --checkpoint {given.checkpoint}")
        evaluations.append((name, shlex.split(rest)))
    return evaluations


def split_evaluation(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Tuple[List[str], Optional[str],
                                                                                     List[str]]:
    """``[launcher options] EVAL [EVAL's arguments]`` -> (launcher options, EVAL, its arguments); EVAL None when
    ``argv`` launches a pretraining. EVAL is the first word naming an evaluation that is not an option's value."""
    takes_value = False
    for position, word in enumerate(argv):
        if not takes_value and word in EVALUATIONS:
            return list(argv[:position]), word, list(argv[position + 1:])
        action = parser._option_string_actions.get(word)
        takes_value = action is not None and action.nargs != 0 and "=" not in word
    return list(argv), None, []


# ---------------------------------------------------------------------------------------------- checks
def check_submitit() -> None:
    if importlib.util.find_spec("submitit") is None:
        raise LaunchError("submitit is not installed: pip install 'submitit>=1.5' (or make install)")


def partitions() -> Tuple[Dict[str, int], Optional[str]]:
    """Node count of every partition, and the default partition (sinfo marks it with '*')."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P %N"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LaunchError(f"sinfo failed ({error}): is SLURM reachable from here? Or use --local")
    if out.returncode != 0:
        last_line = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:]
        raise LaunchError(f"sinfo failed ({' '.join(last_line)}): is SLURM reachable from here? Or use --local")
    nodes: Dict[str, set] = {}
    default = None
    for line in out.stdout.split("\n"):
        if not line.strip():
            continue
        name, node = line.split()
        if name.endswith("*"):
            name = default = name[:-1]
        nodes.setdefault(name, set()).add(node)
    return {name: len(members) for name, members in nodes.items()}, default


def check_cluster(args: argparse.Namespace) -> Optional[str]:
    """The partition exists and has enough nodes; returns the partition jobs go to."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found: run on a SLURM login node, or use --local or --dry-run")
    return check_partition(args, *partitions())


def check_partition(args: argparse.Namespace, counts: Dict[str, int], default: Optional[str]) -> str:
    partition = args.partition or default
    if partition is None:
        raise LaunchError(f"this cluster has no default partition: pass --partition ({', '.join(sorted(counts))})")
    unknown = [name for name in partition.split(",") if name not in counts]  # sbatch takes a list: small,big
    if unknown:
        raise LaunchError(f"unknown partition {unknown[0]!r}: this cluster has {', '.join(sorted(counts))}")
    most = max(counts[name] for name in partition.split(","))
    if args.nodes > most:
        raise LaunchError(f"--nodes {args.nodes} but partition {partition!r} has {most} nodes")
    return partition


def dry_run_cluster_check(args: argparse.Namespace) -> Tuple[Optional[str], str]:
    """--dry-run: the cluster checks of a submission where SLURM answers (a failure is an error, as it would
    be on submitting), else a line saying they were skipped and why. Returns the partition and that line."""
    unchecked = "partition and node count not checked"
    if shutil.which("sbatch") is None:
        return args.partition, f"# cluster checks skipped: no sbatch on this machine ({unchecked})"
    try:
        cluster = partitions()
    except LaunchError as error:
        return args.partition, f"# cluster checks skipped: {error} ({unchecked})"
    partition = check_partition(args, *cluster)
    return partition, f"# cluster checks passed: partition {partition!r} has the {args.nodes} node(s) asked for"


def check_job_dir_ids(job_dir: str, array: bool) -> None:
    """The job folder's id tags name one folder for every node of a job: no ``%t`` (the task), ``%a`` (the index
    in a job array) only for one (``array``). submitit would otherwise fail on them with a traceback, on the nodes
    or after submitting."""
    if "%t" in job_dir:
        raise LaunchError(f"job folder {job_dir}: %t gives every node (task) a folder of its own: use %j (the job id)")
    if "%a" in job_dir and not array:
        raise LaunchError(f"job folder {job_dir}: %a names no folder outside a job array: use %j (the job id)")


def check_job_dir(job_dir: str, create: bool) -> None:
    """The id-independent part of the job folder can be written: checked, or created and written (``create``)."""
    from submitit.core.utils import JobPaths

    base = JobPaths.get_first_id_independent_folder(job_dir)
    fix = f"pick another --job-dir or set {RUNS_ENV}"
    if not create:
        existing = next(p for p in [base, *base.parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise LaunchError(f"job folder {base} is not writable ({existing} is not a writable folder): {fix}")
        return
    try:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        raise LaunchError(f"job folder {base} is not writable ({error.strerror}): {fix}") from None


def compose_points(points: Sequence[Point], job_dir: str) -> None:
    """Compose every point now, to fail before submitting; the node composes again with its job id."""
    from convit_ssl import engine

    for point in points:
        try:  # composing writes nothing: the job folder (its name still holds %j) is made on submission
            point.config = engine.compose(point.overrides, run_dir=str(Path(job_dir) / point.subdir))
        except UsageError as error:
            where = f" (sweep point {point.subdir})" if point.subdir else ""
            raise LaunchError(f"{error}{where}") from None


def make_plan(args: argparse.Namespace) -> Plan:
    """Every check that can fail, in order of cost, before anything is submitted."""
    check_submitit()
    if args.nodes < 1 or args.gpus_per_node < 1 or (args.eval_nodes is not None and args.eval_nodes < 1):
        raise LaunchError("--nodes, --eval-nodes and --gpus-per-node must be at least 1")
    if args.local and max(args.nodes, args.eval_nodes or 1) > 1 and not args.cpu:
        raise LaunchError("--local runs every node on this machine's GPUs: use --nodes 1, or --cpu")
    check_time(args)
    check_memory(args)
    check_job_name(args)
    if not any(o.startswith("config=") for o in args.overrides):
        raise LaunchError("no config=NAME among the overrides: e.g. config=dino model=convit_tiny data=digits")
    run_dirs = [o.split("=", 1)[1] for o in args.overrides if _key(o) == "run_dir"]
    if run_dirs and args.job_dir:
        raise LaunchError("run_dir= and --job-dir both name the job folder: keep one")
    overrides = [o for o in args.overrides if _key(o) != "run_dir"]
    for option in args.slurm:
        if "=" not in option:
            raise LaunchError(f"--slurm {option!r} is not KEY=VALUE: e.g. --slurm mail-type=END")
    evaluations = parse_then(args.then)
    owned = [_key(sweep) for sweep in args.sweep if _key(sweep) in {_key(o) for o in launcher_overrides(args)}]
    if owned:  # a point would not match the allocation every point of the array shares
        raise LaunchError(f"--sweep {owned[0]}: the launcher sets it from --nodes, --gpus-per-node and --cpu, the "
                          f"same for every point; launch each value as a job of its own")
    points = sweep_points(overrides + launcher_overrides(args), args.sweep)
    chained_runs = [word.split("=", 1)[1] for name, words in evaluations if name in TRAINING_EVALUATIONS
                    for word in words if _key(word) == "run_dir"]
    if chained_runs and (len(points) > 1 or len(set(chained_runs)) < len(chained_runs)):
        raise LaunchError(f"--then finetune: run_dir={chained_runs[0]} would be the run folder of more than one "
                          f"fine-tuning (one per --sweep point and --then): drop run_dir=, each then trains in "
                          f"<run folder>/finetune/run")
    submits = not (args.local or args.dry_run or args.print_config)
    partition, cluster_check = args.partition, ""
    if submits:
        partition = check_cluster(args)
    elif args.dry_run and not args.local:
        partition, cluster_check = dry_run_cluster_check(args)
    swept = {_key(sweep) for sweep in args.sweep}
    job_name = args.job_name or default_job_name([o for o in overrides if _key(o) not in swept])
    root = os.environ.get(RUNS_ENV) or "runs"
    default_dir = Path(root) / f"{job_name}-{'%A' if args.sweep else '%j'}"
    job_dir = args.job_dir or (run_dirs[-1] if run_dirs else str(default_dir))
    job_dir = str(Path(job_dir).expanduser().absolute())
    check_job_dir_ids(job_dir, array=len(points) > 1)
    check_job_dir(job_dir, create=False)
    compose_points(points, job_dir)
    return Plan(points, job_dir, job_name, evaluations, partition, cluster_check)


# ---------------------------------------------------------------------------------------------- jobs
def rendezvous_address(env, run_dir: Path, attempt: int) -> str:
    """``host:port`` of node 0 for torch.distributed.

    Node 0 takes the first free port at or after one derived from the job id, the restart count and
    the attempt, and writes it to ``run_dir/.rendezvous/KEY``; the other nodes wait for that file. A
    requeued job has a new key (SLURM_RESTART_COUNT, or the attempt after submitit's requeue), so
    nobody reads a stale port.
    """
    local = env.cluster == "local"
    host = "127.0.0.1" if local else env.hostnames[0]
    key = f"{env.raw_job_id}_{os.environ.get('SLURM_RESTART_COUNT', '0')}_{attempt}"
    path = run_dir / ".rendezvous" / key
    if env.global_rank == 0:
        low, high = PORT_RANGE
        start = low + zlib.crc32(key.encode()) % (high - low)
        port = next(p for p in itertools.chain(range(start, high), range(low, start)) if _port_is_free(p))
        atomic.write_text(str(port), path)
    else:
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"node 0 did not write its rendezvous port to {path} in {RENDEZVOUS_TIMEOUT_S} s")
            time.sleep(0.5)
        port = int(path.read_text())
    return f"{host}:{port}"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


class PretrainJob:
    """What submitit runs on every node: compose the config there and call ``engine.train`` for this node.

    One task per node, so the task's global rank is the node rank. ``checkpoint`` makes the job
    requeueable: it returns the same run (same folder), which resumes from its last checkpoint.
    """

    def __init__(self, overrides: Sequence[str], subdir: str = "", attempt: int = 0) -> None:
        self.overrides = list(overrides)
        self.subdir = subdir
        self.attempt = attempt

    def __call__(self) -> str:
        import submitit

        from convit_ssl import engine

        env = submitit.JobEnvironment()
        run_dir = self.run_dir()
        if env.cluster == "local":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every "node" is this machine
        config = engine.compose(self.overrides, run_dir=str(run_dir))
        config.DISTRIBUTED.RUN_ID = rendezvous_address(env, run_dir, self.attempt)
        engine.train(config, node_id=env.global_rank)
        return str(run_dir)

    def run_dir(self) -> Path:
        import submitit

        return submitit.JobEnvironment().paths.folder / self.subdir

    def checkpoint(self):
        """On SLURM's signal: let the training processes save a mid-epoch checkpoint (they got the signal
        too, see ``PreemptionCheckpointHook``), then requeue the same run."""
        import submitit

        from convit_ssl import engine

        run_dir = self.run_dir()
        if not engine.wait_for_preemption_checkpoint(run_dir, time.time()):
            print(f"no checkpoint after the signal in {run_dir}: resuming from the last complete one", flush=True)
        return submitit.helpers.DelayedSubmission(PretrainJob(self.overrides, self.subdir, self.attempt + 1))


def final_checkpoint(run_dir: Path) -> Path:
    """The checkpoint VISSL writes at the end of training (``run_folder.final_checkpoint``)."""
    from convit_ssl.run_folder import final_checkpoint as final_of

    found = final_of(run_dir)
    if found is None:
        raise UsageError(f"no model_final_checkpoint_phase*.torch in {run_dir}: did pretraining finish?")
    return found


class EvaluationJob:
    """``convit-ssl EVAL ARGS`` as one job of one or more nodes, each task one rank of a torch.distributed group.

    Chained (``run_dir`` given): after pretraining succeeded, on the final checkpoint of ``run_dir``
    (``--checkpoint`` is added); else ARGS name the checkpoint. Unless ARGS set them: ``--out <job folder>`` and
    ``--device cpu`` with ``--cpu``. Every task gets the ``env://`` variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``: node 0 and a free port, see ``rendezvous_address``), so the
    evaluation shards its images and rank 0 writes the result. ``checkpoint`` makes it requeueable: a streamed probe
    resumes from the heads it saved in ``--out`` after its last epoch.
    """

    def __init__(self, command: str, args: Sequence[str], cpu: bool, run_dir: Optional[str] = None,
                 attempt: int = 0) -> None:
        self.command = command
        self.args = list(args)
        self.cpu = cpu
        self.run_dir = run_dir
        self.attempt = attempt

    def __call__(self) -> str:
        import submitit

        from convit_ssl import cli

        env = submitit.JobEnvironment()
        folder = env.paths.folder
        argv = [self.command, *self.args]
        if self.run_dir is not None:
            argv[1:1] = ["--checkpoint", str(final_checkpoint(Path(self.run_dir)))]
        given = {arg.split("=", 1)[0] for arg in self.args}
        for flag, value in {"--out": str(folder), **({"--device": "cpu"} if self.cpu else {})}.items():
            if flag not in given:
                argv += [flag, value]
        if env.num_tasks > 1:
            if env.cluster == "local":
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every "node" is this machine
            host, port = rendezvous_address(env, folder, self.attempt).rsplit(":", 1)
            os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                              LOCAL_RANK=str(env.local_rank), MASTER_ADDR=host, MASTER_PORT=port)
        if env.global_rank == 0:
            print(f"convit-ssl {shlex.join(argv)} ({env.num_tasks} process(es))", flush=True)
        code = cli.main(argv)
        if code:
            raise RuntimeError(f"convit-ssl {self.command} exited with status {code}; its error is in this log")
        return str(folder)

    def checkpoint(self):
        """On SLURM's signal: requeue the same evaluation (a streamed probe resumes after its last saved epoch)."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            EvaluationJob(self.command, self.args, self.cpu, self.run_dir, self.attempt + 1))


class FinetuneJob:
    """``convit-ssl finetune ARGS`` as a training job, run as a pretraining is (``PretrainJob``): one task per node,
    VISSL's engine spawning one process per GPU there, the rendezvous from ``rendezvous_address``. Every node
    prepares the same run (``evaluation.finetune.prepare``: its file lists and initial trunk are named by their
    content), node 0 writes the result (``--out``, default the job folder). Chained (``run_dir`` given): on the final
    checkpoint of ``run_dir``. The run folder is ``run_dir=`` of ARGS, else ``<job folder>/run``; ``checkpoint``
    requeues the same run, which resumes from its last checkpoint.
    """

    def __init__(self, args: Sequence[str], launcher_words: Sequence[str], run_dir: Optional[str] = None,
                 attempt: int = 0) -> None:
        self.args = list(args)
        self.launcher_words = list(launcher_words)
        self.run_dir = run_dir
        self.attempt = attempt

    def _argv(self) -> List[str]:
        chained = ["--checkpoint", str(final_checkpoint(Path(self.run_dir)))] if self.run_dir is not None else []
        return chained + self.args

    @staticmethod
    def _run_folder(folder: Path, overrides: Sequence[str]) -> Path:
        given = [word.split("=", 1)[1] for word in overrides if _key(word) == "run_dir"]
        return Path(given[-1] if given else folder / "run").resolve()

    def __call__(self) -> str:
        import submitit

        from convit_ssl import engine
        from convit_ssl.evaluation import finetune

        started = time.time()
        env = submitit.JobEnvironment()
        folder = env.paths.folder
        if env.cluster == "local":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every "node" is this machine
        argv = self._argv()
        given = check_evaluation_args("finetune", argv, "finetune")
        words = [*given.overrides, f"run_dir={self._run_folder(folder, given.overrides)}", *self.launcher_words]
        prepared = finetune.prepare(given.checkpoint, given.recipe, given.labels, words, given.seed, given.arch,
                                    heldout_fraction=given.heldout_fraction)
        config = engine.compose(prepared.words)
        config.DISTRIBUTED.RUN_ID = rendezvous_address(env, prepared.run_dir, self.attempt)
        engine.train(config, node_id=env.global_rank)
        if env.global_rank == 0:
            result = finetune.write_result(prepared, started, given.name, given.out or folder,
                                           {"argv": argv, "launcher": self.launcher_words})
            print(f"result: {result['file']}", flush=True)
        return str(prepared.run_dir)

    def checkpoint(self):
        """On SLURM's signal: wait for the training processes' checkpoint, then requeue the same run."""
        import submitit

        from convit_ssl import engine

        given = check_evaluation_args("finetune", self._argv(), "finetune")
        run_dir = self._run_folder(submitit.JobEnvironment().paths.folder, given.overrides)
        if not engine.wait_for_preemption_checkpoint(run_dir, time.time()):
            print(f"no checkpoint after the signal in {run_dir}: resuming from the last complete one", flush=True)
        return submitit.helpers.DelayedSubmission(
            FinetuneJob(self.args, self.launcher_words, self.run_dir, self.attempt + 1))


def evaluation_job(args: argparse.Namespace, command: str, eval_args: Sequence[str], nodes: int,
                   run_dir: Optional[str] = None):
    """The job object of an evaluation: ``FinetuneJob`` for a fine-tuning, else ``EvaluationJob``."""
    if command in TRAINING_EVALUATIONS:
        return FinetuneJob(eval_args, launcher_overrides(args, nodes), run_dir=run_dir)
    return EvaluationJob(command, eval_args, args.cpu, run_dir=run_dir)


# ---------------------------------------------------------------------------------------------- submit
def _slurm_executor(folder: str, max_num_timeout: int, script_only: bool):
    """submitit's SlurmExecutor; ``script_only`` builds one where srun is absent, to print the script."""
    import submitit

    if not script_only:
        return submitit.SlurmExecutor(folder, max_num_timeout=max_num_timeout)

    class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    return ScriptOnlySlurmExecutor(folder, max_num_timeout=max_num_timeout)


def make_executor(args: argparse.Namespace, folder: str, *, nodes: int, gpus: int, name: str,
                  partition: Optional[str], dependency: Optional[str] = None, tasks_per_node: int = 1):
    """A SlurmExecutor (or LocalExecutor with --local: every task a process here) for ``nodes`` nodes with
    ``tasks_per_node`` tasks each."""
    import submitit

    minutes = parse_minutes(args.time)
    if args.local:
        executor = submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(timeout_min=minutes, tasks_per_node=nodes * tasks_per_node, gpus_per_node=gpus,
                                   signal_delay_s=args.signal_delay_s)
        return executor
    executor = _slurm_executor(folder, args.max_requeues, script_only=args.dry_run and shutil.which("srun") is None)
    extra = {"requeue": True}
    if dependency:  # a chained job whose parent fails or is cancelled is cancelled too, not left pending
        extra["kill_on_invalid_dep"] = "yes"
    extra.update(option.split("=", 1) for option in args.slurm)
    parameters = dict(
        job_name=name, partition=partition, time=minutes, nodes=nodes, ntasks_per_node=tasks_per_node,
        cpus_per_task=args.cpus_per_task, gpus_per_node=gpus or None,
        mem=f"{int(args.mem_gb * 1024)}MB" if args.mem_gb else None, account=args.account, qos=args.qos,
        constraint=args.constraint, comment=args.comment, exclude=args.exclude, dependency=dependency,
        signal_delay_s=args.signal_delay_s, additional_parameters=extra,
    )
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    return executor


def evaluation_executor(args: argparse.Namespace, folder: str, nodes: int, name: str, partition: Optional[str],
                        dependency: Optional[str] = None, command: str = ""):
    """The executor of an evaluation job: ``nodes`` nodes, one task (rank) per GPU, or one per node with --cpu; one
    per node for a training evaluation (fine-tuning), whose VISSL engine starts the per-GPU processes."""
    per_node = 1 if args.cpu or command in TRAINING_EVALUATIONS else args.gpus_per_node
    return make_executor(args, folder, nodes=nodes, gpus=0 if args.cpu else args.gpus_per_node, name=name,
                         partition=partition, dependency=dependency, tasks_per_node=per_node)


def evaluation_size(args: argparse.Namespace, nodes: int) -> str:
    per_node = 1 if args.cpu else args.gpus_per_node
    return f"{nodes} node(s) x {per_node} process(es) = {nodes * per_node} rank(s)"


@dataclass
class Submitted:
    """A submitted job: what it is, its submitit job, and its run folder."""
    kind: str
    job: object
    run_dir: Path
    after: Optional[str] = None


def submit(args: argparse.Namespace, plan: Plan) -> List[Submitted]:
    check_job_dir(plan.job_dir, create=True)
    gpus = 0 if args.cpu else args.gpus_per_node
    executor = make_executor(args, plan.job_dir, nodes=args.nodes, gpus=gpus, name=plan.job_name,
                             partition=plan.partition)
    jobs = [PretrainJob(point.overrides, point.subdir) for point in plan.points]
    if len(jobs) == 1:
        pretraining = [executor.submit(jobs[0])]
    else:
        with executor.batch():
            pretraining = [executor.submit(job) for job in jobs]
    submitted = [Submitted("pretrain", job, job.paths.folder / point.subdir)
                 for job, point in zip(pretraining, plan.points)]
    names = [name for name, _ in plan.evaluations]  # the second --then finetune goes to finetune-2/, ...
    subdirs = [name if i == names.index(name) else f"{name}-{names[:i].count(name) + 1}" for i, name in
               enumerate(names)]
    for pretrain in list(submitted):
        for (name, eval_args), subdir in zip(plan.evaluations, subdirs):
            if args.local and pretrain.job.exception() is not None:  # no scheduler to hold it: wait here
                continue
            folder = pretrain.run_dir / subdir
            nodes = args.eval_nodes or args.nodes
            eval_executor = evaluation_executor(args, str(folder), nodes, f"{name}-{plan.job_name}", plan.partition,
                                                dependency=f"afterok:{pretrain.job.job_id}", command=name)
            job = eval_executor.submit(evaluation_job(args, name, eval_args, nodes, run_dir=str(pretrain.run_dir)))
            submitted.append(Submitted(name, job, folder, after=pretrain.job.job_id))
    return submitted


def print_plan(args: argparse.Namespace, plan: Plan) -> None:
    """--dry-run: the sbatch script and every resolved config; --print-config: the configs only."""
    import yaml

    if args.dry_run and args.local:
        print(f"# --local: {args.nodes} process(es) on this machine under {plan.job_dir}; no sbatch script")
    elif args.dry_run:
        gpus = 0 if args.cpu else args.gpus_per_node
        executor = make_executor(args, plan.job_dir, nodes=args.nodes, gpus=gpus, name=plan.job_name,
                                 partition=plan.partition)
        if len(plan.points) > 1:
            executor.parameters["map_count"] = len(plan.points)
        print(plan.cluster_check)
        print("# sbatch script")
        print(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))
    for point in plan.points:
        print(f"# resolved config{' for ' + point.subdir if point.subdir else ''}: overrides "
              + " ".join(point.overrides))
        print(yaml.safe_dump(json.loads(json.dumps(point.config, default=str)), sort_keys=False), end="")
    for name, eval_args in plan.evaluations:
        print(f"# then: convit-ssl {name} --checkpoint <final checkpoint> {shlex.join(eval_args)}"
              f" on {evaluation_size(args, args.eval_nodes or args.nodes)} (afterok on pretraining, cancelled with it)")


def describe(submitted: Sequence[Submitted]) -> str:
    lines = []
    for item in submitted:
        job = item.job
        after = f" after {item.after} succeeds" if item.after else ""
        lines.append(f"submitted {item.kind} job {job.job_id}{after}")
        lines.append(f"  job folder: {item.run_dir}")
        lines.append(f"  logs:       {job.paths.stdout}")
        lines.append(f"              {job.paths.stderr}")
        if job.num_tasks > 1:
            lines.append(f"              (node 0; node K writes {job.job_id}_K_log.out and .err)")
    return "\n".join(lines)


def wait_all(submitted: Sequence[Submitted]) -> int:
    """Wait for every job; one line per job, with the job's own error for those that failed."""
    failed = 0
    for item in submitted:
        error = item.job.exception()
        if error is None:
            print(f"{item.kind} job {item.job.job_id} finished: {item.run_dir}")
            continue
        failed += 1
        # submitit's message holds the job's traceback between two dashed lines: keep its last line
        parts = re.split(r"\n-{10,}\n", str(error))
        reason = parts[1].strip().splitlines()[-1] if len(parts) > 2 else str(error).splitlines()[0]
        print(f"{item.kind} job {item.job.job_id} failed: {reason}; see {item.job.paths.stderr}", file=sys.stderr)
    return 1 if failed else 0


def evaluation_main(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str,
                    eval_argv: List[str]) -> int:
    """``launchers/slurm.py [options] EVAL ARGS``: ``convit-ssl EVAL ARGS`` as a job of its own on ``--nodes``
    nodes, every check first (the checkpoint must exist here, as on the cluster's file system)."""
    from convit_ssl.checkpoint import checkpoint_file

    try:
        check_submitit()
        if args.sweep or args.then:
            raise LaunchError(f"{command} is a job of its own: --sweep and --then belong to a pretraining; put "
                              f"{command}'s own options after the word {command}")
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise LaunchError("--nodes and --gpus-per-node must be at least 1")
        if args.local and args.nodes > 1 and not args.cpu:
            raise LaunchError("--local runs every node on this machine's GPUs: use --nodes 1, or --cpu")
        check_time(args)
        check_memory(args)
        check_job_name(args)
        evaluation = check_evaluation_args(command, eval_argv, command)
        if evaluation.checkpoint and evaluation.checkpoint != "random":
            checkpoint_file(Path(evaluation.checkpoint))
        submits = not (args.local or args.dry_run)
        partition, cluster_check = args.partition, ""
        if submits:
            partition = check_cluster(args)
        elif args.dry_run and not args.local:
            partition, cluster_check = dry_run_cluster_check(args)
        recipe = Path(evaluation.recipe or evaluation.data or "digits")  # a recipe's name, or its file: the stem
        plain = _name_part(recipe.stem if recipe.suffix in (".yaml", ".yml") else recipe.name)
        job_name = args.job_name or f"{command}-{plain}"
        root = os.environ.get(RUNS_ENV) or "runs"
        job_dir = str(Path(args.job_dir or Path(root) / f"{job_name}-%j").expanduser().absolute())
        check_job_dir_ids(job_dir, array=False)
        check_job_dir(job_dir, create=False)
        line = f"# evaluation: convit-ssl {command} {shlex.join(eval_argv)} on {evaluation_size(args, args.nodes)}"
        if args.dry_run:
            if not args.local:
                executor = evaluation_executor(args, job_dir, args.nodes, job_name, partition, command=command)
                print(cluster_check)
                print("# sbatch script")
                print(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))
            print(line)
            return 0
        check_job_dir(job_dir, create=True)
        executor = evaluation_executor(args, job_dir, args.nodes, job_name, partition, command=command)
        job = executor.submit(evaluation_job(args, command, eval_argv, args.nodes))
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    submitted = [Submitted(command, job, job.paths.folder)]
    print(describe(submitted), flush=True)
    return wait_all(submitted) if args.local or args.wait else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    launcher_argv, command, eval_argv = split_evaluation(parser, list(sys.argv[1:] if argv is None else argv))
    if command is not None:
        parser = build_evaluation_parser()
    try:
        args = parser.parse_args(launcher_argv)
    except SystemExit as exit_:  # --help (0), or a mistake the parser printed in one line (2)
        return exit_.code
    if command is not None:
        return evaluation_main(parser, args, command, eval_argv)
    try:
        plan = make_plan(args)
        if args.dry_run or args.print_config:
            print_plan(args, plan)
            return 0
        submitted = submit(args, plan)
    except LaunchError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(describe(submitted), flush=True)
    return wait_all(submitted) if args.local or args.wait else 0
