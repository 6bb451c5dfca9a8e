"""Settings: defaults, env / file / override precedence, validation, frozenness and the README table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr, ValidationError

from stream_sentiment.config import (
    AdminSettings,
    AggregationSettings,
    BatchingSettings,
    EngineSettings,
    Settings,
    settings_table,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No STREAM_SENTIMENT_* variable of the developer's shell may reach a test (any case: lookup is
    case-insensitive); monkeypatch restores them, and whatever a test sets, afterwards."""
    for name in list(os.environ):
        if name.upper().startswith("STREAM_SENTIMENT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Top-level scalars, then one [table] per dict: all these tests need, and JSON values are valid TOML."""
    scalars = [f"{key} = {json.dumps(value)}" for key, value in data.items() if not isinstance(value, dict)]
    tables = [
        f"[{key}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
        for key, value in data.items()
        if isinstance(value, dict)
    ]
    path.write_text("\n".join(scalars) + "\n\n" + "\n\n".join(tables) + "\n", encoding="utf-8")
    return path


def write_config(tmp_path: Path, suffix: str, data: dict[str, Any]) -> Path:
    path = tmp_path / f"config{suffix}"
    if suffix == ".toml":
        return write_toml(path, data)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_defaults() -> None:
    s = Settings.load()
    assert s == Settings()
    assert (s.bootstrap_servers, s.topic, s.consumer_group) == ("127.0.0.1:9092", "posts", "stream-sentiment")
    assert s.dlq_topic is None and s.dead_letter_topic == "posts.dlq"
    assert (s.redis_url, s.redis_prefix) == ("redis://127.0.0.1:6379/0", "ss")
    assert s.engine == EngineSettings(
        repository=Path("engines"), model="minilm-sentiment", version="v1", backend="onnxruntime", streams=1
    )
    assert s.engine.threads_per_stream is None
    assert (s.batching.window_ms, s.batching.timeout_ms, s.batching.max_rows) == (50, 20, 64)
    assert (s.batching.max_tokens, s.batching.max_in_flight_posts) == (8192, 10000)
    assert (s.limits.max_message_bytes, s.limits.max_text_chars) == (65536, 5000)
    assert (s.limits.max_id_chars, s.limits.max_field_chars) == (256, 128)
    assert s.aggregation.bucket_seconds == 10 and s.aggregation.windows_seconds == (60, 300, 900)
    assert s.aggregation.allowed_lateness_seconds == 60 and s.aggregation.bucket_ttl_seconds == 3600
    assert s.aggregation.dimensions == ("global", "topic", "region", "lang")
    assert s.default_language == "en"
    a = s.alerts
    assert (a.ratio_threshold, a.min_posts, a.surge_z, a.ewma_alpha) == (0.6, 50, 3.0, 0.1)
    assert (a.cooldown_seconds, a.stream_max_len, a.sample_posts) == (300, 10000, 3)
    assert (s.admin.host, s.admin.port, s.admin.token, s.admin.token_file) == ("127.0.0.1", 8081, None, None)
    assert s.admin.max_body_bytes == 4096 and s.admin.read_token() is None
    assert (s.metrics_port, s.commit_timeout_s, s.shutdown_timeout_s) == (None, 5.0, 10.0)


@pytest.mark.parametrize(
    ("variable", "value", "attribute"),
    [
        ("STREAM_SENTIMENT_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092", "bootstrap_servers"),
        ("STREAM_SENTIMENT_TOPIC", "tweets", "topic"),
        ("STREAM_SENTIMENT_REDIS_URL", "rediss://cache.internal:6380/2", "redis_url"),
        ("STREAM_SENTIMENT_REDIS_PREFIX", "prod:ss", "redis_prefix"),
        ("STREAM_SENTIMENT_CONSUMER_GROUP", "replica-group", "consumer_group"),
        ("STREAM_SENTIMENT_DLQ_TOPIC", "rejected", "dlq_topic"),
    ],
)
def test_top_level_env_names(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, attribute: str) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(Settings.load(), attribute) == value


def test_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_SENTIMENT_BATCHING__WINDOW_MS", "10")
    monkeypatch.setenv("STREAM_SENTIMENT_BATCHING__TIMEOUT_MS", "5")
    monkeypatch.setenv("STREAM_SENTIMENT_ENGINE__BACKEND", "tensorrt")
    monkeypatch.setenv("STREAM_SENTIMENT_AGGREGATION__WINDOWS_SECONDS", "[300, 60]")
    monkeypatch.setenv("STREAM_SENTIMENT_ADMIN__TOKEN", "s3cret")
    monkeypatch.setenv("STREAM_SENTIMENT_METRICS_PORT", "9100")
    s = Settings.load()
    assert (s.batching.window_ms, s.batching.timeout_ms, s.batching.max_rows) == (10.0, 5.0, 64)
    assert s.engine.backend == "tensorrt"
    assert s.aggregation.windows_seconds == (60, 300)  # kept sorted
    assert isinstance(s.admin.token, SecretStr) and s.admin.read_token() == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)
    assert s.metrics_port == 9100


