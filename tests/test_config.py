"""Settings: environment, TOML file, validation in one line, secrets kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from revisit.config import Settings, load_settings, redact_url
from revisit.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("REVISIT_"):
            monkeypatch.delenv(key)


def test_defaults_are_embedded_in_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.embedded
    assert settings.data_dir == tmp_path / "var"
    assert settings.postgres.port == 5432


def test_environment_with_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVISIT_DATA_DIR", "/srv/revisit")
    monkeypatch.setenv("REVISIT_POSTGRES__PORT", "6543")
    monkeypatch.setenv("REVISIT_DATABASE_URL", "postgresql://u:pw@db.example:5432/revisit")
    settings = load_settings()
    assert settings.data_dir == Path("/srv/revisit")
    assert settings.postgres.port == 6543
    assert not settings.embedded


def test_toml_file_and_environment_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "revisit.toml"
    config.write_text(
        'data_dir = "/data/revisit"\nlog_level = "DEBUG"\n\n[postgres]\nport = 7000\n'
    )
    monkeypatch.setenv("REVISIT_LOG_LEVEL", "WARNING")
    settings = load_settings(config)
    assert settings.data_dir == Path("/data/revisit")
    assert settings.postgres.port == 7000
    assert settings.log_level == "WARNING"  # the environment wins over the file


def _one_line_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVISIT_POSTGRES__PORT", "70000")
    message = _one_line_error()
    assert "postgres.port" in message
    assert "REVISIT_POSTGRES__PORT" in message
    assert "65535" in message


def test_bad_toml_value_and_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('log_level = "LOUD"\nsurprise = 1\n')
    message = _one_line_error(config_file=config)
    assert "log_level" in message and "LOUD" in message
    assert "unknown setting surprise" in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    assert "no such file" in _one_line_error(config_file=tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("data_dir = [unclosed\n")
    assert "not valid TOML" in _one_line_error(config_file=broken)


def test_database_url_must_be_postgres_and_is_never_echoed() -> None:
    message = _one_line_error(database_url="mysql://root:hunter2@db/x")
    assert "database_url" in message and "PostgreSQL URL" in message
    assert "hunter2" not in message


def test_secrets_do_not_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVISIT_DATABASE_URL", "postgresql://u:hunter2@db/x")
    monkeypatch.setenv("REVISIT_SENTINELHUB__CLIENT_SECRET", "s3cr3t")
    settings = load_settings()
    assert "hunter2" not in repr(settings) and "s3cr3t" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:hunter2@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        (
            "postgresql://db/x?password=hunter2&sslmode=require",
            "postgresql://db/x?password=***&sslmode=require",
        ),
        ("postgresql+psycopg://u:p%40ss@db/x", "postgresql+psycopg://u:***@db/x"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_every_setting_is_documented_in_docs_configuration() -> None:
    from pydantic import BaseModel

    readme = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text(
        encoding="utf-8"
    )
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    missing = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            env_prefix = f"REVISIT_{name.upper()}__"
            section_rows = [row for row in rows if row.startswith(f"| `{name}.")]
            for sub in section.model_fields:
                env = sub.upper()
                if not any(
                    f"{env_prefix}{env}`" in row or f"…__{env}`" in row for row in section_rows
                ):
                    missing.append(f"{name}.{sub}")
        elif not any(f"REVISIT_{name.upper()}`" in row for row in rows):
            missing.append(name)
    assert missing == [], f"settings missing from docs/configuration.md's table: {missing}"
