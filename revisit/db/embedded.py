"""A private PostgreSQL/PostGIS cluster inside revisit's data directory.

When Settings hold no database URL, revisit runs its own PostgreSQL cluster in
``<data_dir>/postgres``:

- created with ``initdb`` on first use, in a temporary directory that is renamed
  into place only once the cluster, its database and PostGIS exist, so a kill
  during creation leaves nothing half-made;
- run as an unprivileged OS user (``postgres`` by default) when revisit runs as
  root, because PostgreSQL refuses to run as root;
- listening only on a Unix socket inside its own data directory (mode 0700),
  never on TCP;
- when revisit runs as root and the OS user cannot reach the data directory
  (a checkout under ``/root``, or any 0700 parent), kept instead in
  ``/var/lib/revisit/<digest>/postgres`` (``<digest>``: 12 hex digits of the
  sha256 of the data directory's real path), owned by that user, mode 0700,
  with ``<data_dir>/postgres`` a symbolic link to it. The link is made before
  the cluster is moved into place, so a cluster without its link is an orphan
  (its data directory was deleted) and is removed rather than adopted;
- started on demand and shared between processes: every process that uses it
  holds a shared lock on ``<data_dir>/run/postgres.users``, and the last one out
  stops it, unless it was pinned by ``revisit db start`` (or ``revisit db url``);
- recovered after a ``kill -9``: a ``postmaster.pid`` whose process is gone, or
  belongs to something else, is removed before the next start.

The test suite starts its throwaway clusters with this same class.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import URL

from revisit.errors import (
    EmbeddedDatabaseError,
    PostGISNotInstalledError,
    PostgresNotFoundError,
)

if TYPE_CHECKING:
    from revisit.config import Settings

log = logging.getLogger(__name__)

DBNAME = "revisit"
SUPERUSER = "revisit"
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
_CONF_NAME = "revisit.conf"
_PG_HBA = (
    "# Written by revisit. Unix socket only; there is no TCP listener.\n"
    "# TYPE  DATABASE  USER     METHOD\n"
    f"local   all       {SUPERUSER}  trust\n"
    "local   all       all      scram-sha-256\n"
)
#: Where clusters go whose data directory the OS user cannot reach (see the module docstring).
FALLBACK_ROOT = Path("/var/lib/revisit")
_INCLUDE_LINE = f"include_if_exists = '{_CONF_NAME}'\t# written by revisit at every start\n"


def find_bin_dir(explicit: Path | None = None) -> Path:
    """Find the directory holding PostgreSQL's server programs.

    Args:
        explicit: ``postgres.bin_dir`` from Settings, if set.

    Returns:
        A directory with ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises:
        PostgresNotFoundError: No PostgreSQL server installation was found.
    """
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    else:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
        candidates.extend(versions)
        on_path = shutil.which("pg_ctl")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    where = f"in {explicit}" if explicit is not None else "in /usr/lib/postgresql/*/bin or on PATH"
    raise PostgresNotFoundError(
        f"PostgreSQL server programs (initdb, pg_ctl, postgres) not found {where}: "
        "install them with `apt-get install postgresql-15 postgresql-15-postgis-3`, "
        "set REVISIT_POSTGRES__BIN_DIR, or set REVISIT_DATABASE_URL to use an existing server"
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedPostgres:
    """One PostgreSQL cluster that revisit owns, in ``<data_dir>/postgres``.

    Use it as a context manager (or :meth:`acquire` / :meth:`release`): entering
    creates the cluster if needed, starts it if it is not running, and registers
    this process as a user; leaving stops it when this was the last user and the
    cluster is not pinned.

    Args:
        data_dir: revisit's data directory; the cluster lives in ``data_dir/postgres``.
        bin_dir: Directory with the PostgreSQL server programs; found when None.
        os_user: OS user that owns and runs the cluster when this process is root.
        port: Names the Unix socket (``.s.PGSQL.<port>``); there is no TCP listener.
        start_timeout_s: How long to wait for the server to start or stop.
        fallback_root: Where the cluster goes when ``os_user`` cannot reach ``data_dir``.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        bin_dir: Path | None = None,
        os_user: str = "postgres",
        port: int = 5432,
        start_timeout_s: float = 60.0,
        fallback_root: Path = FALLBACK_ROOT,
    ) -> None:
        self.data_dir = data_dir.absolute()
        self.run_dir = self.data_dir / "run"
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._bin_dir_setting = bin_dir
        self._bin_dir: Path | None = None
        self.os_user = os_user if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._users_fd: IO[bytes] | None = None
        #: ``<data_dir>/postgres``: the cluster itself, or a link to it.
        self.link = self.data_dir / "postgres"
        self.pgdata = self._locate(fallback_root)
        socket = self.socket_path
        if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
            raise EmbeddedDatabaseError(
                f"the embedded database's socket path {socket} is "
                f"{len(os.fsencode(socket))} bytes, over the {MAX_SOCKET_PATH}-byte limit of "
                "Unix sockets: choose a shorter REVISIT_DATA_DIR"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedPostgres:
        """Build the cluster described by ``settings`` (its data_dir and postgres section)."""
        return cls(
            settings.data_dir,
            bin_dir=settings.postgres.bin_dir,
            os_user=settings.postgres.os_user,
            port=settings.postgres.port,
            start_timeout_s=settings.postgres.start_timeout_s,
        )

    # -- where things are ---------------------------------------------------------------

    def _locate(self, fallback_root: Path) -> Path:
        """The cluster's directory: ``<data_dir>/postgres``, where that link points, or the
        fallback when the OS user could not reach ``<data_dir>``."""
        if self.link.is_symlink():
            return Path(os.path.realpath(self.link))
        if self.link.exists() or self._unreachable(self.link) is None:
            return self.link
        digest = hashlib.sha256(os.fsencode(os.path.realpath(self.data_dir))).hexdigest()[:12]
        return fallback_root.absolute() / digest / "postgres"

    @property
    def relocated(self) -> bool:
        """Whether the cluster lives outside the data directory (see the module docstring)."""
        return self.pgdata != self.link

    @property
    def socket_dir(self) -> Path:
        """The directory of the Unix socket: the cluster's own data directory."""
        return self.pgdata

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{self.port}"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.pgdata / "log" / "server.log"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_bin_dir(self._bin_dir_setting)
        return self._bin_dir

    def libpq_url(self, dbname: str = DBNAME) -> str:
        """A libpq URI of the cluster, usable as ``psql "$(revisit db url)"``."""
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{SUPERUSER}@/{dbname}?host={host}&port={self.port}"

    def sqlalchemy_url(self, dbname: str = DBNAME) -> URL:
        """A SQLAlchemy URL (psycopg driver) of a database in the cluster, as its superuser."""
        return URL.create(
            "postgresql+psycopg",
            username=SUPERUSER,
            database=dbname,
            query={"host": str(self.socket_dir), "port": str(self.port)},
        )

    def conninfo(self, dbname: str = DBNAME) -> str:
        """A libpq connection string for ``psycopg.connect``, as the cluster's superuser."""
        return self._conninfo(self.socket_dir, dbname)

    def _conninfo(self, socket_dir: Path, dbname: str) -> str:
        return make_conninfo(host=str(socket_dir), port=self.port, user=SUPERUSER, dbname=dbname)

    # -- state --------------------------------------------------------------------------

    def is_initialized(self) -> bool:
        """Whether the cluster exists (it is created whole or not at all)."""
        return (self.pgdata / "PG_VERSION").is_file()

    def postmaster_pid(self) -> int | None:
        """The PID of this cluster's running postmaster, or None if it is not running.

        A ``postmaster.pid`` whose process is gone, or whose PID now belongs to
        another program, does not count.
        """
        pid = self._pid_from_file(self.pgdata)
        if pid is None or not _pid_alive(pid):
            return None
        return pid if self._is_our_postmaster(pid, self.pgdata) else None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    @property
    def pinned(self) -> bool:
        """Whether the cluster stays up after its last user leaves."""
        return (self.run_dir / "postgres.pinned").exists()

    # -- lifecycle ----------------------------------------------------------------------

    def acquire(self) -> EmbeddedPostgres:
        """Create and start the cluster as needed, and register this process as a user.

        Returns:
            self, so that ``with EmbeddedPostgres(...).acquire()`` reads naturally.

        Raises:
            PostgresNotFoundError: PostgreSQL is not installed.
            PostGISNotInstalledError: PostGIS is not installed for it.
            EmbeddedDatabaseError: The cluster could not be created or started.
        """
        if self._users_fd is not None:
            return self
        with self._transition_lock():
            self.ensure_started()
            users = (self.run_dir / "postgres.users").open("ab")
            fcntl.flock(users, fcntl.LOCK_SH)
            self._users_fd = users
        return self

    def release(self) -> None:
        """Unregister this process; stop the cluster if it was the last user and not pinned."""
        if self._users_fd is None:
            return
        self._users_fd.close()
        self._users_fd = None
        with self._transition_lock():
            if self.pinned or not self.is_running():
                return
            with (self.run_dir / "postgres.users").open("ab") as users:
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.debug("embedded database still in use by another process; left running")
                    return
                self.stop()

    def __enter__(self) -> EmbeddedPostgres:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def pin(self) -> None:
        """Keep the cluster up after its last user leaves (``revisit db start``)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "postgres.pinned").touch()

    def unpin(self) -> None:
        (self.run_dir / "postgres.pinned").unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Unpin and stop the cluster (``revisit db stop``), unless a process still uses it.

        Raises:
            EmbeddedDatabaseError: Another revisit process (a running service) uses it.
        """
        self.unpin()
        if not self.is_initialized():
            return
        with self._transition_lock():
            if not self.is_running():
                return
            with (self.run_dir / "postgres.users").open("ab") as users:
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise EmbeddedDatabaseError(
                        f"the embedded database in {self.pgdata} is in use by another revisit "
                        "process (a running service?): stop that first; it stops the database "
                        "when it exits"
                    ) from None
                self.stop()

    def ensure_started(self) -> bool:
        """Create the cluster if it does not exist, and start it if it is not running.

        Returns:
            True if this call started the server, False if it was already running.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.relocated and not self.link.is_symlink() and self.pgdata.exists():
            self._remove_orphan()
        if not self.is_initialized():
            self._create()
        if self.is_running():
            return False
        self._start(self.pgdata)
        return True

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended, data is flushed)."""
        if not self.is_running():
            return
        result = self._pg_ctl(
            "stop", self.pgdata, "-m", "fast", "-w", "-t", str(int(self.start_timeout_s))
        )
        if result.returncode != 0 and self.is_running():
            raise EmbeddedDatabaseError(
                f"could not stop the embedded database in {self.pgdata}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        log.info("embedded database stopped", extra={"pgdata": str(self.pgdata)})

    # -- creation -----------------------------------------------------------------------

    def _remove_orphan(self) -> None:
        """Remove a relocated cluster whose data directory (and so its link) was deleted."""
        if self.is_running():
            raise EmbeddedDatabaseError(
                f"{self.pgdata} holds the cluster of a deleted data directory ({self.link} "
                "is gone) and its server still runs: stop it with "
                f"`runuser -u {self.os_user} -- {self.bin_dir / 'pg_ctl'} stop -D {self.pgdata}`"
            )
        log.warning(
            "removing %s: the cluster of a data directory that was deleted (%s is gone)",
            self.pgdata,
            self.link,
        )
        self._remove_tree(self.pgdata.parent)

    def _make_home(self) -> None:
        """Make the relocated cluster's parent: root's ``fallback_root`` (0755), then a
        directory of the OS user's own (0700) that keeps the cluster and socket private."""
        home = self.pgdata.parent
        home.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        home.mkdir(exist_ok=True, mode=0o700)
        self._give_to_os_user(home)
        log.info(
            "the OS user %r cannot reach %s: the embedded database lives in %s instead, "
            "linked from %s",
            self.os_user,
            self.data_dir,
            self.pgdata,
            self.link,
        )

    def _create(self) -> None:
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise EmbeddedDatabaseError(
                f"{self.pgdata} exists but holds no PostgreSQL cluster (no PG_VERSION): "
                "move it away, or choose another REVISIT_DATA_DIR"
            )
        self._check_postgis_installed()
        if self.relocated:
            self._make_home()
        staging = self.pgdata.parent / "postgres.init"
        if staging.exists():
            log.warning("removing an unfinished cluster creation in %s", staging)
            self._remove_tree(staging)
        staging.mkdir(parents=True, mode=0o700)
        self._give_to_os_user(staging)
        self._check_reachable(staging)
        log.info("creating the embedded database in %s", self.pgdata)
        result = self._as_os_user(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(staging),
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ]
        )
        if result.returncode != 0:
            raise EmbeddedDatabaseError(
                f"initdb failed in {staging}: {result.stderr.strip() or result.stdout.strip()}"
            )
        with (staging / "postgresql.conf").open("a") as conf:
            conf.write("\n" + _INCLUDE_LINE)
        # revisit itself is trusted on the private socket; any other role (a
        # reader made by `revisit db grant-reader`) must give its password.
        (staging / "pg_hba.conf").write_text(_PG_HBA)
        self._start(staging)
        try:
            self._bootstrap_database(staging)
        finally:
            self._pg_ctl("stop", staging, "-m", "fast", "-w")
        if self.pgdata.exists():
            self.pgdata.rmdir()  # empty, checked above
        if self.relocated:
            # The link first: a relocated cluster without one is an orphan (see _remove_orphan).
            tmp_link = self.data_dir / ".postgres.link"
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(self.pgdata, target_is_directory=True)
            tmp_link.replace(self.link)
        staging.rename(self.pgdata)

    def _bootstrap_database(self, pgdata: Path) -> None:
        with psycopg.connect(self._conninfo(pgdata, "postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DBNAME)))
        with psycopg.connect(self._conninfo(pgdata, DBNAME), autocommit=True) as conn:
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
            except psycopg.errors.UndefinedFile as exc:
                raise self._postgis_missing() from exc

    def _postgis_missing(self) -> PostGISNotInstalledError:
        major = self._major_version()
        return PostGISNotInstalledError(
            f"PostGIS is not installed for PostgreSQL {major} ({self.bin_dir}): "
            f"install it with `apt-get install postgresql-{major}-postgis-3`"
        )

    def _check_postgis_installed(self) -> None:
        result = subprocess.run(
            [str(self.bin_dir / "pg_config"), "--sharedir"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            return  # no pg_config: CREATE EXTENSION will tell
        control = Path(result.stdout.strip()) / "extension" / "postgis.control"
        if not control.is_file():
            raise self._postgis_missing()

    def _major_version(self) -> str:
        # /usr/lib/postgresql/15/bin -> 15; otherwise ask the server binary.
        if self.bin_dir.parent.name.isdigit():
            return self.bin_dir.parent.name
        result = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True
        )
        words = result.stdout.split()
        return words[-1].split(".")[0] if words else "15"

    # -- starting -----------------------------------------------------------------------

    def _start(self, pgdata: Path) -> None:
        self._check_reachable(pgdata)
        self._clear_stale_pid(pgdata)
        self._write_conf(pgdata)
        (pgdata / "log").mkdir(exist_ok=True)
        self._give_to_os_user(pgdata / "log")
        log_path = pgdata / "log" / "server.log"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            remaining = max(1, int(deadline - time.monotonic()))
            result = self._pg_ctl("start", pgdata, "-w", "-t", str(remaining), "-l", str(log_path))
            if result.returncode == 0:
                log.info("embedded database started", extra={"pgdata": str(pgdata)})
                return
            tail = _tail(log_path)
            # After a kill -9 of the postmaster its children take a moment to exit
            # and release shared memory; PostgreSQL refuses to start until they have.
            if "still in use" in tail and time.monotonic() < deadline:
                time.sleep(0.5)
                self._clear_stale_pid(pgdata)
                continue
            raise EmbeddedDatabaseError(
                f"the embedded database in {pgdata} did not start: "
                f"{result.stderr.strip() or result.stdout.strip()}; "
                f"last lines of {log_path}:\n{tail}"
            )

    def _write_conf(self, pgdata: Path) -> None:
        def quoted(value: str) -> str:
            return "'" + value.replace("'", "''") + "'"

        text = (
            "# Written by revisit at every start; edits are overwritten.\n"
            "listen_addresses = ''\n"
            f"unix_socket_directories = {quoted(str(pgdata))}\n"
            "unix_socket_permissions = 0700\n"
            f"port = {self.port}\n"
        )
        target = pgdata / _CONF_NAME
        tmp = pgdata / f".{_CONF_NAME}.tmp"
        tmp.write_text(text)
        self._give_to_os_user(tmp)
        tmp.replace(target)

    def _clear_stale_pid(self, pgdata: Path) -> None:
        pid = self._pid_from_file(pgdata)
        if pid is None:
            return
        if _pid_alive(pid) and self._is_our_postmaster(pid, pgdata):
            return
        log.warning(
            "removing the stale postmaster.pid of the embedded database (PID %d is not its server)",
            pid,
        )
        for name in ("postmaster.pid", f".s.PGSQL.{self.port}.lock", f".s.PGSQL.{self.port}"):
            (pgdata / name).unlink(missing_ok=True)

    @staticmethod
    def _pid_from_file(pgdata: Path) -> int | None:
        try:
            first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return int(first) if first.isdigit() else None

    @staticmethod
    def _is_our_postmaster(pid: int, pgdata: Path) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True  # no /proc (not Linux): trust the pid file, as PostgreSQL does
        if not argv or not os.path.basename(argv[0]).startswith(b"postgres"):
            return False
        try:
            data_dir = os.fsencode(os.path.realpath(pgdata))
            return any(os.fsencode(os.path.realpath(os.fsdecode(a))) == data_dir for a in argv[1:])
        except (OSError, ValueError):
            return False

    # -- running programs as the cluster's owner ----------------------------------------

    def _pg_ctl(self, action: str, pgdata: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self._as_os_user([str(self.bin_dir / "pg_ctl"), action, "-D", str(pgdata), *args])

    def _as_os_user(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise EmbeddedDatabaseError(
                    "running as root needs `runuser` (util-linux) to start PostgreSQL "
                    f"as the OS user {self.os_user!r}"
                )
            self._os_user_entry()
            argv = [runuser, "-u", self.os_user, "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            list(argv), capture_output=True, text=True, cwd="/", env=env, check=False
        )

    def _os_user_entry(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.os_user)
        except KeyError:
            raise EmbeddedDatabaseError(
                f"the OS user {self.os_user!r} that should own the embedded database does "
                "not exist: create it (`useradd --system postgres`) or set "
                "REVISIT_POSTGRES__OS_USER"
            ) from None

    def _give_to_os_user(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        entry = self._os_user_entry()
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def _unreachable(self, path: Path) -> tuple[Path, os.stat_result] | None:
        """The first existing parent of ``path`` the OS user cannot enter, with its stat.

        None when this process is not root (the cluster then runs as this very
        user) or when the OS user can enter every parent that exists.
        """
        if os.geteuid() != 0:
            return None
        entry = self._os_user_entry()
        groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
        for directory in reversed(path.parents):
            try:
                st = directory.stat()
            except FileNotFoundError:
                return None  # made later by this process, with the umask's modes
            if entry.pw_uid == st.st_uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid in groups:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                return directory, st
        return None

    def _check_reachable(self, pgdata: Path) -> None:
        """Fail clearly when the OS user cannot reach the cluster's directory."""
        found = self._unreachable(pgdata)
        if found is None:
            return
        directory, st = found
        owner = pwd.getpwuid(st.st_uid).pw_name
        group = grp.getgrgid(st.st_gid).gr_name
        raise EmbeddedDatabaseError(
            f"the embedded database runs as the OS user {self.os_user!r}, which cannot "
            f"enter {directory} (mode {stat.S_IMODE(st.st_mode):04o}, {owner}:{group}): "
            f"choose a REVISIT_DATA_DIR outside it, or `chmod o+x {directory}`"
        )

    def _remove_tree(self, path: Path) -> None:
        shutil.rmtree(path)

    @contextlib.contextmanager
    def _transition_lock(self) -> Iterator[None]:
        """Serialise creation, start and stop between processes sharing the data directory."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 2 * self.start_timeout_s
        with (self.run_dir / "postgres.lock").open("ab") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedDatabaseError(
                            f"timed out waiting for another process to start or stop the "
                            f"embedded database ({self.run_dir / 'postgres.lock'})"
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
