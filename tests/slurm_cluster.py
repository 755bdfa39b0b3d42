"""A private one-node SLURM cluster for the tests: munged, slurmctld and slurmd of Debian's slurm-wlm and munge,
started in a fresh folder under /tmp with their own key, sockets, ports, state and logs, and stopped by their PID
files afterwards. No systemd, cgroups or accounting database: processes are tracked by /proc (proctrack/linuxproc),
so memory and CPU limits are not enforced, and `sacct` is not available (the study ledger and `squeue` say what a
job is doing).

    with slurm_cluster() as cluster:       # raises ClusterUnavailable with a reason that names the fix
        subprocess.run(["sbatch", ...], env=cluster.env)

`cluster_or_skip()` is the pytest side: it skips with that reason, or fails where NLORA_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PACKAGES = "slurm-wlm munge"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
REQUIRE_ENV = "NLORA_REQUIRE_SLURM"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class ClusterUnavailable(Exception):
    """Why no cluster could start here, with the fix."""


@dataclass
class SlurmCluster:
    root: Path  # every file of the cluster: key, sockets, slurm.conf, state, logs
    conf: Path  # slurm.conf
    env: dict[str, str]  # os.environ with SLURM_CONF pointing at this cluster (its slurm.conf names the socket)
    cpus: int

    def run(self, *command: str, check: bool = True) -> str:
        """A client command (squeue, scontrol, ...) against this cluster; its stdout."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout


def unavailable_reason() -> str | None:
    """Why a cluster cannot start on this machine, before trying; None where it may."""
    if not sys.platform.startswith("linux"):
        return f"a SLURM test cluster needs Linux (this is {sys.platform})"
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return f"SLURM or munge missing ({', '.join(missing)} not found): apt-get install {PACKAGES}"
    if os.geteuid() != 0:
        return "the SLURM test cluster runs its daemons as root: run the tests as root (e.g. in a container)"
    return None


@contextlib.contextmanager
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start a cluster, yield it, stop every daemon. Raises ClusterUnavailable where it cannot start."""
    reason = unavailable_reason()
    if reason:
        raise ClusterUnavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="nlora-slurm-", dir="/tmp"))
    root.chmod(0o755)  # munged refuses a socket in a folder that others cannot enter
    try:
        yield _start(root)
    finally:
        _stop(root)  # whatever started, a failed start included
        shutil.rmtree(root, ignore_errors=True)


def cluster_or_skip() -> Iterator[SlurmCluster]:
    """The session fixture's body: a cluster, or a skip (a failure where NLORA_REQUIRE_SLURM=1) with the reason."""
    import pytest

    try:
        with slurm_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as e:
        message = f"no SLURM test cluster: {e}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(message)


# --------------------------------------------------------------------------------------------- start, stop

def _start(root: Path) -> SlurmCluster:
    for folder in ("munge", "state", "spool", "log"):
        (root / folder).mkdir()
    munge_socket = _start_munge(root)
    hardware = _detected_hardware()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, munge_socket, hardware, _free_ports(2)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _daemon(root, ["slurmctld", "-f", str(conf)], root / "slurmctld.pid", "slurmctld")
    _daemon(root, ["slurmd", "-f", str(conf), "-N", "localhost"], root / "slurmd.pid", "slurmd")
    cluster = SlurmCluster(root=root, conf=conf, env=env, cpus=int(hardware["CPUs"]))
    _wait_idle(cluster)
    return cluster


def _start_munge(root: Path) -> Path:
    key, socket_path = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    key.touch(mode=0o600)  # munged refuses a key that others can read
    key.write_bytes(os.urandom(1024))
    _daemon(root, ["munged", "--force", "--socket", str(socket_path), "--key-file", str(key),
                   "--pid-file", str(root / "munged.pid"), "--log-file", str(root / "log" / "munged.log"),
                   "--seed-file", str(root / "munge" / "munged.seed")], root / "munged.pid", "munged")
    return socket_path


