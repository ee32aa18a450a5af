"""A throwaway SLURM cluster on this machine: one slurmctld and one ``slurmd -N nodeK`` per node.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` packages, started by the test suite:

* munged runs with its own key, socket and pid file; nothing under ``/etc`` or ``/run`` is touched.
* Every node is ``NodeAddr=127.0.0.1`` with its own ``Port=``; all traffic stays on loopback.
* The daemons start in a private mount namespace (``unshare --mount``) where a hosts file and a
  files-only ``nsswitch.conf`` are bind-mounted over ``/etc``, so ``nodeK`` resolves to 127.0.0.1
  inside jobs (submitit sets ``MASTER_ADDR`` to the first node name) and the machine's own
  ``/etc/hosts`` stays as it is. The hosts file carries a token unique to this cluster, which is how
  ``stop()`` recognises the cluster's leftover processes (mount namespace ids are reused).
* ``env`` holds ``SLURM_CONF``, which every Slurm command must see: without it the clients look the
  controller up by DNS and send queries off this machine.
* There is no slurmdbd, so no ``sacct``; a stand-in on ``PATH`` answers submitit from
  ``scontrol -o show job`` so that jobs which die without a result fail instead of hanging.
* ``cred_expire=10`` and a fast scheduler let a requeued job run again after about 12 s (not 120 s).

Run by hand (as root): ``python tests/slurm/cluster.py 2`` starts a cluster, prints the variables
to export, and tears it down on Enter.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "unshare"]
PARTITION = "test"

SACCT_STANDIN = '''#!{python}
"""sacct stand-in for a cluster without slurmdbd: answers submitit's query from scontrol."""
import subprocess, sys

ids = [sys.argv[i + 1] for i, arg in enumerate(sys.argv) if arg == "-j"]
print("JobID|State|NodeList")
for job_id in ids:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "ArrayTaskId" in fields:
            task = fields["ArrayTaskId"]
            name = f"{{fields['ArrayJobId']}}_{{task if task.isdigit() else '[' + task + ']'}}"
        else:
            name = fields.get("JobId", job_id)
        print(f"{{name}}|{{fields.get('JobState', 'UNKNOWN')}}|{{fields.get('NodeList', '')}}")
'''


def missing_programs() -> List[str]:
    return [name for name in PROGRAMS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def ensure_installed() -> Optional[str]:
    """Install the Slurm packages with apt-get when root; return why the cluster cannot run, or None."""
    if sys.platform != "linux":
        return f"a local SLURM cluster needs Linux (this is {sys.platform})"
    if not missing_programs():
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing_programs())} not installed and not root: apt-get install {' '.join(PACKAGES)}"
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing_programs())} not installed and no apt-get to install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {' '.join(done.stderr.strip().splitlines()[-1:])}"
    return f"still missing after apt-get install: {missing_programs()}" if missing_programs() else None


def _free_ports(count: int) -> List[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class SlurmCluster:
    """``nodes`` nodes named node1..nodeN with ``cpus`` CPUs each, all in partition ``test``."""

    def __init__(self, nodes: int = 2, cpus: int = 4) -> None:
        self.nodes = [f"node{k}" for k in range(1, nodes + 1)]
        self.cpus = cpus
        self.token = f"convit-ssl-test-{secrets.token_hex(6)}"
        # short path: the munge socket path must fit in 108 bytes
        self.root = Path(tempfile.mkdtemp(prefix="cvslurm-"))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self.env: Dict[str, str] = {}

    # ---------------------------------------------------------------- set-up
    def _write_files(self) -> None:
        root = self.root
        for name in ("etc", "munge", "state", "spool", "log", "bin"):
            (root / name).mkdir()
        # munge clients (every slurm daemon and command) need to traverse to the socket
        for folder in (root, root / "munge"):
            folder.chmod(0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        hostname = socket.gethostname()
        (root / "etc" / "hosts").write_text(
            f"# {self.token}\n127.0.0.1 localhost {hostname} {' '.join(self.nodes)}\n"
        )
        (root / "etc" / "nsswitch.conf").write_text(
            "passwd: files\ngroup: files\nshadow: files\nhosts: files\nnetworks: files\n"
            "protocols: files\nservices: files\n"
        )
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        node_lines = [
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={name} Port={port} CPUs={self.cpus} State=UNKNOWN"
            for name, port in zip(self.nodes, node_ports)
        ]
        self.conf.write_text("\n".join([
            f"ClusterName=convit{secrets.token_hex(3)}",
            f"SlurmctldHost={hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            *node_lines,
            f"PartitionName={PARTITION} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        sacct = root / "bin" / "sacct"
        sacct.write_text(SACCT_STANDIN.format(python=sys.executable))
        sacct.chmod(0o755)
        self.env = {
            "SLURM_CONF": str(self.conf),
            "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self._write_files()
        root = self.root
        daemons = [
            f"munged --force --key-file={root}/munge/munge.key --socket={self.munge_socket}"
            f" --pid-file={root}/munge/munged.pid --log-file={root}/log/munged.log --seed-file={root}/munge/seed",
            f"slurmctld -f {self.conf}",
            *(f"slurmd -f {self.conf} -N {name}" for name in self.nodes),
        ]
        script = "\n".join([
            "set -e",
            f"mount --bind {root}/etc/hosts /etc/hosts",
            f"mount --bind {root}/etc/nsswitch.conf /etc/nsswitch.conf",
            *daemons,
        ])
        env = dict(os.environ, **self.env)
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"SLURM cluster did not start: {done.stderr.strip()}\n{self.logs()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idle = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            if sum(line.endswith(" idle") for line in idle) == len(self.nodes):
                return self
            time.sleep(0.3)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"SLURM nodes not idle after {timeout:.0f} s\n{logs}")

    # ---------------------------------------------------------------- use
    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=dict(os.environ, **self.env), capture_output=True, text=True,
                              check=check, timeout=60)

    def queue(self) -> List[str]:
        """Job ids (array tasks as ``A_T``) still pending, running or completing."""
        out = self.run("squeue", "-h", "-o", "%i", check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> Dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_until_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.queue():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---------------------------------------------------------------- teardown
    def stop(self) -> None:
        if self.conf.exists() and self.queue():
            self.run("scancel", "--full", *self.queue(), check=False)
            self.wait_until_idle(30)
        pid_files = [self.root / f"slurmd-{name}.pid" for name in self.nodes]
        pid_files += [self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        ours = self._leftovers()  # a pid file may be stale: signal only processes of this cluster
        for pid_file in pid_files:
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if pid in ours:
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self._leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self._leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _leftovers(self) -> List[int]:
        """Processes that see this cluster's hosts file: its daemons and whatever its jobs left."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if self.token in (entry / "root" / "etc" / "hosts").read_text():
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids


if __name__ == "__main__":
    reason = ensure_installed()
    if reason:
        sys.exit(reason)
    cluster = SlurmCluster(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 2).start()
    print("\n".join(f"export {key}={value}" for key, value in cluster.env.items()))
    try:
        input("cluster up; press Enter to tear it down\n")
    finally:
        cluster.stop()
