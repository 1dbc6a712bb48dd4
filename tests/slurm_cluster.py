"""A real single-node Slurm cluster for the test session: munged, slurmctld and slurmd started as root on private
ports, with their keys, state, logs and sockets in one temporary folder; `SLURM_CONF` points at it.

It is shaped like a shared cluster where it matters to repro: two partitions, `debug` (the default, PriorityTier 1)
and `high` (PriorityTier 10), with PreemptType=preempt/partition_prio and PreemptMode=REQUEUE, so a job in `high`
that needs the node requeues the jobs in `debug` (SIGTERM, then SIGKILL after KillWait); and NODE_GPUS fake GPUs
(gres/gpu on character devices that are /dev/null), so that jobs ask for GPUs as on a real cluster. torch finds no
CUDA behind them, so those jobs train on the CPU.

Used by the `slurm_cluster` fixture in conftest.py; also runnable by hand (`python tests/slurm_cluster.py`) to
start a cluster, print its SLURM_CONF and wait for Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_CPUS = 4  # more than this machine's cores: jobs share them, so two small jobs can run side by side
NODE_GPUS = 4  # fake ones: one per run of ablation-lrn's three, with a spare
NODE_MEM_MB = 8000  # what jobs may ask for (--mem-per-gpu); nothing enforces it (no cgroups)
# A requeued job is held back (Reason=BeginTime) for the credential lifetime, 120 s by default; shorter here so that
# preemption tests do not idle (steps still launch well within it on a loaded machine)
REQUEUE_DELAY_S = 10
KILL_WAIT_S = 10  # SIGTERM to SIGKILL: time to checkpoint on a loaded 2-core machine (Slurm's default is 30)


@dataclass
class Cluster:
    root: Path
    conf: Path
    node: str
    procs: dict[str, int] = field(default_factory=dict)  # name -> pid

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, *cmd: str, check: bool = True) -> str:
        """A Slurm command (scontrol, squeue, sbatch, ...) against this cluster; its stdout."""
        out = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` of one job as {field: value} (JobState, Restarts, Reason, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, node: str) -> str:
    return f"""\
ClusterName=repro-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire={REQUEUE_DELAY_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
SchedulerType=sched/builtin
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=sched_interval=1,sched_min_interval=100000
MessageTimeout=10
KillWait={KILL_WAIT_S}
MinJobAge=600
InactiveLimit=0
Waittime=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} Sockets=1 CoresPerSocket={NODE_CPUS} ThreadsPerCore=1 RealMemory={NODE_MEM_MB} Gres=gpu:{NODE_GPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10
"""


def _wait(check, what: str, cluster: Cluster, timeout: float = 30.0) -> None:
    t_end = time.time() + timeout
    while time.time() < t_end:
        if check():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {n}\n{cluster.log(n)[-2000:]}" for n in ("munged", "slurmctld", "slurmd"))
    raise RuntimeError(f"test Slurm cluster: {what} did not happen within {timeout:.0f} s\n{logs}")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def start() -> Cluster:
    """Start munged, slurmctld and slurmd; return once the node is idle and accepts jobs."""
    if os.geteuid() != 0:
        raise RuntimeError("the test Slurm cluster starts its daemons as root")
    for exe in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(exe) is None:
            raise RuntimeError(f"{exe} not found: install the Debian packages `slurm-wlm munge` (make test does)")
    # /tmp itself, not pytest's 0700 folders: munged runs as `munge` and must traverse every folder to its files
    root = Path(tempfile.mkdtemp(prefix="repro-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    shutil.chown(munge_dir, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    for name in ("munged.log", "munged.seed"):
        (munge_dir / name).touch()
        shutil.chown(munge_dir / name, "munge", "munge")
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node))
    (root / "dev").mkdir()
    for k in range(NODE_GPUS):
        os.mknod(root / "dev" / f"gpu{k}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File={root}/dev/gpu[0-{NODE_GPUS - 1}]\n")
    cluster = Cluster(root, conf, node)
    try:
        _start_daemons(cluster, munge_dir, key)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _start_daemons(cluster: Cluster, munge_dir: Path, key: Path) -> None:
    root, node, env = cluster.root, cluster.node, cluster.env()
    subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={munge_dir}/munge.socket.2",
                    f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                    f"--seed-file={munge_dir}/munged.seed", "--num-threads=2"], check=True, env=env)
    _wait(lambda: (munge_dir / "munged.pid").exists(), "munged start", cluster)
    cluster.procs["munged"] = _pid(munge_dir / "munged.pid")
    (root / "log" / "munged.log").symlink_to(munge_dir / "munged.log")

    subprocess.run(["slurmctld", "-c", "-i"], check=True, env=env)  # -c: no state from an earlier cluster
    _wait(lambda: _pid(root / "run" / "slurmctld.pid") is not None, "slurmctld start", cluster)
    cluster.procs["slurmctld"] = _pid(root / "run" / "slurmctld.pid")
    subprocess.run(["slurmd", "-N", node], check=True, env=env)
    _wait(lambda: _pid(root / "run" / "slurmd.pid") is not None, "slurmd start", cluster)
    cluster.procs["slurmd"] = _pid(root / "run" / "slurmd.pid")

    def idle() -> bool:  # one line per partition the node is in
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env)
        return out.returncode == 0 and set(out.stdout.split()) <= {"idle", "mixed"} and bool(out.stdout.split())

    _wait(idle, "the node becoming idle", cluster, timeout=60)


def stop(cluster: Cluster) -> None:
    """Cancel every job, stop the daemons (slurmd, slurmctld, munged) and remove the folder."""
    env = cluster.env()
    subprocess.run(["scancel", "--full", "--quiet", "--user", "root"], env=env, capture_output=True, timeout=30)
    for name in ("slurmd", "slurmctld", "munged"):
        pid = cluster.procs.get(name)
        if not pid:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    c = start()
    print(f"export SLURM_CONF={c.conf}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a background process may have SIGINT ignored
    try:
        signal.pause()
    finally:
        stop(c)
