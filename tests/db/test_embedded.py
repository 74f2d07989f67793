"""The embedded PostgreSQL cluster: created once, reused, shared, recovered after kill -9."""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from revisit.db.embedded import MAX_SOCKET_PATH, EmbeddedPostgres, find_bin_dir
from revisit.errors import EmbeddedDatabaseError, PostGISNotInstalledError
from tests.conftest import make_tempdir


@pytest.fixture
def data_dir() -> Iterator[Path]:
    root = make_tempdir("revisit-embedded-")
    yield root / "var"
    # Stop anything a failed test left running before removing its files.
    cluster = EmbeddedPostgres(root / "var")
    if cluster.is_running():
        cluster.stop()
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _query(cluster: EmbeddedPostgres, statement: str) -> object:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        cursor = conn.execute(statement)
        row = cursor.fetchone() if cursor.description else None
        return row[0] if row else None


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still alive")


def test_created_private_and_reused_across_restarts(data_dir: Path) -> None:
    cluster = EmbeddedPostgres(data_dir)
    with cluster:
        assert cluster.is_running()
        assert _query(cluster, "SHOW listen_addresses") == ""
        assert _query(cluster, "SELECT extname FROM pg_extension WHERE extname = 'postgis'")
        _query(cluster, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        assert stat.S_IMODE(cluster.pgdata.stat().st_mode) == 0o700
        if os.geteuid() == 0:
            assert cluster.pgdata.stat().st_uid == pwd.getpwnam("postgres").pw_uid
        created = (cluster.pgdata / "PG_VERSION").stat().st_mtime_ns
    assert not cluster.is_running()  # the last user out stopped it

    again = EmbeddedPostgres(data_dir)
    with again:
        assert _query(again, "SELECT x FROM kept") == 42
        assert (again.pgdata / "PG_VERSION").stat().st_mtime_ns == created
    assert not (data_dir / "postgres.init").exists()


def test_comes_back_after_its_postmaster_is_killed(data_dir: Path) -> None:
    cluster = EmbeddedPostgres(data_dir).acquire()
    _query(cluster, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    pid = cluster.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    assert (cluster.pgdata / "postmaster.pid").exists()  # stale
    assert not cluster.is_running()

    revived = EmbeddedPostgres(data_dir)
    assert revived.ensure_started() is True
    assert revived.postmaster_pid() not in (None, pid)
    assert _query(revived, "SELECT x FROM kept") == 7
    cluster.release()


def test_stale_pid_reused_by_another_program_is_ignored(data_dir: Path) -> None:
    cluster = EmbeddedPostgres(data_dir).acquire()
    pid = cluster.postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    # The PID in postmaster.pid now belongs to an unrelated, live process.
    impostor = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = cluster.pgdata / "postmaster.pid"
        lines = pid_file.read_text().split("\n")
        pid_file.write_text("\n".join([str(impostor.pid), *lines[1:]]))
        assert not cluster.is_running()
        assert cluster.ensure_started() is True
        assert _query(cluster, "SELECT 1") == 1
    finally:
        impostor.kill()
        impostor.wait()
        cluster.release()


def test_last_user_stops_it_unless_pinned(data_dir: Path) -> None:
    first = EmbeddedPostgres(data_dir).acquire()
    second = EmbeddedPostgres(data_dir).acquire()
    first.release()
    assert second.is_running()  # still in use
    with pytest.raises(EmbeddedDatabaseError, match="in use by another revisit process"):
        EmbeddedPostgres(data_dir).shutdown()
    second.release()
    assert not second.is_running()

    pinned = EmbeddedPostgres(data_dir)
    pinned.pin()
    pinned.acquire().release()
    assert pinned.is_running()
    pinned.shutdown()
    assert not pinned.is_running()
    assert not pinned.pinned


def test_concurrent_first_use_creates_once(data_dir: Path) -> None:
    clusters = [EmbeddedPostgres(data_dir) for _ in range(3)]
    errors: list[BaseException] = []

    def use(cluster: EmbeddedPostgres) -> None:
        try:
            cluster.acquire()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=use, args=(c,)) for c in clusters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert _query(clusters[0], "SELECT count(*) FROM pg_database WHERE datname = 'revisit'") == 1
    for cluster in clusters:
        cluster.release()
    assert not clusters[0].is_running()


def test_unfinished_creation_is_redone(data_dir: Path) -> None:
    leftover = data_dir / "postgres.init"
    leftover.mkdir(parents=True)
    (leftover / "PG_VERSION").write_text("15\n")  # half an initdb
    with EmbeddedPostgres(data_dir) as cluster:
        assert _query(cluster, "SELECT 1") == 1
    assert not leftover.exists()


def test_a_foreign_directory_is_never_overwritten(data_dir: Path) -> None:
    (data_dir / "postgres").mkdir(parents=True)
    (data_dir / "postgres" / "precious.txt").write_text("mine")
    with pytest.raises(EmbeddedDatabaseError, match="holds no PostgreSQL cluster"):
        EmbeddedPostgres(data_dir).acquire()
    assert (data_dir / "postgres" / "precious.txt").read_text() == "mine"


def test_socket_path_over_the_limit_is_refused(tmp_path: Path) -> None:
    deep = Path("/tmp") / ("d" * (MAX_SOCKET_PATH - 10))
    with pytest.raises(EmbeddedDatabaseError, match="shorter REVISIT_DATA_DIR"):
        EmbeddedPostgres(deep)


def test_missing_postgis_names_the_package(data_dir: Path, tmp_path: Path) -> None:
    """A PostgreSQL installation without PostGIS: the error says what to install."""
    real = find_bin_dir()
    fake = tmp_path / "lib" / "postgresql" / "15" / "bin"
    fake.mkdir(parents=True)
    for name in ("initdb", "pg_ctl", "postgres"):
        (fake / name).symlink_to(real / name)
    share = tmp_path / "share"
    (share / "extension").mkdir(parents=True)
    (fake / "pg_config").write_text(f"#!/bin/sh\necho {share}\n")
    (fake / "pg_config").chmod(0o755)
    with pytest.raises(PostGISNotInstalledError, match="apt-get install postgresql-15-postgis-3"):
        EmbeddedPostgres(data_dir, bin_dir=fake).acquire()
    assert not (data_dir / "postgres").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as another OS user")
def test_unreachable_data_dir_gets_a_private_cluster_elsewhere() -> None:
    # A checkout under /root (mode 0700): the postgres OS user cannot enter the
    # data directory, so the cluster lives under the fallback root, linked from it.
    private = make_tempdir("revisit-private-")
    private.chmod(0o700)
    fallback = make_tempdir("revisit-fallback-")
    data_dir = private / "checkout" / "var"
    postgres = pwd.getpwnam("postgres")
    try:
        cluster = EmbeddedPostgres(data_dir, fallback_root=fallback)
        assert cluster.relocated and cluster.pgdata.is_relative_to(fallback)
        with cluster:
            _query(cluster, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
            link = data_dir / "postgres"
            assert link.is_symlink() and link.resolve() == cluster.pgdata
            home = cluster.pgdata.parent
            assert stat.S_IMODE(home.stat().st_mode) == 0o700
            assert home.stat().st_uid == postgres.pw_uid
            assert cluster.socket_path.is_relative_to(home)  # the socket stays private
            assert _query(cluster, "SHOW unix_socket_permissions") == "0700"
        assert not cluster.is_running()

        # The next process finds it through the link, data and all.
        again = EmbeddedPostgres(data_dir, fallback_root=fallback)
        assert again.pgdata == cluster.pgdata
        with again:
            assert _query(again, "SELECT x FROM kept") == 7

        # The data directory deleted: its cluster is an orphan, removed, not adopted.
        subprocess.run(["rm", "-rf", str(data_dir)], check=True)
        fresh = EmbeddedPostgres(data_dir, fallback_root=fallback)
        assert fresh.pgdata == cluster.pgdata
        with fresh:
            assert _query(fresh, "SELECT to_regclass('kept')") is None

        # A kill between making the link and moving the cluster in leaves a dangling link.
        subprocess.run(["rm", "-rf", str(fresh.pgdata.parent)], check=True)
        dangling = EmbeddedPostgres(data_dir, fallback_root=fallback)
        with dangling:
            assert _query(dangling, "SELECT 1") == 1
    finally:
        for root in (private, fallback):
            leftover = EmbeddedPostgres(data_dir, fallback_root=fallback)
            if leftover.is_running():
                leftover.stop()
            subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as another OS user")
def test_an_existing_cluster_made_unreachable_is_explained(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir):
        pass
    data_dir.parent.chmod(0o700)
    try:
        with pytest.raises(EmbeddedDatabaseError, match="cannot enter"):
            EmbeddedPostgres(data_dir).acquire()
    finally:
        data_dir.parent.chmod(0o755)