def slurm_conf(root: Path, munge_socket: Path, hardware: dict[str, str], ports: list[int]) -> str:
    log = root / "log"
    return "\n".join([
        "ClusterName=nlora-test",
        f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire=5",  # a requeued job is not held for the default 120 s
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={log / 'slurmctld.log'}",
        f"SlurmdLogFile={log / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",  # no cgroups, no systemd
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",  # cells of one CPU each share the node
        "KillWait=1",  # SIGTERM to SIGKILL (submitit's job ignores SIGTERM)
        "MessageTimeout=5",
        f"NodeName=localhost NodeAddr=127.0.0.1 {' '.join(f'{k}={v}' for k, v in hardware.items())} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ""])


def _detected_hardware() -> dict[str, str]:
    """The node's CPUs, sockets, cores and threads as slurmd detects them (`slurmd -C`: a node that claims more is
    drained), with RealMemory at 90% of the detected memory."""
    done = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          env={**os.environ, "PATH": _sbin_path()})
    fields = dict(item.split("=", 1) for item in done.stdout.split("\n")[0].split() if "=" in item)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    if done.returncode != 0 or not all(fields.get(k, "").isdigit() for k in keys):
        raise ClusterUnavailable(f"slurmd -C did not describe this node (exit {done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()[-800:]}")
    hardware = {k: fields[k] for k in keys}
    hardware["RealMemory"] = str(max(1, int(int(fields["RealMemory"]) * 0.9)))
    return hardware


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _daemon(root: Path, command: list[str], pid_file: Path, name: str) -> None:
    """Start a daemon that forks itself; returns once its PID file names a live process."""
    _checked(command, root, name)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _pid(pid_file):
            return
        time.sleep(0.02)
    raise ClusterUnavailable(f"{name} wrote no PID file in {START_TIMEOUT_S:.0f} s{_log_tail(root, name)}")


def _checked(command: list[str], root: Path, name: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=root,
                          env={**os.environ, "PATH": _sbin_path()})
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-800:]
        raise ClusterUnavailable(f"{name} failed to start (exit {done.returncode}): {tail}{_log_tail(root, name)}")


def _wait_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=cluster.env, capture_output=True, text=True,
                              timeout=10)
        state = (done.stdout or done.stderr).strip()
        if state == "idle":
            return
        time.sleep(0.05)
    raise ClusterUnavailable(f"the node did not become idle in {START_TIMEOUT_S:.0f} s (sinfo: {state!r})"
                             f"{_log_tail(cluster.root, 'slurmctld')}{_log_tail(cluster.root, 'slurmd')}")


def _stop(root: Path) -> None:
    """Cancel the jobs left, stop slurmd, slurmctld and munged by their PID files (all at once: each takes a
    moment to shut down), then kill what is left of the jobs' step daemons (none can start once slurmd is gone)."""
    if _pid(root / "slurmctld.pid"):
        _cancel_jobs({**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
    daemons = [pid for pid in (_pid(root / f"{name}.pid") for name in ("slurmd", "slurmctld", "munged")) if pid]
    _signal(daemons, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(_alive(pid) for pid in daemons) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal([pid for pid in daemons if _alive(pid)], signal.SIGKILL)
    steps = _step_daemons(root / "slurm.conf")
    _signal(steps + _descendants(steps), signal.SIGKILL)  # a slurmstepd left behind ignores SIGTERM


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _descendants(pids: list[int]) -> list[int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], set(pids)
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = set(children)
    return found


def _step_daemons(conf: Path) -> list[int]:
    """The slurmstepd processes of this cluster's jobs (their environment names its slurm.conf): one whose job
    ended while its node was loaded can stay behind, waiting on a slurmd that is gone."""
    mark = f"SLURM_CONF={conf}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "slurmstepd" \
                    and mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _cancel_jobs(env: dict[str, str]) -> None:
    """Cancel every job and wait (a few seconds at most) until they are gone, so that no job's process outlives
    its slurmd."""
    def queue() -> str:
        done = subprocess.run(["squeue", "--noheader"], capture_output=True, text=True, timeout=30, env=env)
        return done.stdout.strip() if done.returncode == 0 else ""

    if not queue():
        return
    subprocess.run(["scancel", "--full", "--user", str(os.getuid())], capture_output=True, timeout=30, env=env)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while queue() and time.monotonic() < deadline:
        time.sleep(0.1)


def _pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (a daemon's exited child not reaped yet) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def _log_tail(root: Path, name: str, chars: int = 1500) -> str:
    path = root / "log" / f"{name}.log"
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return f"\n--- end of {path.name} ---\n{text[-chars:]}" if text else ""


def _sbin_path() -> str:
    """PATH with the sbin folders, where Debian installs the daemons (a non-login root shell may lack them)."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [p for p in ("/usr/sbin", "/sbin", "/usr/local/sbin") if p not in parts])
