"""A private PostgreSQL server for the tests and the benchmark, from Debian's ``postgresql`` binaries.

Each run makes its own cluster in a fresh directory on a free port (trust
auth on loopback only), so tests never touch a system database and need
nothing started beforehand: CI only installs the package. As root the server
runs as the ``postgres`` user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} not found: install Debian's postgresql package")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """``start()`` a throwaway server; ``new_database()`` gives a DSN to an empty database."""

    def __init__(self, durable: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.port = _free_port()
        self.durable = durable  # the benchmark wants fsync on; tests do not need it
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")

    def start(self) -> PostgresCluster:
        """Create the cluster on first use, then start the server (again, after ``halt``)."""
        data = self.dir / "data"
        if not data.exists():
            if self._as_root:
                shutil.chown(self.dir, "postgres", "postgres")
            self._run(_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=300"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")
        return self

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        name = f"relay_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database]
            + ["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {result.stderr}")
        return result.stdout.strip()

    def halt(self) -> None:
        """Stop the server as a crash would (immediate mode), keeping its data for ``start``."""
        self._run(_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        try:
            self.halt()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
