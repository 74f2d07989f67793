"""Real Sentinel-2 imagery through revisit's own command line: what the benches share.

A :class:`Workspace` is a revisit data directory, the TOML file of settings
every command is given (``revisit --config FILE ...``), and the embedded
PostGIS cluster inside it. From ``with`` to its end the cluster is held up, so
the commands share one running server, and released at the end (also on an
error or Ctrl-C), which stops it: revisit stops its cluster when the last
process using it lets go.

The commands are the ones a user types, each in its own process:

    revisit --config FILE db upgrade
    revisit --config FILE aoi add NAME --footprint PRODUCT     (or --geojson FILE)
    revisit --config FILE sample --aoi NAME --grid [--spacing M]
    revisit --config FILE ingest --source local --path DIR [--since DATE]
    revisit --config FILE learn [--minutes M] [--steps N] [--method M] [--new-model]
    revisit --config FILE export onnx

When revisit runs as root the cluster runs as the OS user ``postgres``, which
must be able to enter every folder above the data directory: a folder made by
``tempfile.mkdtemp`` is 0700, so :func:`make_tempdir` opens it to 0755.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REVISIT = [sys.executable, "-m", "revisit.cli"]

#: Mining windows for two dates weeks to years apart, as in OSCD: the older date is a
#: long-term key of the newer one at any gap over 30 days, in any season (182 is the widest
#: day-of-year window the mining policy takes). See docs/learning-from-your-imagery.md.
TWO_DATE_LEARNER: dict[str, Any] = {"long_min_days": 30, "doy_window_days": 182}

#: How long a command may take to end after it was asked to stop (learn checkpoints first).
STOP_TIMEOUT_S = 120.0


def make_tempdir(prefix: str) -> Path:
    """A temporary directory the unprivileged PostgreSQL user can enter (mkdtemp makes 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def drop_revisit_environment() -> list[str]:
    """Remove ``REVISIT_*`` variables from this process's environment, so the TOML file rules.

    Returns:
        The names removed.
    """
    names = sorted(k for k in os.environ if k.startswith("REVISIT_"))
    for name in names:
        del os.environ[name]
    return names


def read_toml(path: Path) -> dict[str, Any]:
    """The settings of a TOML file, or a SystemExit naming the file."""
    import tomllib

    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"config {path}: {exc}") from None


