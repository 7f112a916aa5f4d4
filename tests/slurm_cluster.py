"""A real single-node SLURM cluster on 127.0.0.1 for the tests, from Debian's packages (slurm-wlm, munge): its own
munged (key and socket in a temporary folder), slurmctld and slurmd; proctrack/linuxproc, task/none,
select/cons_tres, no accounting. Clients find it through $SLURM_CONF.

    with slurm_cluster(Path(tmp)) as cluster:      # cluster.env: {"SLURM_CONF": ...}; cluster.partition
        subprocess.run(["sbatch", ...], env={**os.environ, **cluster.env})
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from conftest import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "reslab-node"
PARTITION = "debug"


@dataclass
class Cluster:
    """A running cluster: the environment its clients need, its folder, its partition and node."""
    env: dict[str, str]
    folder: Path
    partition: str = PARTITION
    node: str = NODE

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command (squeue, scontrol, scancel ...) against this cluster."""
        return subprocess.run(list(command), env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=check, timeout=60)


def missing() -> list[str]:
    """The daemons and clients not installed (apt-get install slurm-wlm munge)."""
    tools = [("munged", "/usr/sbin/munged"), ("mungekey", "/usr/sbin/mungekey"), ("slurmctld", "/usr/sbin/slurmctld"),
             ("slurmd", "/usr/sbin/slurmd"), ("sbatch", None), ("srun", None), ("scontrol", None)]
    return [name for name, path in tools if not (shutil.which(name) or (path and Path(path).exists()))]


def _config(folder: Path, ctl_port: int, node_port: int, cpus: int) -> str:
    return f"""\
ClusterName=reslab
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=300
SlurmdTimeout=30
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def _wait(condition, what: str, folder: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(folder.glob("*.log")))
            raise RuntimeError(f"SLURM test cluster: {what} did not happen in {timeout:.0f} s{logs}")
        time.sleep(0.5)


@contextlib.contextmanager
def slurm_cluster(folder: Path, cpus: int = 2) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd (as root, in `folder`); yield the Cluster; stop them after."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, free_port(), free_port(), cpus))
    env = {"SLURM_CONF": str(conf)}
    full = {**os.environ, **env}
    key = folder / "munge.key"
    subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
    key.chmod(0o600)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
             f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/munge.seed"],
            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        _wait(lambda: (folder / "munge.socket").exists(), "munged's socket", folder)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(conf)], env=full, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(["slurmd", "-D", "-N", NODE, "-f", str(conf)], env=full, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        cluster = Cluster(env, folder)

        def idle() -> bool:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"SLURM test cluster: {p.args[0]} exited with {p.returncode}: " + "".join(
                        q.read_text()[-3000:] for q in folder.glob("*.log")))
            out = cluster.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False)
            return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

        _wait(idle, f"node {NODE} idle", folder, timeout=90)
        yield cluster
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