def test_unknown_nested_env_key_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_SENTIMENT_BATCHING__WINDOW_SIZE", "10")
    with pytest.raises(ValidationError, match=r"batching\.window_size"):
        Settings.load()


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_precedence_file_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suffix: str) -> None:
    config = write_config(tmp_path, suffix, {
        "topic": "file-topic", "redis_prefix": "file", "consumer_group": "file-group",
        "batching": {"window_ms": 30, "max_rows": 32},
        "aggregation": {"windows_seconds": [60, 120], "dimensions": ["global"]},
    })  # fmt: skip
    monkeypatch.setenv("STREAM_SENTIMENT_TOPIC", "env-topic")
    monkeypatch.setenv("STREAM_SENTIMENT_REDIS_PREFIX", "env")
    monkeypatch.setenv("STREAM_SENTIMENT_BATCHING__WINDOW_MS", "40")

    s = Settings.load(config, topic="cli-topic", batching={"timeout_ms": 5}, bootstrap_servers=None)
    assert s.topic == "cli-topic"  # override > env > file
    assert s.redis_prefix == "env"  # env > file
    assert s.consumer_group == "file-group"  # file > default
    assert s.bootstrap_servers == "127.0.0.1:9092"  # a None override means "not given"
    # Groups merge key by key across the sources.
    assert (s.batching.window_ms, s.batching.max_rows, s.batching.timeout_ms) == (40, 32, 5)
    assert s.batching.max_tokens == 8192
    assert s.aggregation.windows_seconds == (60, 120) and s.aggregation.dimensions == ("global",)

    assert Settings.load(config).topic == "env-topic"
    monkeypatch.delenv("STREAM_SENTIMENT_TOPIC")
    assert Settings.load(config).topic == "file-topic"
    # The file belongs to that one load call only.
    assert Settings.load().consumer_group == Settings().consumer_group == "stream-sentiment"


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"topic": "t", "bogus_key": 1}, "bogus_key"),
        ({"batching": {"window_ms": 30, "widow_ms": 1}}, "batching.widow_ms"),
    ],
)
def test_unknown_file_key_is_an_error(tmp_path: Path, suffix: str, data: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named.replace(".", r"\.")) as caught:
        Settings.load(write_config(tmp_path, suffix, data))
    assert caught.value.errors()[0]["type"] == "extra_forbidden"


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        Settings.load(tmp_path / "config.yaml")
    with pytest.raises(FileNotFoundError, match=r"missing\.toml"):
        Settings.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("topic = \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.toml"):
        Settings.load(broken)
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"listed\.json.*top level"):
        Settings.load(listed)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batching": {"window_ms": 10, "timeout_ms": 20}}, "timeout_ms"),
        ({"batching": {"timeout_ms": -1}}, "timeout_ms"),
        ({"batching": {"max_tokens": 255}}, "max_tokens"),
        ({"batching": {"max_rows": 64, "max_in_flight_posts": 10}}, "max_in_flight_posts"),
        ({"engine": {"version": "../../etc"}}, "version"),
        ({"engine": {"version": ".."}}, "version"),
        ({"engine": {"version": "v1/plans"}}, "version"),
        ({"engine": {"model": "/etc/passwd"}}, "model"),
        ({"engine": {"backend": "tflite"}}, "backend"),
        ({"engine": {"streams": 0}}, "streams"),
        ({"redis_prefix": "bad prefix"}, "redis_prefix"),
        ({"redis_prefix": ""}, "redis_prefix"),
        ({"redis_prefix": "x" * 65}, "redis_prefix"),
        ({"redis_prefix": "ss{x}"}, "redis_prefix"),
        ({"redis_url": "http://127.0.0.1:6379"}, "redis_url"),
        ({"topic": "has space"}, "topic"),
        ({"topic": "posts", "dlq_topic": "posts"}, "dlq_topic"),
        ({"aggregation": {"windows_seconds": [60, 305]}}, "not multiples"),
        ({"aggregation": {"windows_seconds": [60, 60]}}, "duplicates"),
        ({"aggregation": {"windows_seconds": []}}, "windows_seconds"),
        ({"aggregation": {"dimensions": ["global", "city"]}}, "dimensions"),
        ({"aggregation": {"bucket_ttl_seconds": 900}}, "bucket_ttl_seconds"),
        ({"alerts": {"ratio_threshold": 1.5}}, "ratio_threshold"),
        ({"alerts": {"ewma_alpha": 0}}, "ewma_alpha"),
        ({"admin": {"port": 70000}}, "port"),
        ({"admin": {"token": ""}}, "empty"),
        ({"admin": {"token": "t", "token_file": "/run/secrets/token"}}, "not both"),
        ({"metrics_port": 8081}, "metrics_port"),
        ({"commit_timeout_s": 0}, "commit_timeout_s"),
    ],
)
def test_invalid_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.load(**overrides)


