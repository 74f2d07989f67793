"""revisit as a newcomer gets it: a clone under a private directory, and a wheel installed
into a fresh virtual environment, each run from where the user stands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from revisit.db.embedded import FALLBACK_ROOT, EmbeddedPostgres
from revisit.db.migrate import head_revision
from tests.conftest import REPO, make_tempdir
from tests.daemon.conftest import SMALL_WORLD, Daemon

# What the build leaves behind, or what is not the package's source.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def _service_env(cli_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**cli_env, **SMALL_WORLD, **extra}
    env.pop("REVISIT_DATA_DIR")  # the default, ./var, where the user stands
    env.pop("PYTHONPATH", None)
    return env


def _until_leading(daemon: Daemon) -> dict[str, object]:
    """The /readyz body once the service is ready and leads (schedules jobs)."""

    def ready() -> dict[str, object] | None:
        status, body = daemon.get("/readyz")
        found = json.loads(body) if status == 200 else None
        return found if found is not None and found["role"] == "leader" else None

    found: dict[str, object] = daemon.wait_for("a leader's 200 from /readyz", ready, timeout=180)
    return found


@pytest.fixture
def private_parent() -> Iterator[Path]:
    """A directory of mode 0700, as root's home /root is."""
    parent = Path(tempfile.mkdtemp(prefix="revisit-home-"))
    assert parent.stat().st_mode & 0o777 == 0o700
    yield parent
    subprocess.run(["rm", "-rf", str(parent)], check=False)


def test_a_clone_under_a_private_directory_runs(
    private_parent: Path, cli_env: dict[str, str], daemons: list[Daemon]
) -> None:
    # What the README's `make run` does after setup, from a clone in /root: the
    # embedded cluster cannot live under a directory the postgres user cannot enter.
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    clone = private_parent / "revisit"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    env = _service_env(cli_env)
    assert _imported_from(Path(sys.executable), clone, env).is_relative_to(clone)
    cluster = EmbeddedPostgres(clone / "var")
    try:
        daemon = Daemon(env, command=[sys.executable, "-m", "revisit"], cwd=clone)
        daemons.append(daemon)
        checks = _until_leading(daemon)["checks"]
        assert isinstance(checks, dict) and checks["database"] == "ok"
        if os.geteuid() == 0:
            link = clone / "var" / "postgres"
            assert link.is_symlink() and link.resolve().is_relative_to(FALLBACK_ROOT)
            assert (link.resolve().parent.stat().st_mode & 0o777) == 0o700
        daemon.stop()
        assert daemon.proc.returncode == 0, daemon.log_text()[-4000:]
    finally:
        cluster = EmbeddedPostgres(clone / "var")
        if cluster.is_running():
            cluster.stop()
        if cluster.relocated:
            subprocess.run(["rm", "-rf", str(cluster.pgdata.parent)], check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """revisit built as a wheel, from a copy of the source (the build writes beside it)."""
    source = tmp_path_factory.mktemp("source") / "revisit"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE, symlinks=True)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"),
            *("--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(source)),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("revisit-*.whl")
    return built


def _fresh_venv(root: Path, wheel: Path, *, reuse_dependencies: bool) -> Path:
    """A new virtual environment with ``wheel`` installed (not editable); returns its bin/."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    install.append("--disable-pip-version-check")
    if reuse_dependencies:
        # revisit's dependencies from this environment (torch alone is gigabytes),
        # after the fresh environment's own site-packages, so its revisit wins.
        # A path in a .pth file joins sys.path without its own .pth files running,
        # so this environment's editable revisit stays out.
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(purelib, "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
        install.append("--no-deps")
    subprocess.run([*install, str(wheel)], check=True)
    return venv / "bin"


def _imported_from(python: Path, cwd: Path, env: dict[str, str]) -> Path:
    """The file ``import revisit`` loads for ``python`` started in ``cwd``."""
    where = subprocess.run(
        [str(python), "-c", "import revisit; print(revisit.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(where.stdout.strip())


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """A directory that has nothing to do with the checkout, to run from."""
    path = make_tempdir("revisit-elsewhere-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _check_installed(
    bin_dir: Path, cwd: Path, database_url: str, cli_env: dict[str, str], daemons: list[Daemon]
) -> None:
    """The installation in ``bin_dir`` upgrades a database and runs, started in ``cwd``."""
    env = _service_env(cli_env, REVISIT_DATABASE_URL=database_url)
    where = _imported_from(bin_dir / "python", cwd, env)
    assert where.is_relative_to(bin_dir.parent), f"revisit imported from {where}"
    assert not where.is_relative_to(REPO)

    def revisit(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(bin_dir / "revisit"), *args], cwd=cwd, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    revisit("db", "upgrade")
    assert head_revision() in revisit("db", "current").stdout
    daemon = Daemon(env, command=[str(bin_dir / "revisit")], cwd=cwd)
    daemons.append(daemon)
    assert _until_leading(daemon)["checks"]["database"] == "ok"  # type: ignore[index]
    daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log_text()[-4000:]


def test_a_wheel_in_a_fresh_venv_upgrades_and_runs_from_any_directory(
    wheel: Path,
    fresh_database_url: str,
    cli_env: dict[str, str],
    daemons: list[Daemon],
    tmp_path: Path,
    elsewhere: Path,
) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(n.startswith("revisit/db/migrations/versions/") for n in names), names
    bin_dir = _fresh_venv(tmp_path, wheel, reuse_dependencies=True)
    _check_installed(bin_dir, elsewhere, fresh_database_url, cli_env, daemons)


@pytest.mark.slow
def test_a_wheel_with_all_its_dependencies_from_the_index(
    wheel: Path,
    fresh_database_url: str,
    cli_env: dict[str, str],
    daemons: list[Daemon],
    tmp_path: Path,
    elsewhere: Path,
) -> None:
    # The whole `pip install revisit-*.whl`: every dependency resolved afresh.
    bin_dir = _fresh_venv(tmp_path, wheel, reuse_dependencies=False)
    _check_installed(bin_dir, elsewhere, fresh_database_url, cli_env, daemons)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the cluster as another OS user")
def test_the_fallback_location_is_named_by_the_data_directory(private_parent: Path) -> None:
    # Two checkouts get two clusters; one checkout, wherever it is opened from, one.
    def digest(path: Path) -> str:
        return hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:12]

    fallback = private_parent / "fallback"
    one, two = private_parent / "one" / "var", private_parent / "two" / "var"
    first = EmbeddedPostgres(one, fallback_root=fallback)
    assert first.relocated and first.pgdata == fallback / digest(one) / "postgres"
    assert EmbeddedPostgres(two, fallback_root=fallback).pgdata.parent.name == digest(two)
    (private_parent / "one").mkdir()
    os.chdir(private_parent / "one")
    try:
        assert EmbeddedPostgres(Path("var"), fallback_root=fallback).pgdata == first.pgdata
    finally:
        os.chdir(REPO)
