"""A chip store on a filesystem that fills: ingest stops clearly, loses nothing, resumes.

The test mounts a 1 MiB tmpfs as ``<data_dir>/chips`` (it needs root with
CAP_SYS_ADMIN, as CI has; elsewhere it skips and says why), runs ``revisit
ingest`` as a user would until the disk is full, checks the database against
the chip store, grows the filesystem, runs again, and compares the result with
the same ingest into an unlimited chip store and a database of its own.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from shapely.geometry import box

from revisit.db import aois, cursors
from revisit.db.embedded import EmbeddedPostgres
from revisit.db.locations import insert_locations
from revisit.ingest.chips import TMP_SUFFIX, ChipStore
from tests.conftest import migrated_database
from tests.test_cli import revisit

# A 0.05° square in the simulated world's first tile; 12 locations 32 px wide.
AREA = box(8.50, 47.30, 8.55, 47.35)
POINTS = [(8.502 + 0.015 * (i % 4), 47.302 + 0.015 * (i // 4)) for i in range(12)]
SPAN = ("--since", "2023-06-01", "--until", "2023-07-15")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``<tmp>/var/chips``, unmounted afterwards."""
    mount = tmp_path / "var" / "chips"
    mount.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: the full-disk test mounts a small tmpfs")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(
            "cannot mount a tmpfs here (the full-disk test needs root with CAP_SYS_ADMIN): "
            + made.stderr.strip()
        )
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def reference_url(pg_cluster: EmbeddedPostgres) -> Iterator[str]:
    """A second migrated database, for the same ingest with room to spare."""
    with migrated_database(pg_cluster) as url:
        yield url


def _setup(url: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            aoi = aois.create_aoi(conn, name="lake", geom=AREA)
            insert_locations(conn, POINTS, origin="manual", aoi_id=aoi.id, chip_size=32)
    finally:
        engine.dispose()


def _ingest(env: dict[str, str], url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return revisit(
        "ingest",
        "--source",
        "simulated",
        "--aoi",
        "lake",
        *SPAN,
        env={**env, "REVISIT_DATABASE_URL": url, "REVISIT_INGEST__CHIP_SIZE": "32", **extra},
    )


def _state(url: str) -> dict[str, object]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            observations = conn.execute(
                sa.text(
                    "SELECT s.product_id, ST_AsText(l.geom) AS at, o.chip_key, o.chip_sha256,"
                    " o.id FROM observation o JOIN scene s ON s.id = o.scene_id"
                    " JOIN location l ON l.id = o.location_id"
                )
            ).all()
            aoi_id = conn.execute(sa.text("SELECT id FROM aoi WHERE name = 'lake'")).scalar_one()
            return {
                "observations": observations,
                "chips": {(r.product_id, r.at): r.chip_sha256 for r in observations},
                "scenes": dict(
                    conn.execute(sa.text("SELECT product_id, acquired_at FROM scene")).all()
                ),
                "quarantine": sorted(
                    conn.execute(sa.text("SELECT ref, location_id, reason FROM quarantine")).all()
                ),
                "cursor": cursors.get_cursor(conn, source="simulated", aoi_id=aoi_id),
            }
    finally:
        engine.dispose()


def _consistent(state: dict[str, object], store: ChipStore) -> None:
    """Every row's chip is whole, no temporary is left, the cursor is at the last scene."""
    rows = state["observations"]
    assert isinstance(rows, list)
    checked, bad = store.verify((r.id, r.chip_key, r.chip_sha256) for r in rows)
    assert checked == len(rows) and not bad, bad
    assert not [p for p in store.root.rglob(f"*{TMP_SUFFIX}")]
    scenes = state["scenes"]
    assert isinstance(scenes, dict)
    assert state["cursor"] == max(scenes.values(), default=None)


def test_a_full_chip_store_stops_ingest_and_it_resumes_once_space_returns(
    small_fs: Path,
    tmp_path: Path,
    cli_env: dict[str, str],
    database_url: str,
    reference_url: str,
) -> None:
    _setup(reference_url)
    reference_env = {**cli_env, "REVISIT_DATA_DIR": str(tmp_path / "reference")}
    done = _ingest(reference_env, reference_url)
    assert done.returncode == 0, done.stderr
    reference = _state(reference_url)
    assert len(reference["chips"]) > 60  # type: ignore[arg-type]  # > 1 MiB of chips

    _setup(database_url)
    store = ChipStore(small_fs)

    # 1. The disk fills mid-scene: a clear error, exit status 1, nothing half-written.
    full = _ingest(cli_env, database_url, REVISIT_INGEST__MIN_FREE_MB="0")
    assert full.returncode == 1, full.stdout + full.stderr
    assert "interrupted: no space left for chips under" in " ".join(full.stdout.split())
    assert "No space left on device" in full.stdout
    first = _state(database_url)
    assert 0 < len(first["chips"]) < len(reference["chips"])  # type: ignore[arg-type]
    _consistent(first, store)
    assert first["quarantine"] == [
        q
        for q in reference["quarantine"]
        if q[0] in first["scenes"]  # type: ignore[attr-defined]
    ]  # the full disk quarantined nothing
    assert shutil.disk_usage(small_fs).free < 64 * 1024

    # 2. With the default floor (ingest.min_free_mb), the next scene is not even started.
    files = sorted(store.root.rglob("*"))
    guarded = _ingest(cli_env, database_url)
    assert guarded.returncode == 1
    assert "MB free under" in guarded.stdout and "ingest.min_free_mb" in guarded.stdout
    assert sorted(store.root.rglob("*")) == files
    assert _state(database_url)["chips"] == first["chips"]

    # 3. Space returns: the next run resumes at the scene it stopped at and loses nothing.
    grown = subprocess.run(
        ["mount", "-o", "remount,size=16m", str(small_fs)], capture_output=True, text=True
    )
    assert grown.returncode == 0, grown.stderr
    resumed = _ingest(cli_env, database_url, REVISIT_INGEST__MIN_FREE_MB="0")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final = _state(database_url)
    _consistent(final, store)
    assert final["chips"] == reference["chips"]
    assert final["quarantine"] == reference["quarantine"]
    assert final["cursor"] == reference["cursor"]
