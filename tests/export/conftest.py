"""A trained and published world for the export tests.

Once per session: a copy of the learner tests' ingested world is trained for
three steps (model versions at steps 2 and 3) and its first model version is
published. Every test then gets a copy of its own (:class:`ExportWorld`): a new
database cloned from it and a data directory whose files are hard links (the
exporter replaces files by rename and never writes into one, so the links
stay independent).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from revisit.config import Settings, load_settings
from revisit.db import learning
from revisit.db.embedded import EmbeddedPostgres
from revisit.export.publish import PublishedModel, publish_onnx
from revisit.learner.online import OnlineLearner
from tests.conftest import _create_database, _drop_database, make_tempdir, url_of
from tests.learner.conftest import LearnWorld, learn_world, learner_settings

__all__ = ["ExportWorld", "TrainedWorld", "export_world", "learn_world", "trained_world"]


@dataclass(frozen=True)
class TrainedWorld:
    """The session's trained world: a template database and its data directory.

    Attributes:
        template: The database, used as a template only.
        data_dir: Checkpoints, ``chips`` (a link to the world's chips), ``exports/onnx``.
        versions: The model versions, oldest first (steps 2 and 3).
        published: The first model version, published (``latest.json`` names it).
    """

    template: str
    data_dir: Path
    versions: tuple[learning.ModelVersionRow, ...]
    published: PublishedModel


@dataclass(frozen=True)
class ExportWorld:
    """A test's own copy of the trained world."""

    url: str
    engine: sa.Engine
    data_dir: Path
    trained: TrainedWorld

    def settings(self, **export: Any) -> Settings:
        """Settings on this copy, with ``export`` settings overridden.

        The dense model is not published unless asked for (``dense_model=True``):
        its export takes as long as the other two together.
        """
        export = {"dense_model": False, **export}
        return load_settings(database_url=self.url, data_dir=self.data_dir, export=export)


@pytest.fixture(scope="session")
def trained_world(pg_cluster: EmbeddedPostgres, learn_world: LearnWorld) -> Iterator[TrainedWorld]:
    name = f"exportworld_{uuid.uuid4().hex[:8]}"
    _create_database(pg_cluster, name, template=learn_world.template)
    root = make_tempdir("revisit-exportworld-")
    data_dir = root / "var"
    data_dir.mkdir()
    (data_dir / "chips").symlink_to(learn_world.chips)
    url = url_of(pg_cluster, name)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        settings = learner_settings(url, data_dir, checkpoint_every=2)
        with OnlineLearner(settings=settings, engine=engine) as learner:
            learner.run(3)
        with engine.connect() as conn:
            versions = tuple(learning.model_versions(conn))
        assert [v.step for v in versions] == [2, 3]
        published = publish_onnx(engine=engine, settings=settings, model_version_id=versions[0].id)
        engine.dispose()
        yield TrainedWorld(template=name, data_dir=data_dir, versions=versions, published=published)
    finally:
        engine.dispose()
        _drop_database(pg_cluster, name)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def export_world(
    pg_cluster: EmbeddedPostgres, trained_world: TrainedWorld, tmp_path: Path
) -> Iterator[ExportWorld]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    _create_database(pg_cluster, name, template=trained_world.template)
    data_dir = tmp_path / "var"
    shutil.copytree(trained_world.data_dir, data_dir, symlinks=True, copy_function=os.link)
    url = url_of(pg_cluster, name)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        yield ExportWorld(url=url, engine=engine, data_dir=data_dir, trained=trained_world)
    finally:
        engine.dispose()
        _drop_database(pg_cluster, name)
