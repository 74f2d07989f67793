"""Fixtures: a throwaway PostGIS cluster for the session, started by revisit's own code.

The session cluster is an :class:`EmbeddedPostgres` in a temporary directory,
exactly as ``revisit`` runs its embedded database. Tests get databases of their
own inside it: ``fresh_database_url`` (PostGIS only) or ``database_url``
(migrated to head, cloned from a template in a fraction of a second).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import hypothesis
import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from revisit.config import load_settings
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.engine import Database
from revisit.db.migrate import upgrade

# Under pytest-xdist (`make test`: two workers on a machine of about two cores), one
# OpenMP/BLAS thread per process unless a test asks for more: with more threads than
# cores, OpenMP's spinning workers slow the other worker's tests several-fold. Set
# before anything imports numpy or torch; the CLI's subprocesses inherit it.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
#: REVISIT_LEARNER__THREADS for the tests' learners: the cores this process may use.
TORCH_THREADS = "1" if XDIST_WORKER else "2"

# Reproducible on CI (the same examples every run), exploratory on a developer's machine.
hypothesis.settings.register_profile(
    "revisit", deadline=None, derandomize=bool(os.environ.get("CI")), print_blob=True
)
hypothesis.settings.load_profile("revisit")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: Exported ONNX graphs, kept for the whole run and shared by its xdist workers, so that
#: each architecture is traced once a run, not once a test (every test has a data directory
#: of its own, whose default cache would start empty) nor once a worker. The cache writes
#: by rename, so a worker sees a whole graph or none. The process that pytest started
#: names it (xdist's workers inherit the name) and removes it at the end. In-process
#: settings read it from the environment, the CLI's subprocesses from :func:`cli_env`.
#: tests/export/test_graphs.py checks the tracing path and the cache with directories of
#: its own.
_OWN_GRAPH_CACHE = "REVISIT_TEST_GRAPH_CACHE" not in os.environ
GRAPH_CACHE = Path(
    os.environ.setdefault(
        "REVISIT_TEST_GRAPH_CACHE",
        str(Path(tempfile.gettempdir()) / f"revisit-graphs-{os.getpid()}"),
    )
)
os.environ["REVISIT_EXPORT__GRAPH_CACHE_DIR"] = str(GRAPH_CACHE)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _OWN_GRAPH_CACHE:  # the controller (or a run without workers): the workers are done
        shutil.rmtree(GRAPH_CACHE, ignore_errors=True)


def load_bench(name: str) -> ModuleType:
    """A bench script by file: bench/ is not a package (and holds an onnx.py)."""
    key = f"_revisit_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


#: The files whose tests use the session's ingested learner world (``learn_world``, and
#: through it the export tests' trained world): one unit of work under ``make test``, so
#: that both worlds are made once a run, not once a worker. A file that uses the world and
#: is missing here is refused at collection.
SHARE_LEARN_WORLD = (
    "tests/export/test_export_child.py",
    "tests/export/test_onnx.py",
    "tests/export/test_publish.py",
    "tests/learner/test_cli_learn.py",
    "tests/learner/test_distributed.py",
    "tests/learner/test_late_commits.py",
    "tests/learner/test_online.py",
    "tests/learner/test_recipe.py",
)
LEARN_WORLD_UNIT = "learn-world"

#: The longest units of work (``make test --durations``: a minute or more each), started
#: first so that no worker is left running one of them alone at the end of the run.
RUN_FIRST = (
    *SHARE_LEARN_WORLD,
    "tests/reliability/test_kill.py",
    "tests/daemon/test_service.py",
    "tests/reliability/test_outage.py",
    "tests/daemon/test_learner_processes.py",
    "tests/export/test_pairmap.py",
    "tests/test_cli.py",
)


def _unit(path: str) -> str:
    """The unit of work of a test file: its own path, or the shared world's."""
    return LEARN_WORLD_UNIT if path.startswith(SHARE_LEARN_WORLD) else path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest test files first (a stable sort: the rest keep their order).

    Raises:
        pytest.UsageError: A test uses ``learn_world`` from a file not in SHARE_LEARN_WORLD.
    """
    strays = sorted(
        {
            path
            for item in items
            if "learn_world" in getattr(item, "fixturenames", ())
            and _unit(path := item.nodeid.split("::", 1)[0]) != LEARN_WORLD_UNIT
        }
    )
    if strays:
        raise pytest.UsageError(
            "these files use the learn_world fixture but are not in SHARE_LEARN_WORLD (tests/"
            f"conftest.py), which makes it once a run: {', '.join(strays)}"
        )

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return next((i for i, p in enumerate(RUN_FIRST) if path.startswith(p)), len(RUN_FIRST))

    items.sort(key=rank)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` (``make test``), with the learn-world files as one unit of work.

    A test file's tests stay on one worker, so its module fixtures are made once;
    the files of SHARE_LEARN_WORLD stay together, so their session fixtures, the
    ingested world and the trained and published world (about 15 + 40 s), are made
    once too. The units go out in collection order (RUN_FIRST first), not by xdist's
    default of the most tests first, which would leave the longest for the end.
    (xdist's own ``loadgroup`` marks do not take with pytest 9: it sets
    ``item._nodeid``, which pytest 9 no longer reads.)
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False

    class LearnWorldTogether(LoadFileScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0])

    return LearnWorldTogether(config, log)


TEMPLATE = "revisit_test_template"


def make_tempdir(prefix: str) -> Path:
    """A temporary directory the unprivileged PostgreSQL user can enter (mkdtemp makes 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[EmbeddedPostgres]:
    """The session's PostgreSQL/PostGIS cluster."""
    root = make_tempdir("revisit-test-")
    cluster = EmbeddedPostgres(root / "var")
    cluster.acquire()
    try:
        _without_durability(cluster)
        _create_database(cluster, TEMPLATE)
        engine = sa.create_engine(url_of(cluster, TEMPLATE), poolclass=sa.pool.NullPool)
        upgrade(engine)
        engine.dispose()
        yield cluster
    finally:
        cluster.release()
        shutil.rmtree(root, ignore_errors=True)


#: The session cluster's settings: no fsync (nor its waits) at commits, checkpoints and
#: CREATE DATABASE. Only a crash of the OS could lose what this gives up: a killed client,
#: backend or postmaster loses nothing, since every commit is still written to the kernel
#: before it returns. Every test makes a database of its own (about 0.2 s less each).
SESSION_CLUSTER_SETTINGS = {"fsync": "off", "full_page_writes": "off"}


def _without_durability(cluster: EmbeddedPostgres) -> None:
    with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
        for name, value in SESSION_CLUSTER_SETTINGS.items():
            conn.execute(
                sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
            )
        conn.execute("SELECT pg_reload_conf()")


def url_of(cluster: EmbeddedPostgres, dbname: str) -> str:
    """A SQLAlchemy URL of ``dbname`` in ``cluster``, as a string (it goes into settings)."""
    return cluster.sqlalchemy_url(dbname).render_as_string(hide_password=False)


def _create_database(cluster: EmbeddedPostgres, name: str, template: str | None = None) -> None:
    with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
    if template is None:
        with psycopg.connect(cluster.conninfo(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION postgis")


def _drop_database(cluster: EmbeddedPostgres, name: str) -> None:
    with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def fresh_database_url(pg_cluster: EmbeddedPostgres) -> Iterator[str]:
    """A new database with PostGIS and nothing else; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    _create_database(pg_cluster, name)
    yield url_of(pg_cluster, name)
    _drop_database(pg_cluster, name)


@contextlib.contextmanager
def migrated_database(cluster: EmbeddedPostgres) -> Iterator[str]:
    """The URL of a new database migrated to head, dropped on leaving."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    _create_database(cluster, name, template=TEMPLATE)
    try:
        yield url_of(cluster, name)
    finally:
        _drop_database(cluster, name)


@pytest.fixture
def database_url(pg_cluster: EmbeddedPostgres) -> Iterator[str]:
    """A new database migrated to head; dropped afterwards."""
    with migrated_database(pg_cluster) as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine on a migrated database of the test's own."""
    eng = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    yield eng
    eng.dispose()


@pytest.fixture
def db(database_url: str, tmp_path: Path) -> Iterator[Database]:
    """revisit's Database object, opened on a migrated database of the test's own."""
    database = Database(load_settings(database_url=database_url, data_dir=tmp_path / "var"))
    with database:
        yield database


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """An environment for running the ``revisit`` CLI in a subprocess, free of REVISIT_* leaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVISIT_")}
    env["REVISIT_DATA_DIR"] = str(tmp_path / "var")
    env["REVISIT_LOG_FORMAT"] = "json"
    env["REVISIT_EXPORT__GRAPH_CACHE_DIR"] = str(GRAPH_CACHE)
    # `revisit run` serves health and metrics: on a free port, never on one a service uses.
    env["REVISIT_DAEMON__HTTP_PORT"] = "0"
    return env
