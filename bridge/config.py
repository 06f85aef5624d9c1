"""Configuration: typed dataclasses, loaded from YAML plus ``BRIDGE_*`` environment overrides.

Pure: :func:`build_config` takes plain data and an environment mapping and either returns a
:class:`Config` or raises :class:`ConfigError` naming every bad key. Nothing here connects
to anything; ``wavespeed-bridge check-config`` is exactly this module.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ENV_PREFIX = "BRIDGE_"
ENV_SEPARATOR = "__"


class ConfigError(ValueError):
    """One or more configuration problems, each naming the offending key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    bootstrap_servers: str = "localhost:9092"
    client_id: str = "wavespeed-bridge"
    group_id: str = "wavespeed-bridge"
    input_topic: str = "wavespeed.tasks"
    completed_topic: str = "wavespeed.completed"
    failed_topic: str = "wavespeed.failed"
    # None: timeouts go to failed_topic with type ai.wavespeed.prediction.timeout.
    timeout_topic: str | None = None
    dead_letter_topic: str = "wavespeed.dead-letter"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None
    ssl_check_hostname: bool = True
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    # How long the coordinator waits for every member to rejoin in a rebalance.
    rebalance_timeout_ms: int = 60_000
    request_timeout_ms: int = 30_000
    fetch_max_records: int = 500
    max_message_bytes: int = 1_048_576
    linger_ms: int = 5
    # Idempotent producer (acks=all): broker-side retries never duplicate or reorder an event.
    enable_idempotence: bool = True
    # The brokers' offset.metadata.max.bytes: the offset map in each commit stays below it.
    offset_metadata_max_bytes: int = 4096
    # Exactly-once: transactional ids are <prefix>-<input topic>-<partition>; default group_id.
    transactional_id_prefix: str | None = None
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    commit_interval_s: float = 1.0
    health_check_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str = "https://api.wavespeed.ai"
    # The seed page's path; the official SDKs use /api/v3/predictions/{id}/result.
    result_path: str = "/api/v3/predictions/{id}"
    api_key_file: str | None = None
    api_key_env: str = "WAVESPEED_API_KEY"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    # Whole request, connect to last byte: the read timeout restarts with every chunk.
    total_timeout_s: float = 15.0
    max_concurrent_requests: int = 100
    max_response_bytes: int = 1_048_576
    verify_tls: bool = True
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # Global poll budget in requests/s; 0 disables the cap.
    requests_per_second: float = 0.0
    budget_burst: int = 0
    auth_error_pause_s: float = 30.0
    user_agent: str = "wavespeed-bridge"


@dataclass(frozen=True, slots=True)
class ModelClass:
    """Defaults for models whose names match ``pattern`` (fnmatch syntax)."""

    pattern: str
    min_interval_s: float = 2.0
    max_interval_s: float = 30.0
    median_s: float = 5.0
    p90_s: float = 15.0


def _default_model_classes() -> tuple[ModelClass, ...]:
    return (
        ModelClass(
            pattern="*video*", min_interval_s=5.0, max_interval_s=60.0, median_s=120.0, p90_s=300.0
        ),
        ModelClass(pattern="*", min_interval_s=2.0, max_interval_s=30.0, median_s=5.0, p90_s=15.0),
    )


