"""One frozen, typed settings object for the whole service.

Precedence, highest first: explicit overrides (CLI flags) > ``STREAM_SENTIMENT_*`` environment
variables (groups nest with ``__``: ``STREAM_SENTIMENT_BATCHING__WINDOW_MS=10``) > a TOML or JSON
config file > defaults. ``settings_table()`` renders every field's description for the README.

Imports only the stdlib-only engine manifest module and the connection-security groups (pydantic only)
from ``stream_sentiment``, so the CLI can read it before anything heavy loads.

Why one module of ~400 lines: it is one typed settings object. Each group's fields, defaults,
descriptions (rendered into ``docs/settings.md``) and cross-field validators belong to that object,
and the loader and the table read all of it; split across files, one setting's default, check and
documentation would be looked for in several places. The one exception: the ``kafka`` and ``redis``
groups (TLS, SASL, ACL users) live in ``connection_settings.py``, as together they would take this
module well past 400 lines, and they are read together with ``clients.py``, which applies them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextvars import ContextVar
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_core import to_jsonable_python
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from stream_sentiment.connection_settings import KafkaSettings, RedisSettings
from stream_sentiment.engines.manifest import VERSION_PATTERN

__all__ = [
    "ENV_NESTED_DELIMITER", "ENV_PREFIX", "AdminSettings", "AggregationSettings", "AlertSettings",
    "BatchingSettings", "EngineSettings", "KafkaSettings", "LimitSettings", "RecoverySettings", "RedisSettings",
    "Settings",
    "settings_table",
]  # fmt: skip

ENV_PREFIX = "STREAM_SENTIMENT_"
ENV_NESTED_DELIMITER = "__"
# The engine repository's rule for version names: a plain folder name can never climb out (``../../etc``).
NAME_PATTERN = VERSION_PATTERN.pattern
# Kafka's legal topic names: a bad one fails at start-up instead of at the first produce.
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
Port = Annotated[int, Field(ge=0, le=65535)]
Dimension = Literal["global", "topic", "region", "lang"]
# A routed language (a primary subtag, as ``source.language`` reduces every post's) and its engine target.
LANGUAGE_PATTERN = r"^[a-z]{2,3}$"
ROUTE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"

# The file of the ``Settings.load`` in progress; a context variable, as loads may run concurrently.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("stream_sentiment_config_file", default=None)


class _Group(BaseModel):
    # Unknown keys are errors: a typo in a file or a <GROUP>__<KEY> variable must not silently mean "default".
    model_config = ConfigDict(frozen=True, extra="forbid")


class EngineSettings(_Group):
    repository: Path = Field(default=Path("engines"), description=(
        "Engine repository root holding `<model>/<version>/`; relative to the working directory, like the repo."))
    model: str = Field(default="minilm-sentiment", pattern=NAME_PATTERN, description=(
        "Model folder in the repository: a plain name, never a path. Default: the shipped model."))
    version: str = Field(default="v1", pattern=NAME_PATTERN, description=(
        "Engine version folder to serve: a plain name, never a path. Default: v1 (minilm-sentiment's v2 is the more "
        "accurate, see README's The model)."))
    backend: Literal["onnxruntime", "tensorrt", "torch-cuda", "engine-server"] = Field(
        default="onnxruntime", description=(
            "Inference backend; ONNX Runtime because every install has that CPU path (tensorrt and torch-cuda need "
            "a GPU). `engine-server`: batches go to this host's `stream-sentiment engine-server`, one process "
            "owning the GPU for every worker (no time-slicing between workers' CUDA contexts)."))
    server_socket: Path | None = Field(default=None, description=(
        "Unix socket of the host's engine server: where `engine-server` listens and `engine-server` workers "
        "connect. Unset unless that backend is used; put it in a folder only the service's user can enter."))
    streams: int = Field(default=1, ge=1, description=(
        "Independent execution slots scoring batches concurrently; 1, as one CPU slot already uses every core."))
    threads_per_stream: int | None = Field(default=None, ge=1, description=(
        "Intra-op threads per slot; unset = CPU cores / streams, so slots never oversubscribe the machine."))
    torch_forward: Literal["padded", "packed"] = Field(default="padded", description=(
        "torch-cuda only: `padded` runs every rows x bucket cell (a CUDA graph per bucket and row count); "
        "`packed` unpads each batch on the host and runs only real tokens (varlen flash attention, "
        "torch.compile'd once per engine, ~10 s at start-up; a CUDA graph per token budget up to "
        "batching.max_tokens). Probe on one H200: 227k tweets/s and 111k long posts/s against 207k and 90k, "
        "argmax agreement 0.9998 (docs/engine-probe-h200.md). Padded by default until packed has served "
        "end to end; an engine server applies its own setting."))
    max_retries: int = Field(default=2, ge=0, description=(
        "Rebuild-and-retry rounds for a batch whose engine call failed, before another slot takes it."))
    max_consecutive_failures: int = Field(default=3, ge=1, description=(
        "Failed calls in a row after which a slot leaves rotation (reported by /readyz); 3 rides out a blip."))
    call_timeout_s: float = Field(default=30.0, gt=0, description=(
        "An engine call taking longer has failed and its slot leaves rotation; far above any real batch."))
    cpu_fallback: bool = Field(default=False, description=(
        "When no slot of a GPU engine works, score on ONNX Runtime (CPU) instead of only pausing consumption."))
    fault_every_kth_call: int | None = Field(default=None, ge=1, description=(
        "Fault injection for tests: every k-th engine call of each stream fails. Unset (off) in production."))
    fault_broken_stream: int | None = Field(default=None, ge=0, description=(
        "Fault injection for tests: every call on this stream fails, rebuilt or not. Unset (off) in production."))
    routes: dict[Annotated[str, Field(pattern=LANGUAGE_PATTERN)], Annotated[str, Field(pattern=ROUTE_PATTERN)]] = Field(
        default_factory=dict, description=(
            "Language routing: post language -> `model/version` or `model` (its version: engine.version for "
            "engine.model, else the repository's latest), e.g. `{\"zh\": \"multilingual-sentiment/v3\"}`. Every "
            "language not named goes to engine.model/engine.version. Each engine gets its own buckets and slots; "
            "one version per model; a language its manifest does not list is refused. Empty = one engine for all. "
            "With backend engine-server, give the engine server the same engine.model and engine.routes: it hosts "
            "each route's model (a worker asking for one it does not host is refused at start-up)."))

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.backend == "engine-server" and self.server_socket is None:
            raise ValueError("backend engine-server needs server_socket (the engine server's Unix socket)")
        return self


class BatchingSettings(_Group):
    window_ms: float = Field(default=50, ge=0, description=(
        "Longest a post waits for its length bucket to fill; 50 ms bounds latency yet lets bursts fill batches."))
    timeout_ms: float = Field(default=20, ge=0, description=(
        "With an engine slot idle, longest a post waits (<= window_ms), so sparse traffic skips the window."))
    max_rows: int = Field(default=64, ge=1, description=(
        "Most posts in one batch; 64 keeps the INT8 engine busy without long per-batch latency."))
    max_tokens: int = Field(default=8192, ge=256, description=(
        "Padded tokens (rows x bucket) per batch: 64 rows of 128; >= 256, the largest bucket, so any post fits."))
    max_in_flight_posts: int = Field(default=10000, ge=1, description=(
        "Backpressure: consumption pauses above this many posts in flight (>= max_rows); bounds memory."))
    buckets: tuple[Annotated[int, Field(gt=0)], ...] | None = Field(default=None, min_length=1, description=(
        "Length buckets to batch by, increasing and ending at the engine's largest; unset = the engine manifest's "
        "(32/64/128/256). Finer ones pad less (e.g. 16,24,...,64,80,...,256 on a GPU); a TensorRT plan must be "
        "built for the same (`build-engine --buckets`). Only the largest = pad to the max length (a baseline)."))

    merge_smaller_on_timeout: bool = Field(default=False, description=(
        "A timeout batch (an engine stream idle) also takes the oldest shorter posts, padded up: fewer, "
        "fuller calls. On for GPUs (P99 at 8k posts/s 140 -> 29 ms on an H100); off, as CPU cost grows with padding."))
    formation: Literal["buckets", "least-cost", "arrival"] = Field(default="buckets", description=(
        "Which posts form a batch. `buckets`: one length bucket per batch (the measured default). `least-cost`: "
        "queued buckets split into runs of neighbours the cheapest way by the engine's cost model (call_cost_us, "
        "token_cost_ns), each run one batch padded to its longest; for GPUs, with timeout_ms 0. `arrival`: "
        "dynamic padding, a baseline: arrival order across lengths, padded to the bucket of the longest post."))
    call_cost_us: float | None = Field(default=None, ge=0, description=(
        "least-cost: fixed cost of one engine call in microseconds; unset = the backend's (GPU backends 1000: "
        "~0.5 ms per device call on the H200 engine server + the worker's CPU per batch; onnxruntime 100)."))
    token_cost_ns: float | None = Field(default=None, ge=0, description=(
        "least-cost: cost of one padded token in nanoseconds; unset = the backend's (GPU 100: 7.5 ms for 256 x "
        "256 tokens on the H200, 2 with engine.torch_forward packed, where padding is stripped on the host; "
        "onnxruntime 90000: ~95 ms for 32 x 32 INT8 on 2 cores, so buckets never merge)."))

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.buckets is not None and list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be increasing and unique, got {list(self.buckets)}")
        if self.timeout_ms > self.window_ms:
            raise ValueError(f"timeout_ms ({self.timeout_ms}) must not exceed window_ms ({self.window_ms})")
        # Below one batch the bound would pause consumption before any bucket could fill.
        if self.max_in_flight_posts < self.max_rows:
            raise ValueError(f"max_in_flight_posts ({self.max_in_flight_posts}) must be >= max_rows ({self.max_rows})")
        return self


class LimitSettings(_Group):
    max_message_bytes: int = Field(default=65536, ge=1, description=(
        "Largest Kafka message admitted; 64 KiB holds any real post with metadata and caps per-message memory."))
    max_text_chars: int = Field(default=5000, ge=1, description=(
        "Longest post text admitted; far above real posts, and the engine truncates to its max length anyway."))
    max_id_chars: int = Field(default=256, ge=1, description=(
        "Longest post id admitted; ids are copied into alert samples in Redis, so they are bounded."))
    max_field_chars: int = Field(default=128, ge=1, description=(
        "Longest topic/region/lang admitted; they become Redis key parts, so they bound key size."))


class AggregationSettings(_Group):
    bucket_seconds: int = Field(default=10, ge=1, description=(
        "Width of the time buckets posts are counted in; 10 s resolves minute windows with few Redis keys."))
    windows_seconds: tuple[Annotated[int, Field(gt=0)], ...] = Field(default=(60, 300, 900), min_length=1, description=(
        "Alert windows, each a multiple of bucket_seconds (kept sorted); 1/5/15 min catch fast and slow surges."))
    allowed_lateness_seconds: int = Field(default=60, ge=0, description=(
        "How far behind its partition's stream time (the highest event time applied there) a post's bucket may "
        "end and the post still count in it; later ones count as `late`. 60 s covers producer batching and lag."))
    max_out_of_orderness_seconds: float = Field(default=3.0, ge=0, description=(
        "How far a partition's watermark trails its stream time. Windows are judged for alerts once every "
        "partition's watermark passes their end, and only posts that arrived before that count in alerts: a few "
        "seconds, as in Flink's bounded out-of-orderness, keeps alerts fast (not the 60 s lateness)."))
    idle_partition_seconds: float = Field(default=30.0, gt=0, description=(
        "A partition with nothing new to read for this long (wall clock) stops holding back the group's "
        "watermark until its next post. The one place where timing, not the log, decides: see docs/scaling.md."))
    dimensions: tuple[Dimension, ...] = Field(default=("global", "topic", "region", "lang"), min_length=1,
                                              description=(
        "What posts are counted by (global, topic, region, lang); all four, so an alert says where a surge is "
        "and in which language. lang is the post's `lang` field, else its script's, else default_language."))
    bucket_ttl_seconds: int = Field(default=3600, ge=1, description=(
        "Redis expiry of a bucket; >= largest window + lateness so no window reads an expired one; 1 h of slack."))

    @field_validator("windows_seconds", "dimensions")
    @classmethod
    def _unique(cls, values: tuple[Any, ...], info: ValidationInfo) -> tuple[Any, ...]:
        if len(set(values)) != len(values):
            raise ValueError(f"duplicates in {list(values)}")
        # Windows are sorted once here so consumers may take the last as the largest.
        return tuple(sorted(values)) if info.field_name == "windows_seconds" else values

    @model_validator(mode="after")
    def _check(self) -> Self:
        odd = [w for w in self.windows_seconds if w % self.bucket_seconds]
        if odd:
            raise ValueError(f"windows_seconds {odd} are not multiples of bucket_seconds ({self.bucket_seconds})")
        needed = self.windows_seconds[-1] + self.allowed_lateness_seconds
        if self.bucket_ttl_seconds < needed:
            raise ValueError(f"bucket_ttl_seconds ({self.bucket_ttl_seconds}) must be >= window + lateness ({needed})")
        return self


class AlertSettings(_Group):
    ratio_threshold: float = Field(default=0.6, ge=0, le=1, description=(
        "Negative share of a window's posts that raises an alert; 0.6 is a clear majority, far above baseline."))
    min_posts: int = Field(default=50, ge=1, description=(
        "Fewest posts in a window before it may alert; with fewer, a handful of posts swings the ratio."))
    surge_z: float = Field(default=3.0, gt=0, description=(
        "Z-score of the negative count over its EWMA baseline that is a surge; 3 sigma keeps false alarms rare."))
    ewma_alpha: float = Field(default=0.1, gt=0, le=1, description=(
        "EWMA baseline smoothing (0 < a <= 1); 0.1 remembers ~10 windows, so a surge does not become the baseline."))
    cooldown_seconds: int = Field(default=300, ge=0, description=(
        "Quiet time after an alert for the same key; 5 minutes stops one surge alerting on every evaluation."))
    stream_max_len: int = Field(default=10000, ge=1, description=(
        "Approximate MAXLEN of the Redis alert stream: plenty of history at bounded memory."))
    sample_posts: int = Field(default=3, ge=0, description=(
        "Example negative posts attached to an alert, so a reader sees why without a lookup."))


class RecoverySettings(_Group):
    on_redis_loss: Literal["refuse", "rebuild"] = Field(default="refuse", description=(
        "A partition Kafka has committed offsets for but Redis has no mark for means Redis lost its data (a "
        "restart without persistence, a flush). `refuse`: exit with code 4 and say so, as counts would silently "
        "restart from the commit. `rebuild`: re-read those partitions from their earliest retained offset and "
        "count them again (event time makes the rebuilt buckets equal to the lost ones for retained data)."))
    on_offset_regression: Literal["stop", "rebase"] = Field(default="stop", description=(
        "A partition whose log now ends below the mark in Redis (a re-created topic, a broker restored empty). "
        "`stop`: stop consuming that partition with an error (reported in logs, metrics and `stats --json`); "
        "`rebase`: count the new log from its beginning."))


class AdminSettings(_Group):
    host: str = Field(default="127.0.0.1", min_length=1, description=(
        "Admin HTTP bind address; loopback, so it is never exposed by accident."))
    port: Port = Field(default=8081, description="Admin HTTP port (0 = any free port); 8081, beside the common 8080.")
    token: SecretStr | None = Field(default=None, description=(
        "Bearer token for admin calls (unset = refused); a secret, so never in logs or reprs. Not with token_file."))
    token_file: Path | None = Field(default=None, description=(
        "File holding the admin token (e.g. a mounted secret), to keep it out of the environment. Not with token."))
    max_body_bytes: int = Field(default=4096, ge=1, description=(
        "Largest admin request body; admin payloads are tiny, so 4 KiB bounds abuse."))
    golden_tolerance: float = Field(default=0.05, ge=0, le=1, description=(
        "A candidate engine may score this much below its manifest's golden-set accuracy; more means a bad load."))
    shadow_sample_size: int = Field(default=64, ge=0, description=(
        "Recent live posts kept to compare a candidate engine with the active one before a swap; 64 "
        "measures a 90% agreement to about +-4%, at little cost to live batches."))
    validation_duty_cycle: float = Field(default=0.25, gt=0, le=1, description=(
        "Share of time a candidate's validation may score (in small chunks), so live batches keep the cores."))
    min_shadow_posts: int = Field(default=32, ge=1, description=(
        "Fewer recent posts than this and the shadow comparison is skipped (reported), e.g. with no traffic."))
    min_shadow_agreement: float = Field(default=0.9, ge=0, le=1, description=(
        "Share of shadow posts on which candidate and active engine must agree; a new model may differ a little."))

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.token is not None and not self.token.get_secret_value():
            raise ValueError("admin token must not be empty (leave it unset instead)")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set admin token or token_file, not both")
        return self

    def read_token(self) -> str | None:
        """The token, read from ``token_file`` (surrounding whitespace stripped) when that is set."""
        if self.token_file is not None:
            return self.token_file.read_text(encoding="utf-8").strip() or None
        return self.token.get_secret_value() if self.token is not None else None


def _checked(path: Path | Traversable, read: Callable[..., Any]) -> dict[str, Any]:
    # ``read`` is loosely typed because pydantic-settings releases differ in its parameter type.
    # The stock sources name no file on a parse error and fail obscurely on a non-object top level.
    try:
        data = read(path)
    except ValueError as exc:  # TOMLDecodeError, JSONDecodeError and UnicodeDecodeError all are
        raise ValueError(f"config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: the top level must be an object/table, not {type(data).__name__}")
    return data


class _TomlFile(TomlConfigSettingsSource):
    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        return _checked(file_path, super()._read_file)  # parsed with tomllib


class _JsonFile(JsonConfigSettingsSource):
    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        return _checked(file_path, super()._read_file)


class Settings(BaseSettings):
    """The whole service's configuration; build it with ``Settings.load``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, frozen=True, extra="forbid"
    )

    bootstrap_servers: str = Field(default="127.0.0.1:9092", min_length=1, description=(
        "Kafka bootstrap servers, comma-separated host:port; loopback for the embedded/local broker."))
    topic: str = Field(default="posts", pattern=TOPIC_PATTERN, description="Kafka topic the posts arrive on.")
    consumer_group: str = Field(default="stream-sentiment", min_length=1, description=(
        "Kafka consumer group; replicas share it to split the topic's partitions."))
    default_language: str = Field(default="en", pattern=LANGUAGE_PATTERN, description=(
        "The language of a post that declares none and whose script does not say (anything but CJK): "
        "what the stream is mostly in. Counted under the lang dimension."))
    dlq_topic: str | None = Field(default=None, pattern=TOPIC_PATTERN, description=(
        "Dead-letter topic for rejected messages; unset = `<topic>.dlq`, so it follows the input topic."))
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", pattern=r"^(redis|rediss|unix)://", description=(
        "Redis for aggregates and alerts (redis://, rediss:// or unix://); loopback for the local server."))
    redis_prefix: str = Field(default="ss", pattern=r"^[A-Za-z0-9_\-:.]{1,64}$", description=(
        "Prefix of every Redis key (letters, digits, `_-:.`; 1-64 chars) so deployments can share a Redis; short."))
    # Frozen groups are immutable, so one shared default instance is safe.
    engine: EngineSettings = Field(default=EngineSettings(), description="Inference engine.")
    batching: BatchingSettings = Field(default=BatchingSettings(), description="Batch formation.")
    limits: LimitSettings = Field(default=LimitSettings(), description="Message admission limits.")
    aggregation: AggregationSettings = Field(default=AggregationSettings(), description="Windowed counts.")
    alerts: AlertSettings = Field(default=AlertSettings(), description="Surge alerts.")
    kafka: KafkaSettings = Field(default=KafkaSettings(), description="Kafka client security: TLS and SASL.")
    redis: RedisSettings = Field(default=RedisSettings(), description=(
        "Redis client security (TLS, ACL user) and riding out Redis faults."))
    recovery: RecoverySettings = Field(default=RecoverySettings(), description=(
        "What to do when Redis lost its data or a partition's log restarted."))
    admin: AdminSettings = Field(default=AdminSettings(), description="Admin HTTP endpoint.")
    metrics_port: Port | None = Field(default=None, description=(
        "Prometheus metrics HTTP port; unset = no metrics server, so nothing listens unasked."))
    commit_timeout_s: float = Field(default=5.0, gt=0, description=(
        "Longest an offset commit may take before it counts as failed; 5 s rides out a leader change."))
    shutdown_timeout_s: float = Field(default=10.0, gt=0, description=(
        "Longest a graceful shutdown drains in-flight work; 10 s fits inside the usual 30 s stop grace period."))
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000, description=(
        "Consumer-group session timeout: how long a dead (kill -9) worker holds its partitions before the group "
        "gives them to another; 6 s, the least a Kafka broker accepts by default, keeps recovery under 10 s."))
    kafka_heartbeat_interval_ms: int = Field(default=2000, ge=100, description=(
        "Consumer heartbeat interval; a third of the session timeout, as Kafka recommends."))
    kafka_gap_refetches: int = Field(default=2, ge=0, description=(
        "Re-reads of a gap in a partition's offsets before it is skipped. A broker may hand out a later batch "
        "before an earlier one is readable (seen with Tansu and two producers on one partition), and a skipped "
        "gap is a post lost for good; 0 for compacted or transactional topics, whose gaps are real."))
    kafka_fetch_max_wait_ms: int = Field(default=20, ge=1, description=(
        "Longest the broker may hold a fetch waiting for data. Kafka answers as soon as data arrives, but some "
        "brokers wait: Tansu holds a fetch about half of it even with data there, and it adds to latency; 20 ms "
        "costs only idle polls."))
    kafka_fetch_min_bytes: int = Field(default=1, ge=1, description=(
        "Least data the broker gathers before it answers a fetch (or kafka_fetch_max_wait_ms runs out): Kafka's "
        "fetch.min.bytes. 1 answers as soon as anything is there, so under steady load the consumer fetches a few "
        "ms of records at a time, and per-fetch and per-batch costs weigh on every post (measured: ~350 ms of CPU "
        "a second per worker from 3,125 to 12,500 tweets/s). A few kB makes fewer, larger fetches at up to "
        "kafka_fetch_max_wait_ms more latency; a backlog fills it at once. docs/benchmarks.md has the measured "
        "trade; 1 = Kafka's default."))
    kafka_fetch_min_interval_ms: float = Field(default=0, ge=0, le=1000, description=(
        "Least time between two fetches of the worker's fetch loop: records that arrive meanwhile wait in the "
        "consumer and come in one larger fetch, so per-fetch and per-batch costs (decode, tokenizer and "
        "scheduler calls, engine calls, Redis writes) are spread over more posts, at up to this much more "
        "latency for a post (half on average). 0 = fetch as soon as the loop comes round (the default). "
        "kafka_fetch_min_bytes trades less latency for the same CPU: there the broker holds the fetch, here the "
        "records wait in the consumer's buffer, already fetched."))

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic if self.dlq_topic is not None else f"{self.topic}.dlq"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.dead_letter_topic == self.topic:
            raise ValueError("dlq_topic must differ from topic, or rejected messages would be consumed again")
        tls = self.redis.tls_files_set
        if tls and not self.redis_url.startswith("rediss://"):
            raise ValueError(f"redis.{tls[0]} is set but redis_url is not rediss:// (no TLS): use rediss://")
        if self.metrics_port and self.metrics_port == self.admin.port:
            raise ValueError(f"metrics_port and admin.port are both {self.metrics_port}")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:  # fmt: skip
        # Exactly overrides > env > file: no .env or secrets dir, so a stray file cannot change a production run.
        path = _CONFIG_FILE.get()
        if path is None:
            return init_settings, env_settings
        file_source: PydanticBaseSettingsSource
        if path.suffix.lower() == ".toml":
            file_source = _TomlFile(settings_cls, toml_file=path)
        else:
            file_source = _JsonFile(settings_cls, json_file=path, json_file_encoding="utf-8")
        return init_settings, env_settings, file_source

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Self:
        """Overrides > ``STREAM_SENTIMENT_*`` environment > ``config_file`` (.toml or .json) > defaults.

        ``None`` overrides are dropped, so unset argparse flags can be passed straight through.
        Group overrides are dicts merged key by key with the other sources: ``batching={"window_ms": 10}``.
        """
        if config_file is not None:
            config_file = Path(config_file)
            if config_file.suffix.lower() not in (".toml", ".json"):
                raise ValueError(f"config file {config_file} must end in .toml or .json")
            # The file sources skip a missing file silently; a named one that is missing is a mistake.
            if not config_file.is_file():
                raise FileNotFoundError(f"config file {config_file} does not exist")
        overrides = {key: value for key, value in overrides.items() if value is not None}
        _admin_token_alias(overrides)
        token = _CONFIG_FILE.set(config_file)
        try:
            return cls(**overrides)
        finally:
            _CONFIG_FILE.reset(token)


