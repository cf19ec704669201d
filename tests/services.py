"""Real services for the platform tests: a PostgreSQL server, dagster-daemon and dagster-webserver on loopback."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import REPO, VENV_BIN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL cluster (Debian's package) on 127.0.0.1, run as the `postgres` user."""
    bindir = postgres_bin()
    assert bindir is not None, "PostgreSQL is not installed: `make test` installs Debian's postgresql"
    root = Path(tempfile.mkdtemp(prefix="d2m-pg-"))
    shutil.chown(root, "postgres", "postgres")
    port = str(free_port())
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1"], check=True, capture_output=True)
    try:
        subprocess.run([*as_pg, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", "dagster"],
                       check=True, capture_output=True)
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": port, "DAGSTER_PG_USER": "postgres",
               "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": "dagster"}
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def dagster_process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """dagster-daemon / dagster-webserver with the project's workspace, stopped (with its children) at the end."""
    with log.open("w") as out:
        proc = subprocess.Popen([str(VENV_BIN / args[0]), *args[1:]], cwd=REPO, env=os.environ | env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)


def graphql(port: int, query: str, variables: dict | None = None, timeout: float = 120) -> dict:
    """POST a query to dagster-webserver's GraphQL API, waiting for the server to come up."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    deadline = time.time() + timeout
    while True:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                data = json.loads(response.read())
            assert "errors" not in data, data["errors"]
            return data["data"]
        except (ConnectionError, urllib.error.URLError):
            if time.time() > deadline:
                raise
            time.sleep(1)


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at `mount` (a disk that fills up); the test is skipped where mounting is refused."""
    import pytest

    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


SLURM_CONF = """ClusterName=d2mtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthInfo=socket={d}/munge/munge.sock
SlurmUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SlurmdParameters=config_overrides
MailProg=/bin/true
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
KillWait=30
MinJobAge=3600
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def slurm_installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch"))


def _wait(predicate, timeout: float, what) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(what())
        time.sleep(0.3)


@contextmanager
def slurm_cluster(gpus: int = 2, cpus: int = 4) -> Iterator[dict[str, str]]:
    """A one-node Slurm cluster on loopback (Debian's slurmctld, slurmd, munge) with `gpus` fake GPUs through
    GRES; yields the environment (SLURM_CONF) its clients need. Every job is cancelled and every daemon
    stopped at the end."""
    d = Path(tempfile.mkdtemp(prefix="d2m-slurm-", dir="/tmp"))  # munge's socket path must stay short
    for sub in ("etc", "state", "spool", "log", "run", "munge", "fakegpu"):
        (d / sub).mkdir()
    os.chmod(d, 0o755)
    os.chmod(d / "munge", 0o755)
    for i in range(gpus):  # GRES GPUs must be character devices: /dev/null stands in
        (d / "fakegpu" / f"nvidia{i}").symlink_to("/dev/null")
    (d / "etc" / "slurm.conf").write_text(SLURM_CONF.format(d=d, ctld_port=free_port(), d_port=free_port(),
                                                            cpus=cpus, gpus=gpus))
    (d / "etc" / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={d}/fakegpu/nvidia[0-{gpus - 1}]\n")
    env = {"SLURM_CONF": str(d / "etc" / "slurm.conf")}
    full_env = os.environ | env
    sock = str(d / "munge" / "munge.sock")
    subprocess.run(["mungekey", "-c", "-k", str(d / "munge" / "munge.key")], check=True, capture_output=True)
    subprocess.run(["munged", f"--key-file={d}/munge/munge.key", f"--socket={sock}", f"--pid-file={d}/munge/munged.pid",
                    f"--seed-file={d}/munge/munged.seed", f"--log-file={d}/munge/munged.log"],
                   check=True, capture_output=True)
    daemons = []
    try:
        for argv, log in ((["slurmctld", "-D"], "slurmctld.stderr"), (["slurmd", "-D", "-N", "localhost"], "slurmd.stderr")):
            with (d / "log" / log).open("w") as out:
                daemons.append(subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT))

        def idle() -> bool:
            done = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=full_env, capture_output=True, text=True)
            return done.stdout.strip() == "idle"

        _wait(idle, 60, lambda: "Slurm node not idle: " + "\n".join(
            f.read_text()[-1500:] for f in sorted((d / "log").iterdir())))
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=full_env, capture_output=True)

        def no_jobs() -> bool:
            done = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,S"], env=full_env, capture_output=True, text=True)
            return done.returncode != 0 or not done.stdout.strip()

        try:
            _wait(no_jobs, 30, lambda: "Slurm jobs left")
        finally:
            subprocess.run(["scontrol", "shutdown"], env=full_env, capture_output=True)
            for proc in daemons:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            subprocess.run(["munged", "-s", f"--socket={sock}"], capture_output=True)
            shutil.rmtree(d, ignore_errors=True)