def test_invalid_values_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_SENTIMENT_ENGINE__VERSION", "../../etc")
    with pytest.raises(ValidationError, match=r"engine\.version"):
        Settings.load()


def test_boundary_values_are_accepted() -> None:
    assert BatchingSettings(window_ms=20, timeout_ms=20).timeout_ms == 20
    assert BatchingSettings(window_ms=0, timeout_ms=0).window_ms == 0
    assert EngineSettings(version="v1.2_rc-3").version == "v1.2_rc-3"
    assert AggregationSettings(windows_seconds=(900,), bucket_ttl_seconds=960).bucket_ttl_seconds == 960
    assert Settings.load(dlq_topic="rejected").dead_letter_topic == "rejected"
    assert Settings.load(topic="tweets").dead_letter_topic == "tweets.dlq"


PATHS = st.builds(lambda a, sep, b: a + sep + b, st.text(max_size=10), st.sampled_from(["/", "\\"]),
                  st.text(max_size=10)) | st.text(max_size=10).map(lambda s: "." + s)


@settings(max_examples=60, deadline=None)
@given(PATHS)
def test_version_is_never_a_path(version: str) -> None:
    with pytest.raises(ValidationError):
        EngineSettings(version=version)


def test_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n", encoding="utf-8")
    assert AdminSettings(token_file=token_file).read_token() == "from-file"


def test_frozen() -> None:
    s = Settings.load()
    with pytest.raises(ValidationError, match="frozen"):
        s.topic = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.batching.window_ms = 1  # type: ignore[misc]
    assert s.topic == "posts" and s.batching.window_ms == 50
    assert s.model_copy(update={"topic": "other"}).topic == "other"  # the supported way to derive a variant


def _env_names(model: type[BaseModel], prefix: str = "STREAM_SENTIMENT_") -> list[str]:
    names: list[str] = []
    for name, info in model.model_fields.items():
        assert info.description, f"{name} has no description"
        if isinstance(info.default, BaseModel):
            names += _env_names(type(info.default), f"{prefix}{name.upper()}__")
        else:
            assert len(info.description) > 30, f"{name}: say what it is and why the default"
            names.append(f"{prefix}{name.upper()}")
    return names


def test_settings_table_lists_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_SENTIMENT_TOPIC", "from-env")  # the table shows defaults, not the environment
    table = settings_table()
    lines = table.splitlines()
    names = _env_names(Settings)
    assert len(names) == len(set(names)) == 89
    assert len(lines) == len(names) + 2  # header, separator, one row per field
    rows = {line.split(" | ")[0].strip("| `"): line for line in lines[2:]}
    assert list(rows) == names
    assert "`posts`" in rows["STREAM_SENTIMENT_TOPIC"] and "from-env" not in table
    assert "`[60, 300, 900]`" in rows["STREAM_SENTIMENT_AGGREGATION__WINDOWS_SECONDS"]
    assert "*unset*" in rows["STREAM_SENTIMENT_ADMIN__TOKEN"]
    assert all(line.count(" | ") == 2 for line in lines)  # no unescaped pipe breaks a row


def test_docs_settings_table_is_in_sync_with_the_code():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    assert settings_table() in docs, "regenerate docs/settings.md from settings_table()"


def test_the_admin_token_is_read_from_the_issue_named_variable(monkeypatch):
    monkeypatch.setenv("STREAM_SENTIMENT_ADMIN_TOKEN", "s3cret")
    assert Settings.load().admin.read_token() == "s3cret"
    assert "s3cret" not in repr(Settings.load())
    monkeypatch.setenv("STREAM_SENTIMENT_ADMIN__TOKEN", "nested")  # the nested form wins
    assert Settings.load().admin.read_token() == "nested"


def test_an_explicit_token_file_beats_the_token_alias(monkeypatch, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    monkeypatch.setenv("STREAM_SENTIMENT_ADMIN_TOKEN", "from-env")
    assert Settings.load(admin={"token_file": secret}).admin.read_token() == "from-file"