@dataclass(frozen=True, slots=True)
class PollingConfig:
    policy: Literal["fixed", "adaptive"] = "fixed"
    interval_s: float = 2.0
    default_timeout_s: float = 300.0
    max_timeout_s: float = 86_400.0
    max_in_flight: int = 10_000
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    jitter: float = 0.1
    # Adaptive policy: weight of one poll against one second of detection delay.
    poll_cost_s: float = 0.5
    learning_window: int = 200
    # Adaptive policy: models learned at once; the least recently used is forgotten.
    max_models: int = 1000
    model_classes: tuple[ModelClass, ...] = field(default_factory=_default_model_classes)
    max_model_labels: int = 200


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: Literal["json", "console"] = "json"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(frozen=True, slots=True)
class EventsConfig:
    source: str = "urn:wavespeed-bridge"
    # CloudEvents Kafka binding content mode: one JSON object per record, or ce_* headers
    # with the data as the value (what Knative's Kafka source and sink also accept).
    mode: Literal["structured", "binary"] = "structured"


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """The receiver for WaveSpeed's signed webhook deliveries (off by default)."""

    enabled: bool = False
    # Loopback unless told otherwise, like server.host; the Helm chart sets 0.0.0.0.
    host: str = "127.0.0.1"
    port: int = 9465
    path: str = "/webhooks/wavespeed"
    # The account's webhook secret (GET /api/v3/webhook/secret, "whsec_..."): from the file
    # if given (a secret mount), else from this environment variable.
    secret_env: str = "WAVESPEED_WEBHOOK_SECRET"  # noqa: S105 (a variable name)
    secret_file: str | None = None
    # Verified deliveries are produced here (acks=all) before the sender gets its 2xx.
    topic: str = "wavespeed.webhooks"
    max_body_bytes: int = 262_144
    # Signed timestamps older (or further ahead) than this are refused; WaveSpeed's 300 s.
    tolerance_s: float = 300.0
    # The whole body must arrive within this (slow senders cannot hold a slot for long).
    read_timeout_s: float = 10.0
    # The broker must acknowledge a delivery within this, else 503 and the sender retries.
    publish_timeout_s: float = 10.0
    # Requests handled at once; more get 503 (bounds memory at this x max_body_bytes).
    max_concurrent_requests: int = 256
    # Webhook-ids remembered for replay detection (each until its timestamp is stale).
    replay_max_ids: int = 100_000
    # false: a verified terminal delivery finishes its task; true: it triggers one poll.
    confirm_by_poll: bool = False
    # Deliveries for task ids not consumed yet: how many are remembered, and how long.
    pending_max: int = 10_000
    pending_ttl_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    polling: PollingConfig = field(default_factory=PollingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    shutdown_grace_s: float = 20.0


# --- conversion -------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


class _Invalid(Exception):
    pass


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Invalid
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, problems)
            except _Invalid:
                continue
        raise _Invalid
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Invalid
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(
            _convert_item(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Invalid
        return _build(tp, value, key, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Invalid
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid
    raise _Invalid


def _convert_item(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    try:
        return _convert(value, tp, key, problems)
    except _Invalid:
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None


def _build(cls: Any, data: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if raw_key not in names:
            problems.append(f"{key}: unknown key")
            continue
        converted = _convert_item(value, hints[raw_key], key, problems)
        if converted is not None or value is None:
            kwargs[raw_key] = converted
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in kwargs
    ]
    for name in missing:
        problems.append(f"{prefix + '.' if prefix else ''}{name}: required")
    if missing:
        return None
    return cls(**kwargs)


# --- environment overrides ----------------------------------------------------------------


# Read by the CLI as the config file path, not an override.
ENV_NOT_OVERRIDES = frozenset({"BRIDGE_CONFIG"})


def _apply_env(data: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> None:
    """``BRIDGE_KAFKA__BOOTSTRAP_SERVERS=x`` sets ``kafka.bootstrap_servers``.

    A string setting takes the value verbatim (a password ``123456`` stays a string); any
    other is parsed as a YAML scalar, so ``8080`` is an integer and ``true`` a boolean.
    """
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_OVERRIDES:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split(ENV_SEPARATOR)]
        if not all(path):
            problems.append(f"{name}: malformed override name")
            continue
        raw = env[name]
        if raw == "":
            value: Any = None
        elif _is_text_setting(path):
            value = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{name}: {part} is not a section")
                break
            node = child
        else:
            node[path[-1]] = value


def _is_text_setting(path: list[str]) -> bool:
    """Whether the setting at ``path`` is a string (or optional string) field."""
    cls: Any = Config
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(cls):
            return False
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return False
        if i == len(path) - 1:
            args = set(typing.get_args(hint)) - {type(None)}
            return hint is str or (isinstance(hint, types.UnionType) and args == {str})
        cls = hint
    return False


# --- semantic checks ----------------------------------------------------------------------


def _check(config: Config, problems: list[str]) -> None:
    k, a, p = config.kafka, config.api, config.polling

    def positive(key: str, value: float) -> None:
        if value <= 0:
            problems.append(f"{key}: must be > 0, got {value!r}")

    for key, value in (
        ("kafka.session_timeout_ms", k.session_timeout_ms),
        ("kafka.heartbeat_interval_ms", k.heartbeat_interval_ms),
        ("kafka.max_poll_interval_ms", k.max_poll_interval_ms),
        ("kafka.rebalance_timeout_ms", k.rebalance_timeout_ms),
        ("kafka.request_timeout_ms", k.request_timeout_ms),
        ("kafka.fetch_max_records", k.fetch_max_records),
        ("kafka.max_message_bytes", k.max_message_bytes),
        ("kafka.commit_interval_s", k.commit_interval_s),
        ("kafka.offset_metadata_max_bytes", k.offset_metadata_max_bytes),
        ("kafka.health_check_interval_s", k.health_check_interval_s),
        ("api.connect_timeout_s", a.connect_timeout_s),
        ("api.read_timeout_s", a.read_timeout_s),
        ("api.total_timeout_s", a.total_timeout_s),
        ("api.max_concurrent_requests", a.max_concurrent_requests),
        ("api.max_response_bytes", a.max_response_bytes),
        ("polling.interval_s", p.interval_s),
        ("polling.default_timeout_s", p.default_timeout_s),
        ("polling.max_timeout_s", p.max_timeout_s),
        ("polling.max_in_flight", p.max_in_flight),
        ("polling.backoff_base_s", p.backoff_base_s),
        ("polling.backoff_max_s", p.backoff_max_s),
        ("polling.poll_cost_s", p.poll_cost_s),
        ("polling.learning_window", p.learning_window),
        ("polling.max_model_labels", p.max_model_labels),
        ("polling.max_models", p.max_models),
        ("shutdown_grace_s", config.shutdown_grace_s),
    ):
        positive(key, value)
    if config.delivery == "exactly_once" and not k.enable_idempotence:
        problems.append(
            "delivery: exactly_once needs kafka.enable_idempotence: true (transactions are"
            " idempotent); brokers without them (Tansu) need delivery: at_least_once"
        )
    if k.heartbeat_interval_ms >= k.session_timeout_ms:
        problems.append("kafka.heartbeat_interval_ms: must be below kafka.session_timeout_ms")
    if a.requests_per_second < 0:
        problems.append("api.requests_per_second: must be >= 0 (0 disables the budget)")
    if a.budget_burst < 0:
        problems.append("api.budget_burst: must be >= 0")
    if not (0 <= p.jitter < 1):
        problems.append(f"polling.jitter: must be in [0, 1), got {p.jitter!r}")
    if p.default_timeout_s > p.max_timeout_s:
        problems.append("polling.default_timeout_s: must not exceed polling.max_timeout_s")
    if p.backoff_base_s > p.backoff_max_s:
        problems.append("polling.backoff_base_s: must not exceed polling.backoff_max_s")
    if not a.base_url.startswith(("http://", "https://")):
        problems.append(f"api.base_url: must start with http:// or https://, got {a.base_url!r}")
    if a.result_path.count("{id}") != 1 or not a.result_path.startswith("/"):
        problems.append("api.result_path: must start with / and contain {id} exactly once")
    if not config.events.source:
        problems.append("events.source: must not be empty (CloudEvents requires a source)")
    if not (0 < config.server.port < 65536):
        problems.append(f"server.port: must be in 1..65535, got {config.server.port}")
    sasl = k.security_protocol.startswith("SASL")
    if sasl and k.sasl_mechanism is None:
        problems.append("kafka.sasl_mechanism: required when security_protocol is SASL_*")
    if sasl and not k.sasl_username:
        problems.append("kafka.sasl_username: required when security_protocol is SASL_*")
    if sasl and k.sasl_password is None and k.sasl_password_file is None:
        problems.append(
            "kafka.sasl_password: required (or kafka.sasl_password_file) when security_protocol"
            " is SASL_*"
        )
    if k.compression_type is not None and k.compression_type not in available_codecs():
        problems.append(
            f"kafka.compression_type: {k.compression_type} needs its codec library (cramjam,"
            " installed with wavespeed-bridge), which cannot be imported here; reinstall, or"
            f" choose one of: {', '.join(sorted(available_codecs()))}"
        )
    topics = [k.input_topic, k.completed_topic, k.failed_topic, k.dead_letter_topic]
    if k.timeout_topic:
        topics.append(k.timeout_topic)
    if k.input_topic in topics[1:]:
        problems.append("kafka.input_topic: must differ from every output topic")
    _check_webhooks(config, problems, topics)
    for i, mc in enumerate(p.model_classes):
        if not (0 < mc.min_interval_s <= mc.max_interval_s):
            problems.append(
                f"polling.model_classes[{i}]: need 0 < min_interval_s <= max_interval_s"
            )
        if not (0 < mc.median_s < mc.p90_s):
            problems.append(f"polling.model_classes[{i}]: need 0 < median_s < p90_s")


def _check_webhooks(config: Config, problems: list[str], kafka_topics: list[str]) -> None:
    w, k = config.webhooks, config.kafka
    for key, value in (
        ("webhooks.max_body_bytes", w.max_body_bytes),
        ("webhooks.tolerance_s", w.tolerance_s),
        ("webhooks.read_timeout_s", w.read_timeout_s),
        ("webhooks.publish_timeout_s", w.publish_timeout_s),
        ("webhooks.max_concurrent_requests", w.max_concurrent_requests),
        ("webhooks.replay_max_ids", w.replay_max_ids),
        ("webhooks.pending_max", w.pending_max),
        ("webhooks.pending_ttl_s", w.pending_ttl_s),
    ):
        if value <= 0:
            problems.append(f"{key}: must be > 0, got {value!r}")
    if not (0 < w.port < 65536):
        problems.append(f"webhooks.port: must be in 1..65535, got {w.port}")
    elif w.enabled and w.port == config.server.port:
        problems.append("webhooks.port: must differ from server.port (the metrics server's)")
    if not w.host:
        problems.append("webhooks.host: must not be empty")
    if (
        not w.path.startswith("/")
        or any(c in w.path for c in "?#%")
        or any(not c.isascii() or not c.isprintable() or c.isspace() for c in w.path)
    ):
        problems.append(
            f"webhooks.path: must start with / and be printable ASCII without spaces, ?, # or %,"
            f" got {w.path!r}"
        )
    if not w.topic:
        problems.append("webhooks.topic: must not be empty")
    elif w.topic in kafka_topics:
        problems.append("webhooks.topic: must differ from kafka's input and output topics")
    if w.enabled and w.max_body_bytes > k.max_message_bytes:
        problems.append(
            f"webhooks.max_body_bytes: must not exceed kafka.max_message_bytes"
            f" ({k.max_message_bytes}): a delivery is produced to webhooks.topic as it came"
        )
    if w.tolerance_s > 3600:
        problems.append(
            "webhooks.tolerance_s: at most 3600 (WaveSpeed documents 300 s; a wide window"
            " widens the replay window)"
        )
    if w.enabled and not w.secret_file and not w.secret_env:
        problems.append("webhooks.secret_env: required (or webhooks.secret_file) when enabled")


def available_codecs() -> frozenset[str]:
    """Compression codecs the Kafka client can really use here (for input and output)."""
    from aiokafka import codec  # pure functions; imported late to keep this module light

    checks = {"snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}
    return frozenset({"gzip", *(name for name, has in checks.items() if has())})


def explain(config: Config) -> list[str]:
    """What the delivery-related settings mean, for ``check-config``."""
    k = config.kafka
    lines = [
        f"input      {k.input_topic!r} in group {k.group_id!r}; policy {config.polling.policy}",
    ]
    if k.enable_idempotence:
        lines.append(
            "producer   idempotent, acks=all (kafka.enable_idempotence: true): a send the client"
            " retries is written once and in order; needs a broker with the idempotent producer"
            " (Apache Kafka, MSK, Confluent Cloud, Redpanda)"
        )
    else:
        lines.append(
            "producer   not idempotent, acks=all (kafka.enable_idempotence: false): a send"
            " retried after a lost acknowledgement may be written twice; only for brokers"
            " without InitProducerId (Tansu)"
        )
    if config.events.mode == "structured":
        lines.append(
            "events     CloudEvents Kafka binding, structured mode: each record's value is the"
            " whole CloudEvent as JSON, content-type application/cloudevents+json (events.mode)"
        )
    else:
        lines.append(
            "events     CloudEvents Kafka binding, binary mode: attributes in ce_* headers,"
            " content-type application/json, the event's data as the value (events.mode)"
        )
    if config.delivery == "exactly_once":
        prefix = k.transactional_id_prefix or k.group_id
        lines.append(
            "delivery   exactly_once: each commit interval, one transaction per input partition"
            " carries its events and its offset (with the offset map); subscribers reading"
            f" with isolation.level=read_committed see each outcome once. Transactional ids"
            f" {prefix}-{k.input_topic}-<partition>: the member owning a partition owns its id,"
            " so a replica that lost the partition is fenced. Needs a broker with"
            " transactions (Apache Kafka, MSK, Confluent Cloud, Redpanda)"
        )
    else:
        lines.append(
            "delivery   at_least_once (default): an input offset is committed only after its"
            " event is acknowledged, with the offsets finished above it in the commit's"
            " metadata; a crash repeats only events acknowledged after the last commit."
            " delivery: exactly_once needs transactions"
        )
    lines.append(_explain_webhooks(config))
    codecs = ", ".join(sorted(available_codecs()))
    lines.append(
        f"compress   output {k.compression_type or 'none'}; input in any of: {codecs}"
        " (a batch that cannot be decoded is dead-lettered by offset)"
    )
    return lines


def _explain_webhooks(config: Config) -> str:
    w = config.webhooks
    if not w.enabled:
        return (
            "webhooks   off (webhooks.enabled: false): every task is found by polling; turn on"
            " to receive WaveSpeed's signed deliveries"
        )
    source = f"file {w.secret_file}" if w.secret_file else f"${w.secret_env}"
    after = (
        "a verified terminal delivery triggers one poll (confirm_by_poll: true)"
        if w.confirm_by_poll
        else "a verified terminal delivery finishes its task without a poll"
    )
    return (
        f"webhooks   POST http://{w.host}:{w.port}{w.path}: v3 HMAC-SHA256 signatures (secret"
        f" from {source}), timestamps within {w.tolerance_s:g}s, webhook-ids checked for"
        f" replays, bodies up to {w.max_body_bytes} bytes; each verified delivery is produced"
        f" to {w.topic!r} (acks=all) before the 2xx, 503 if the broker does not acknowledge"
        f" it; {after}; deliveries ahead of their task id wait up to {w.pending_ttl_s:g}s"
        f" (at most {w.pending_max})"
    )


def build_config(data: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> Config:
    """Validate ``data`` (parsed YAML) with ``env`` overrides; raise ConfigError on any problem."""
    problems: list[str] = []
    merged: dict[str, Any] = _deep_copy(dict(data or {}))
    _apply_env(merged, env or {}, problems)
    config = _build(Config, merged, "", problems)
    if config is not None and not problems:
        _check(config, problems)
    if problems:
        raise ConfigError(problems)
    assert isinstance(config, Config)
    return config


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read a YAML file (or nothing) and build the config; raise ConfigError on problems."""
    env = os.environ if env is None else env
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML ({exc})"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: top level must be a mapping"])
    return build_config(data, env)


def _read_secret_file(path: str, key: str) -> str:
    """A secret mount's content, stripped; unreadable is a config error naming ``key``."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError([f"{key}: cannot read ({exc.strerror})"]) from None


def read_api_key(config: ApiConfig, env: Mapping[str, str]) -> str | None:
    """The API key from ``api_key_file`` (a secret mount) or the environment variable."""
    if config.api_key_file:
        return _read_secret_file(config.api_key_file, "api.api_key_file") or None
    return env.get(config.api_key_env) or None


def read_sasl_password(config: KafkaConfig) -> str | None:
    if config.sasl_password_file:
        return _read_secret_file(config.sasl_password_file, "kafka.sasl_password_file")
    return config.sasl_password


def read_webhook_secret(config: WebhooksConfig, env: Mapping[str, str]) -> str | None:
    """The webhook secret (``whsec_...``) from ``secret_file`` (a secret mount) or the
    environment variable; None when neither has one."""
    if config.secret_file:
        text = _read_secret_file(config.secret_file, "webhooks.secret_file")
    else:
        text = (env.get(config.secret_env) or "").strip()
    if text.removeprefix("whsec_") == "":
        return None
    return text
