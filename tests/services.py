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
