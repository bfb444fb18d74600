"""A throwaway local PostgreSQL cluster, for the test suite, benchmarks and ``deploy/up``.

PostgreSQL refuses to run as root, and CI runs as root: when this process is root the cluster
runs as an unprivileged user (``postgres`` when it exists, else a ``cdcddp`` system user that is
created on demand). The cluster listens on 127.0.0.1 and a unix socket inside its directory, so
several clusters can run side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_MAJOR_PREFERRED = 15

# Debian 13's PostgreSQL 17 with wal2json, in a root file system of its own (``deploy/setup-env``
# installs it for the tests: decoding on a standby needs 16+, Debian 12 has 15).
PG17_ROOT = Path(os.environ.get("CDCDDP_PG17_ROOT", "/var/cache/cdcddp/debian13-postgresql17"))
PG17_BINDIR = Path("/usr/lib/postgresql/17/bin")  # inside PG17_ROOT

# Settings every cluster gets; callers may add or override.
BASE_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "64",
    "max_wal_senders": "64",
    "max_connections": "200",
    "listen_addresses": "'127.0.0.1'",
    "shared_buffers": "128MB",
    "logical_decoding_work_mem": "64MB",
    "wal_sender_timeout": "60s",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %a '",
    "timezone": "'UTC'",
    "datestyle": "'iso, ymd'",
}


class ClusterError(RuntimeError):
    """The local cluster could not be created or started; the message says what to fix."""


def find_bindir() -> Path:
    """The bin directory of the installed PostgreSQL server, preferring version 15."""
    override = os.environ.get("CDCDDP_PG_BINDIR")
    if override:
        return Path(override)
    base = Path("/usr/lib/postgresql")
    versions = sorted(
        (int(p.name) for p in base.glob("*") if p.name.isdigit() and (p / "bin/initdb").exists()),
        reverse=True,
    )
    if not versions:
        raise ClusterError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: "
            "install them with `apt-get install postgresql-15 postgresql-15-wal2json`."
        )
    major = PG_MAJOR_PREFERRED if PG_MAJOR_PREFERRED in versions else versions[0]
    return base / str(major) / "bin"


def has_wal2json(bindir: Path) -> bool:
    pkglibdir = subprocess.run(
        [str(bindir / "pg_config"), "--pkglibdir"], capture_output=True, text=True, check=False
    ).stdout.strip() or str(bindir.parent / "lib")
    return Path(pkglibdir, "wal2json.so").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "cdcddp"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "cdcddp"],
        check=True,
    )
    return pwd.getpwnam("cdcddp")


def _reachable(path: Path, user: pwd.struct_passwd) -> bool:
    """Can ``user`` traverse every existing directory down to ``path`` (by mode bits)?"""
    for directory in [*reversed(path.parents), path]:
        try:
            info = directory.stat()
        except FileNotFoundError:
            break
        if info.st_uid == user.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == user.pw_gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


def _chroot_user(chroot: Path, name: str = "postgres") -> pwd.struct_passwd:
    """The account ``name`` of the system in ``chroot`` (its ids differ from the host's)."""
    for line in (chroot / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) == 7:
            return pwd.struct_passwd((*fields[:2], int(fields[2]), int(fields[3]), *fields[4:]))
    raise ClusterError(f"{chroot} has no user {name}")


@dataclass
class LocalCluster:
    """A PostgreSQL cluster in ``root`` (data in ``root/data``, socket and log beside it)."""

    root: Path
    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    superuser: str = "postgres"
    bindir: Path = field(default_factory=find_bindir)
    # A root file system holding another PostgreSQL (``bindir`` is then a path inside it, and
    # ``root`` must lie inside it): another major version than the host's, for tests.
    chroot: Path | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()  # (a symlink: see ensure_local)
        self._user = _service_user()
        if self.chroot is not None:
            self.chroot = Path(self.chroot).resolve()
            if self._user is None:
                raise ClusterError("a cluster in a chroot can only be started as root")
            self._user = _chroot_user(self.chroot)
            self.root.relative_to(self.chroot)  # (ValueError when outside it)
            if not (self.chroot / str(self.bindir.parent / "lib/wal2json.so")[1:]).exists():
                raise ClusterError(f"wal2json is not installed in {self.chroot}")
        elif not has_wal2json(self.bindir):
            raise ClusterError(
                f"wal2json is not installed for the PostgreSQL in {self.bindir.parent}: "
                "install it with `apt-get install postgresql-15-wal2json`."
            )
        # psql and pg_isready run here, whichever server they talk to.
        self.client_bindir = self.bindir if self.chroot is None else find_bindir()

    def server_path(self, path: Path) -> str:
        """``path`` as the server sees it (inside its chroot, if any)."""
        if self.chroot is None:
            return str(path)
        return "/" + str(Path(path).relative_to(self.chroot))

    # -- paths -------------------------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socketdir(self) -> Path:
        return self.root / "run"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, dbname: str = "postgres", **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": self.superuser,
                 "dbname": dbname, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    # -- lifecycle ---------------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        argv = [str(self.bindir / args[0]), *args[1:]]
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        if self._user is not None:
            env["HOME"] = self.server_path(self.root)
        if self.chroot is not None:
            assert self._user is not None
            chroot = str(self.chroot)
            argv = ["chroot", f"--userspec={self._user.pw_uid}:{self._user.pw_gid}", chroot,
                    *(self.server_path(Path(a)) if a.startswith(chroot) else a for a in argv)]
        elif self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        proc = subprocess.run(
            argv,
            capture_output=True, text=True, env=env, cwd=self.root, check=False,
            **kwargs,  # type: ignore[arg-type]
        )
        if check and proc.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise ClusterError(
                f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}\n{log}"
            )
        return proc

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def init(self) -> None:
        """Create the cluster unless it exists; (re)write its settings."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._chown(self.root)
        if self._user is not None and not _reachable(self.root, self._user):
            raise ClusterError(f"{self.root} is not reachable by user {self._user.pw_name}: "
                               "give its parent directories o+x, or use another directory")
        self.socketdir.mkdir(exist_ok=True)
        self._chown(self.socketdir)
        if not (self.datadir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.datadir), "-U", self.superuser, "--auth=trust",
                      "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        if not self.port:
            self.port = free_port()
        conf = {**BASE_SETTINGS, **self._plugin_setting(), "port": str(self.port),
                "unix_socket_directories": f"'{self.server_path(self.socketdir)}'",
                **self.settings}
        auto = "".join(f"{k} = {v}\n" for k, v in conf.items())
        target = self.datadir / "postgresql.auto.conf"
        target.write_text("# written by cdcddp.devcluster\n" + auto)
        self._chown(target)

    def _plugin_setting(self) -> dict[str, str]:
        """``output_plugin_libraries`` with wal2json added, on servers that have the setting
        (15.19, 17.11 and later minor releases; older ones refuse to start with it)."""
        described = self._run("postgres", "--describe-config").stdout
        for line in described.splitlines():
            name, *fields = line.split("\t")
            if name == "output_plugin_libraries":
                default = fields[3] if len(fields) > 3 and fields[3] else "pgoutput, test_decoding"
                return {name: f"'{default}, wal2json'"}
        return {}

    def is_running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.datadir), "status", check=False).returncode == 0

    def start(self) -> None:
        if self.is_running():
            return
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60",
                  "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "PG_VERSION").exists() and self.is_running():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql (for set-up steps; tests use psycopg)."""
        proc = subprocess.run(
            [str(self.client_bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(dbname), "-c", sql],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise ClusterError(proc.stderr.strip())
        return proc.stdout

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = subprocess.run([str(self.client_bindir / "pg_isready"), "-h", "127.0.0.1",
                                   "-p", str(self.port)], capture_output=True, check=False)
            if proc.returncode == 0:
                return
            time.sleep(0.1)
        raise ClusterError(f"PostgreSQL on port {self.port} did not become ready")


@contextlib.contextmanager
def throwaway_cluster(prefix: str = "cdcddp-pg-", *, chroot: Path | None = None,
                      bindir: Path | None = None, **settings: str) -> Iterator[LocalCluster]:
    """A started cluster in a new temporary directory, destroyed on exit (tests, benchmarks).

    fsync is off by default for speed; synchronous_commit stays on because the walsender only
    decodes flushed WAL: an asynchronous commit would reach the stream up to wal_writer_delay
    late. ``chroot`` and ``bindir``: see :class:`LocalCluster`.
    """
    where = None if chroot is None else chroot / "tmp"
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix=prefix, dir=where)),
                           settings={"fsync": "off", **settings}, chroot=chroot,
                           bindir=find_bindir() if bindir is None else bindir)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