# The issue and operators' habits name the admin token STREAM_SENTIMENT_ADMIN_TOKEN; the nested
# form STREAM_SENTIMENT_ADMIN__TOKEN works too, and wins when both are set.
ADMIN_TOKEN_ALIAS = f"{ENV_PREFIX}ADMIN_TOKEN"


def _admin_token_alias(overrides: dict[str, Any]) -> None:
    alias = os.environ.get(ADMIN_TOKEN_ALIAS)
    if not alias or f"{ENV_PREFIX}ADMIN{ENV_NESTED_DELIMITER}TOKEN" in os.environ:
        return
    admin = overrides.get("admin")
    admin = dict(admin) if isinstance(admin, dict) else {}
    if admin.get("token") is None and admin.get("token_file") is None:
        overrides["admin"] = {**admin, "token": alias}


def _rows(defaults: BaseModel, env: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, info in type(defaults).model_fields.items():
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            rows += _rows(value, f"{env}{name.upper()}{ENV_NESTED_DELIMITER}")
            continue
        # Spelled as the environment takes it: plain strings, JSON for tuples.
        plain = to_jsonable_python(value)
        shown = "*unset*" if plain is None else f"`{plain if isinstance(plain, str) else json.dumps(plain)}`"
        rows.append((f"`{env}{name.upper()}`", shown, (info.description or "").replace("|", "\\|")))
    return rows


def settings_table() -> str:
    """A Markdown table of every setting, groups included: environment variable, default, description."""
    # model_construct: the defaults themselves, whatever the current environment says.
    rows = _rows(Settings.model_construct(), ENV_PREFIX)
    header = ["| Environment variable | Default | Description |", "| --- | --- | --- |"]
    return "\n".join(header + [f"| {env} | {default} | {text} |" for env, default, text in rows])