def merge_settings(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` on top, section by section (``[learner]`` keys merge)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no TOML form revisit reads")
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as TOML")


def write_toml(path: Path, settings: Mapping[str, Any], *, header: str = "") -> None:
    """Write settings (top-level keys and one level of ``[sections]``) as TOML, atomically."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    tables = {k: v for k, v in settings.items() if isinstance(v, Mapping)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[{name}]"]
        for key, value in table.items():
            if isinstance(value, Mapping):
                raise ValueError(f"[{name}.{key}]: nested tables are not written")
            lines.append(f"{key} = {_toml_value(value)}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The rows of the rich tables a command printed, by column name (one table at most)."""
    lines = [line for line in stdout.splitlines() if "┃" in line or "│" in line]
    if not lines:
        return []
    header = [cell.strip() for cell in re.split("[┃│]", lines[0])]
    return [
        dict(zip(header, (cell.strip() for cell in re.split("[┃│]", line)), strict=True))
        for line in lines[1:]
    ]


class CommandFailed(SystemExit):
    """A revisit command ended with a non-zero status; its message names the command."""


@dataclass(frozen=True)
class IngestFigures:
    """What one ``revisit ingest`` printed, and how long it took from start to exit."""

    scenes: int
    chips: int
    skipped: int
    quarantined: int
    seconds: float
    wall_s: float


@dataclass(frozen=True)
class LearnFigures:
    """What one ``revisit learn`` printed in its summary table."""

    method: str
    steps: int
    last_step: int
    mean_loss: float
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class ProductChips:
    """Chips (observations) of one product in the database, and how many the learner mines."""

    product_id: str
    chips: int
    minable: int


class Workspace:
    """A revisit data directory driven through the ``revisit`` command line.

    Args:
        data_dir: revisit's data directory (made if missing).
        settings: Settings for the TOML file, besides ``data_dir`` (which is
            always ``data_dir``); None: use the file that is there.
        config_name: The TOML file's name inside ``data_dir``.
        header: Comment lines for the top of the TOML file.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        settings: Mapping[str, Any] | None = None,
        config_name: str = "revisit.toml",
        header: str = "",
    ) -> None:
        self.data_dir = data_dir.expanduser().absolute()
        self.config = self.data_dir / config_name
        self._initial = settings
        self._header = header
        self._db: Any = None  # a revisit.db.engine.Database while open

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Workspace:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o755)  # the cluster's OS user must enter it
        if self._initial is not None:
            self.configure(self._initial)
        elif not self.config.is_file():
            raise SystemExit(f"{self.config}: no such file (nothing to retrain on)")
        from revisit.db.engine import Database
        from revisit.errors import RevisitError

        try:
            db = Database(self.load_settings())
            db.open()
        except RevisitError as exc:
            raise SystemExit(f"{self.data_dir}: {exc}") from None
        self._db = db
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._db is not None:
            self._db.close()  # the last user out stops the embedded cluster
            self._db = None

    def configure(self, settings: Mapping[str, Any]) -> None:
        """(Re)write the TOML file; the commands run after this read the new one."""
        write_toml(self.config, {"data_dir": str(self.data_dir), **settings}, header=self._header)
        self.load_settings()  # a bad value stops here, with revisit's one-line message

    def load_settings(self) -> Any:
        """The :class:`revisit.config.Settings` of the TOML file."""
        from revisit.config import load_settings
        from revisit.errors import ConfigError

        try:
            return load_settings(self.config)
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None

    @property
    def engine(self) -> Any:
        """A SQLAlchemy engine on the workspace's database (for the report's queries)."""
        if self._db is None:
            raise RuntimeError("the workspace is not open")
        return self._db.engine

    # -- commands -------------------------------------------------------------------------

    def revisit(self, *args: str, echo: bool = True) -> str:
        """Run ``revisit --config FILE ARGS...``; return its standard output.

        Standard error (progress bars, logs) goes to this process's. If this
        process is interrupted, the command gets SIGINT (Ctrl-C reaches it on its
        own) and up to :data:`STOP_TIMEOUT_S` to end, so ``learn`` checkpoints.

        Raises:
            CommandFailed: The command's exit status was not 0.
        """
        argv = [*REVISIT, "--config", str(self.config), *args]
        if echo:
            print(f"$ revisit --config {self.config} {' '.join(args)}", flush=True)
        env = dict(os.environ, COLUMNS="200")  # one line per table row
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        lines: list[str] = []
        try:
            for line in proc.stdout or ():
                lines.append(line)
                if echo:
                    print(f"  {line}", end="", flush=True)
            status = proc.wait()
        except BaseException as exc:
            rest = _stop(proc, interrupted=isinstance(exc, KeyboardInterrupt))
            if echo:
                print("".join(f"  {line}\n" for line in rest.splitlines()), end="", flush=True)
            raise
        if status != 0:
            raise CommandFailed(f"revisit {' '.join(args[:2])} failed with exit status {status}")
        return "".join(lines)

    def upgrade(self) -> None:
        """``revisit db upgrade``: the schema, before the first ``aoi add``."""
        self.revisit("db", "upgrade")

    def aoi_names(self) -> set[str]:
        from revisit.db.aois import list_aois

        with self.engine.connect() as conn:
            return {aoi.name for aoi in list_aois(conn)}

    def add_area(
        self,
        name: str,
        product: Path,
        *,
        spacing_m: float | None = None,
        inset_m: float = 0.0,
    ) -> int:
        """An AOI of a product's footprint and a grid of locations in it.

        ``revisit aoi add NAME --footprint PRODUCT`` (skipped when the AOI exists),
        then ``revisit sample --aoi NAME --grid`` (adds only missing points).

        Args:
            name: The AOI's name.
            product: A Sentinel-2 product (SAFE, band folder, GeoTIFF).
            spacing_m: Grid spacing; None: one chip width.
            inset_m: Shrink the footprint by this much first (written as GeoJSON,
                added with ``--geojson``), so that chips lie inside the image.

        Returns:
            Locations added.
        """
        if name not in self.aoi_names():
            if inset_m > 0:
                self.revisit(
                    "aoi", "add", name, "--geojson", str(self._inset(name, product, inset_m))
                )
            else:
                self.revisit("aoi", "add", name, "--footprint", str(product))
        args = ["sample", "--aoi", name, "--grid"]
        if spacing_m is not None:
            args += ["--spacing", f"{spacing_m:g}"]
        out = self.revisit(*args)
        match = re.search(r"added (\d+) locations", out)
        if match is None:
            raise SystemExit(f"revisit sample printed no count: {out!r}")
        return int(match.group(1))

    def _inset(self, name: str, product: Path, inset_m: float) -> Path:
        from shapely.geometry import mapping

        from revisit.ingest.sources.local import product_footprint

        area = product_footprint(product).buffer(-inset_m / 111_000)  # metres to degrees, roughly
        path = self.data_dir / f"aoi-{name}.geojson"
        path.write_text(
            json.dumps({"type": "Feature", "properties": {}, "geometry": mapping(area)})
        )
        return path

    def ingest(self, path: Path, *, since: str | None = None) -> IngestFigures:
        """``revisit ingest --source local --path PATH [--since DATE]`` for every location."""
        args = ["ingest", "--source", "local", "--path", str(path)]
        if since is not None:
            args += ["--since", since]
        began = time.perf_counter()
        out = self.revisit(*args)
        wall_s = time.perf_counter() - began
        row = _one_row(out, "ingest")
        return IngestFigures(
            scenes=int(row["scenes"]),
            chips=int(row["chips"]),
            skipped=int(row["skipped"]),
            quarantined=int(row["quarantined"]),
            seconds=float(row["seconds"]),
            wall_s=wall_s,
        )

    def learn(
        self,
        *,
        minutes: float | None = None,
        steps: int | None = None,
        method: str | None = None,
        new_model: bool = False,
    ) -> LearnFigures:
        """``revisit learn [--minutes M] [--steps N] [--method M] [--new-model]``."""
        args = ["learn"]
        if minutes is not None:
            args += ["--minutes", f"{minutes:g}"]
        if steps is not None:
            args += ["--steps", str(steps)]
        if method is not None:
            args += ["--method", method]
        if new_model:
            args.append("--new-model")
        out = self.revisit(*args)
        row = _one_row(out, "learn")
        took = re.search(r"^(\d+) steps of (\d+) locations in ([\d.]+) s$", out, re.MULTILINE)
        if took is None:
            raise SystemExit("revisit learn printed no 'N steps of B locations in S s' line")
        return LearnFigures(
            method=row["method"],
            steps=int(row["steps"]),
            last_step=int(row["last step"]),
            mean_loss=float(row["mean loss"]),
            seconds=float(took.group(3)),
            images_per_s=float(row["images/s"]),
        )

    def export_onnx(self) -> dict[str, Path]:
        """``revisit export onnx``; the published models by output (features, embedding)."""
        from revisit.export.publish import export_dir, read_manifest

        self.revisit("export", "onnx")
        manifest = read_manifest(self.data_dir)
        if manifest is None:
            raise SystemExit(f"revisit export onnx left no manifest under {self.data_dir}")
        return {
            output: export_dir(self.data_dir) / str(name)
            for output, name in manifest["files"].items()
        }

    # -- figures --------------------------------------------------------------------------

    def chips_by_product(self) -> list[ProductChips]:
        """Observations per product, and those the learner's quality filters let it mine."""
        import sqlalchemy as sa

        learner = self.load_settings().learner
        query = sa.text(
            "SELECT s.product_id, count(*), count(*) FILTER ("
            " WHERE o.valid_fraction >= :valid AND o.cloud_fraction <= :cloud)"
            " FROM observation o JOIN scene s ON s.id = o.scene_id"
            " GROUP BY s.product_id ORDER BY s.product_id"
        )
        params = {"valid": learner.min_valid_fraction, "cloud": learner.max_cloud_fraction}
        with self.engine.connect() as conn:
            return [ProductChips(str(p), int(n), int(m)) for p, n, m in conn.execute(query, params)]

    def locations(self) -> int:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM location")).scalar_one())


def _one_row(stdout: str, command: str) -> dict[str, str]:
    rows = table_rows(stdout)
    if len(rows) != 1:
        raise SystemExit(f"revisit {command} printed {len(rows)} summary rows, expected 1")
    return rows[0]


def _stop(proc: subprocess.Popen[str], *, interrupted: bool) -> str:
    """End a command this process stops waiting for, gently first, within a bounded time.

    Returns:
        The rest of its standard output.
    """
    if proc.poll() is None and not interrupted:  # Ctrl-C reaches the whole process group
        proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=STOP_TIMEOUT_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        rest, _ = proc.communicate()
    return rest or ""


def sigterm_as_exit() -> None:
    """Let SIGTERM unwind like Ctrl-C (``finally`` blocks run, the database stops)."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