_standbys = itertools.count(1)  # (a primary may have several)


@contextlib.contextmanager
def streaming_standby(primary: LocalCluster, prefix: str = "cdcddp-standby-",
                      **settings: str) -> Iterator[LocalCluster]:
    """A started standby of ``primary`` (a base backup streaming from it through a physical
    slot, with ``hot_standby_feedback``), in a new temporary directory beside it; destroyed
    on exit. Decoding on it needs PostgreSQL 16+."""
    slot = f"standby_{primary.port}_{os.getpid()}_{next(_standbys)}"
    primary.psql(f"SELECT pg_create_physical_replication_slot('{slot}')")
    where = None if primary.chroot is None else primary.chroot / "tmp"
    standby = LocalCluster(
        Path(tempfile.mkdtemp(prefix=prefix, dir=where)), chroot=primary.chroot,
        bindir=primary.bindir,
        settings={"fsync": "off", "hot_standby_feedback": "on",
                  "primary_conninfo": f"'host=127.0.0.1 port={primary.port} "
                                      f"user={primary.superuser}'",
                  "primary_slot_name": f"'{slot}'", **settings})
    try:
        standby._chown(standby.root)
        standby._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port),
                     "-U", primary.superuser, "-D", str(standby.datadir), "-X", "stream",
                     "--no-sync")
        signal = standby.datadir / "standby.signal"
        signal.touch()
        standby._chown(signal)
        standby.init()
        standby.start()
        standby.wait_ready()
        yield standby
    finally:
        standby.destroy()
        with contextlib.suppress(ClusterError):
            primary.psql(f"SELECT pg_drop_replication_slot('{slot}')")


def ensure_local(root: Path, port: int = 54329) -> LocalCluster:
    """Create (once) and start the persistent development cluster used by ``deploy/up``.

    As root, in a checkout PostgreSQL's user cannot reach (under /root, mode 700), ``root``
    becomes a link to a directory in /var/tmp that it can reach."""
    root = Path(root).absolute()
    user = _service_user()
    if user is not None and not root.exists() and not _reachable(root.parent, user):
        name = hashlib.sha256(str(root).encode()).hexdigest()[:12]
        target = Path("/var/tmp") / f"cdcddp-dev-{name}"
        target.mkdir(mode=0o755, exist_ok=True)
        root.symlink_to(target, target_is_directory=True)
    cluster = LocalCluster(root, port=port)
    cluster.init()
    cluster.start()
    cluster.wait_ready()
    return cluster


def main() -> None:
    """``python -m cdcddp.devcluster DIR [PORT]``: start the dev cluster, print its DSN."""
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".cdcddp")
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 54329
    try:
        cluster = ensure_local(root, port)
    except ClusterError as exc:
        sys.exit(f"cdcddp: {exc}")
    print(cluster.dsn())


if __name__ == "__main__":
    main()
