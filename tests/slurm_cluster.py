"""A one-node SLURM cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd.

Everything lives in a fresh state dir (config, munge key and socket, spool, logs); the
daemons are started in the foreground as child processes and stopped by their pids, also
when a test fails. Needs root (munged runs as the munge user, slurmd as root) and the
Debian packages slurm-wlm and munge (``.ci/system-deps`` installs them).

    with SlurmCluster() as slurm:      # or: python tests/slurm_cluster.py (up, sinfo, down)
        env = slurm.env()              # SLURM_CONF, and dask-jobqueue's settings for it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scancel")


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (munged runs as the munge user, slurmd as root)"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"not installed: {', '.join(absent)} (Debian packages slurm-wlm, munge)"
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named ``zmqrnode`` at 127.0.0.1."""

    def __init__(self, cpus: int = 2, memory_mb: int = 4000) -> None:
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.dir: Path | None = None

    # -- what clients need
    def env(self) -> dict[str, str]:
        """SLURM_CONF for sbatch/squeue, and dask-jobqueue's SLURMCluster settings: one
        core and one Dask worker per job, everything on 127.0.0.1."""
        assert self.dir is not None
        return {
            "SLURM_CONF": str(self.conf),
            "DASK_JOBQUEUE__SLURM__CORES": "1",
            "DASK_JOBQUEUE__SLURM__PROCESSES": "1",
            "DASK_JOBQUEUE__SLURM__MEMORY": "1GiB",
            "DASK_JOBQUEUE__SLURM__WALLTIME": "00:30:00",
            "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(self.dir / "jobs"),
            "DASK_JOBQUEUE__SLURM__LOCAL_DIRECTORY": str(self.dir / "jobs"),
            "DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS": (
                '{"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}'
            ),
            "DASK_JOBQUEUE__SLURM__WORKER_EXTRA_ARGS": '["--host", "127.0.0.1"]',
        }

    def run(self, *cmd: str) -> str:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def jobs(self) -> list[str]:
        """The job ids squeue shows (pending or running)."""
        return self.run("squeue", "-h", "-o", "%i").split()

    # -- lifecycle
    def start(self, timeout: float = 60.0) -> None:
        import pwd

        munge = pwd.getpwnam("munge")
        self.dir = Path(tempfile.mkdtemp(prefix="zmqr-slurm-"))
        os.chmod(self.dir, 0o755)  # munged (the munge user) reaches its own subdir
        d = self.dir
        for sub in ("munge", "munge-run", "ctld", "spool", "jobs"):
            (d / sub).mkdir()
        for sub, mode in (("munge", 0o700), ("munge-run", 0o755)):  # munged checks both
            os.chown(d / sub, munge.pw_uid, munge.pw_gid)
            os.chmod(d / sub, mode)
        key = d / "munge" / "munge.key"
        subprocess.run([_exe("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        self.socket = d / "munge-run" / "munge.sock"
        self.conf = d / "slurm.conf"
        self.conf.write_text(self._config())
        self._spawn(
            "munged",
            [
                _exe("munged"),
                "-F",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={d / 'munge' / 'munged.pid'}",
                f"--log-file={d / 'munge' / 'munged.log'}",
                f"--seed-file={d / 'munge' / 'munged.seed'}",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
        )
        self._wait(lambda: self.socket.exists(), timeout, "munged's socket")
        self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_exe("slurmd"), "-D", "-N", "zmqrnode", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "the node to be idle in sinfo")

    def _config(self) -> str:
        d = self.dir
        assert d is not None
        host = socket.gethostname().split(".")[0]
        return f"""\
ClusterName=zmqrtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={d / "ctld"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=zmqrnode NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        assert self.dir is not None
        out = open(self.dir / f"{name}.out", "wb")  # noqa: SIM115 - closed right after
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kwargs
            )
        finally:
            out.close()
        self.procs.append((name, proc))

    def _node_idle(self) -> bool:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            return "idle" in self.run("sinfo", "-h", "-o", "%t")
        return False

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): {self.logs(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")
            time.sleep(0.1)

    def logs(self, name: str | None = None) -> str:
        """The tail of the daemons' output and logs (for a failure message)."""
        if self.dir is None:
            return ""
        files = sorted(self.dir.glob("*.out")) + sorted(self.dir.glob("*.log"))
        files += [self.dir / "munge" / "munged.log"]
        out = []
        for f in files:
            if f.exists() and (name is None or f.name.startswith(name)):
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the daemons by pid (slurmd, slurmctld, munged), then remove the state dir."""
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # a manual check: bring the cluster up, show it, take it down
    reason = missing()
    if reason:
        sys.exit(f"cannot start SLURM here: {reason}")
    t0 = time.monotonic()
    with SlurmCluster() as cluster:
        print(f"up in {time.monotonic() - t0:.1f} s; state in {cluster.dir}")
        print(cluster.run("sinfo"))
        print(cluster.run("sbatch", "--wrap", "hostname", "-o", str(cluster.dir / "x.out")))
