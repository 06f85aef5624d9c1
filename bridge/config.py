"""Configuration: pydantic models, loaded from YAML plus ``BRIDGE_*`` environment overrides.

Pure: :func:`build_config` takes plain data and an environment mapping and either returns a
:class:`Config` or raises :class:`ConfigError` naming every bad key. Nothing here connects
to anything; ``wavespeed-bridge check-config`` is exactly this module.

Each field carries its own constraint (``PositiveInt``, ``Literal[...]``, a check beside it);
rules between fields are model validators. Values are checked strictly (a string is not an
integer, a boolean not a number); values from the environment are text, read as YAML scalars
first.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Protocol, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

ENV_PREFIX = "BRIDGE_"
ENV_SEPARATOR = "__"
# Read by the CLI as the config file path, not an override.
ENV_NOT_OVERRIDES = frozenset({"BRIDGE_CONFIG"})


class ConfigError(ValueError):
    """One or more configuration problems, each naming the offending key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


# --- checks beside the fields ---------------------------------------------------------------


def _invalid(message: str) -> PydanticCustomError:
    # The message goes in through the context: a template would read "{id}" as a placeholder.
    return PydanticCustomError("bridge", "{message}", {"message": message})


def _not_empty(why: str = "") -> AfterValidator:
    def check(text: str) -> str:
        if not text:
            raise _invalid("must not be empty" + why)
        return text

    return AfterValidator(check)


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise _invalid(f"must start with http:// or https://, got {url!r}")
    return url


def _absolute_uri(uri: str | None) -> str | None:
    # CloudEvents: dataschema is an absolute URI (RFC 3986): a scheme, then no spaces.
    if uri is not None and (
        not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", uri) or not uri.isascii()
    ):
        raise _invalid(f"must be an absolute URI such as https://..., got {uri!r}")
    return uri


def _result_path(path: str) -> str:
    if path.count("{id}") != 1 or not path.startswith("/"):
        raise _invalid("must start with / and contain {id} exactly once")
    return path


def _codec_here(codec: str | None) -> str | None:
    if codec is not None and codec not in available_codecs():
        raise _invalid(
            f"{codec} needs its codec library (cramjam, installed with wavespeed-bridge), which"
            " cannot be imported here; reinstall, or choose one of:"
            f" {', '.join(sorted(available_codecs()))}"
        )
    return codec


def _url_path(path: str) -> str:
    if (
        not path.startswith("/")
        or any(c in path for c in "?#%")
        or any(not c.isascii() or not c.isprintable() or c.isspace() for c in path)
    ):
        raise _invalid(
            f"must start with / and be printable ASCII without spaces, ?, # or %, got {path!r}"
        )
    return path


def _replay_window(seconds: float) -> float:
    if seconds > 3600:
        raise _invalid(
            "at most 3600 (WaveSpeed documents 300 s; a wide window widens the replay window)"
        )
    return seconds


def _tenant_key(spec: str | None) -> str | None:
    """``key``, ``header:<name>`` or ``json:<field>[.<field>...]``, or null (one tenant)."""
    if spec is None or spec == "key":
        return spec
    kind, _, where = spec.partition(":")
    if kind == "header" and where and where.isascii() and where.isprintable():
        return spec
    if kind == "json" and where and all(part.strip() for part in where.split(".")):
        return spec
    raise _invalid(
        f"must be key, header:<name> or json:<field>[.<field>...] (e.g. json:metadata.tenant),"
        f" got {spec!r}"
    )


Port = Annotated[int, Field(ge=1, le=65535)]
Weight = Annotated[float, Field(gt=0)]
Cap = Annotated[float, Field(ge=1)]


# --- rules between fields -------------------------------------------------------------------


class _Rule(NamedTuple):
    holds: bool
    key: str  # the dotted key the message is about
    message: str
    reads: tuple[str, ...] = ()  # the other keys it depends on


class _Checking:
    """build_config's validation context: broken rules are collected here instead of raised,
    so that the model breaking one still stands and the rules around it are checked too.

    ``failed``: keys whose values failed their own checks; a rule reading one is not judged.
    """

    def __init__(self, failed: frozenset[str] = frozenset()) -> None:
        self.failed = failed
        self.problems: list[str] = []

    def reads_failed(self, rule: _Rule) -> bool:
        return any(
            key == bad or key.startswith((bad + ".", bad + "["))
            for key in (rule.key, *rule.reads)
            for bad in self.failed
        )


def _enforce(info: ValidationInfo, *rules: _Rule) -> None:
    broken = [rule for rule in rules if not rule.holds]
    checking = info.context
    if isinstance(checking, _Checking):
        checking.problems += [
            f"{r.key}: {r.message}" for r in broken if not checking.reads_failed(r)
        ]
    elif broken:  # a section made in code
        raise _invalid("; ".join(f"{r.key}: {r.message}" for r in broken))


# --- the sections ---------------------------------------------------------------------------

# Strict: YAML's types are the setting's (no "5" for 5, no true for 1).
_SECTION = ConfigDict(strict=True, frozen=True, extra="forbid")


class KafkaConfig(BaseModel):
    model_config = _SECTION

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
    session_timeout_ms: PositiveInt = 10_000
    heartbeat_interval_ms: PositiveInt = 3_000
    max_poll_interval_ms: PositiveInt = 300_000
    # How long the coordinator waits for every member to rejoin in a rebalance.
    rebalance_timeout_ms: PositiveInt = 60_000
    request_timeout_ms: PositiveInt = 30_000
    fetch_max_records: PositiveInt = 500
    max_message_bytes: PositiveInt = 1_048_576
    # 0: a batch goes out as soon as the sender is free.
    linger_ms: NonNegativeInt = 5
    # Idempotent producer (acks=all): broker-side retries never duplicate or reorder an event.
    enable_idempotence: bool = True
    # The brokers' offset.metadata.max.bytes: the offset map in each commit stays below it.
    offset_metadata_max_bytes: PositiveInt = 4096
    # Exactly-once: transactional ids are <prefix>-<input topic>-<partition>; default group_id.
    transactional_id_prefix: str | None = None
    compression_type: Annotated[
        Literal["gzip", "snappy", "lz4", "zstd"] | None, AfterValidator(_codec_here)
    ] = None
    commit_interval_s: PositiveFloat = 1.0
    # Exactly once: the broker aborts a transaction open longer than this. It bounds how long
    # a member that died mid-transaction holds back read_committed subscribers when no
    # other member takes its partitions over (which aborts at once).
    transaction_timeout_ms: PositiveInt = 60_000
    health_check_interval_s: PositiveFloat = 5.0

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> Self:
        sasl = self.security_protocol.startswith("SASL")
        outputs = ("completed_topic", "failed_topic", "dead_letter_topic", "timeout_topic")
        _enforce(
            info,
            _Rule(
                self.heartbeat_interval_ms < self.session_timeout_ms,
                "kafka.heartbeat_interval_ms",
                "must be below kafka.session_timeout_ms",
                ("kafka.session_timeout_ms",),
            ),
            _Rule(
                not sasl or self.sasl_mechanism is not None,
                "kafka.sasl_mechanism",
                "required when security_protocol is SASL_*",
                ("kafka.security_protocol",),
            ),
            _Rule(
                not sasl or bool(self.sasl_username),
                "kafka.sasl_username",
                "required when security_protocol is SASL_*",
                ("kafka.security_protocol",),
            ),
            _Rule(
                not sasl or self.sasl_password is not None or self.sasl_password_file is not None,
                "kafka.sasl_password",
                "required (or kafka.sasl_password_file) when security_protocol is SASL_*",
                ("kafka.security_protocol", "kafka.sasl_password_file"),
            ),
            _Rule(
                # A transaction lives one commit interval and its commit (up to 10 s).
                self.transaction_timeout_ms >= self.commit_interval_s * 1000 + 10_000,
                "kafka.transaction_timeout_ms",
                "must be at least kafka.commit_interval_s + 10 s (a transaction's life)",
                ("kafka.commit_interval_s",),
            ),
            _Rule(
                self.input_topic not in [getattr(self, name) for name in outputs],
                "kafka.input_topic",
                "must differ from every output topic",
                tuple(f"kafka.{name}" for name in outputs),
            ),
        )
        return self


class ApiConfig(BaseModel):
    model_config = _SECTION

    base_url: Annotated[str, AfterValidator(_http_url)] = "https://api.wavespeed.ai"
    # The seed page's path; the official SDKs use /api/v3/predictions/{id}/result.
    result_path: Annotated[str, AfterValidator(_result_path)] = "/api/v3/predictions/{id}"
    api_key_file: str | None = None
    api_key_env: str = "WAVESPEED_API_KEY"
    connect_timeout_s: PositiveFloat = 5.0
    read_timeout_s: PositiveFloat = 10.0
    # Whole request, connect to last byte: the read timeout restarts with every chunk.
    total_timeout_s: PositiveFloat = 15.0
    max_concurrent_requests: PositiveInt = 100
    max_response_bytes: PositiveInt = 1_048_576
    verify_tls: bool = True
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # The poll budget in requests/s; 0 disables it. budget_scope "account": the account's,
    # shared by every replica through cluster.coordination_topic; "replica": each one's own.
    requests_per_second: NonNegativeFloat = 0.0
    budget_scope: Literal["account", "replica"] = "account"
    # 0: one second's worth of the budget.
    budget_burst: NonNegativeInt = 0
    # A 401/403 pauses every poll this long (0 would let each task retry a rejected key).
    auth_error_pause_s: PositiveFloat = 30.0
    user_agent: str = "wavespeed-bridge"


class ModelClass(BaseModel):
    """Defaults for models whose names match ``pattern`` (fnmatch syntax)."""

    model_config = _SECTION

    pattern: str
    min_interval_s: PositiveFloat = 2.0
    max_interval_s: PositiveFloat = 30.0
    median_s: PositiveFloat = 5.0
    p90_s: PositiveFloat = 15.0


class PollingConfig(BaseModel):
    model_config = _SECTION

    policy: Literal["fixed", "adaptive"] = "fixed"
    interval_s: PositiveFloat = 2.0
    default_timeout_s: PositiveFloat = 300.0
    max_timeout_s: PositiveFloat = 86_400.0
    max_in_flight: PositiveInt = 10_000
    backoff_base_s: PositiveFloat = 1.0
    backoff_max_s: PositiveFloat = 30.0
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Adaptive policy: weight of one poll against one second of detection delay.
    poll_cost_s: PositiveFloat = 0.5
    learning_window: PositiveInt = 200
    # Adaptive policy: models learned at once; the least recently used is forgotten.
    max_models: PositiveInt = 1000
    # Not strict: YAML gives a list.
    model_classes: Annotated[tuple[ModelClass, ...], Field(strict=False)] = (
        ModelClass(
            pattern="*video*", min_interval_s=5.0, max_interval_s=60.0, median_s=120.0, p90_s=300.0
        ),
        ModelClass(pattern="*", min_interval_s=2.0, max_interval_s=30.0, median_s=5.0, p90_s=15.0),
    )
    max_model_labels: PositiveInt = 200

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> Self:
        classes = [(f"polling.model_classes[{i}]", mc) for i, mc in enumerate(self.model_classes)]
        _enforce(
            info,
            _Rule(
                self.default_timeout_s <= self.max_timeout_s,
                "polling.default_timeout_s",
                "must not exceed polling.max_timeout_s",
                ("polling.max_timeout_s",),
            ),
            _Rule(
                self.backoff_base_s <= self.backoff_max_s,
                "polling.backoff_base_s",
                "must not exceed polling.backoff_max_s",
                ("polling.backoff_max_s",),
            ),
            *(
                _Rule(
                    mc.min_interval_s <= mc.max_interval_s,
                    key,
                    "need 0 < min_interval_s <= max_interval_s",
                    (f"{key}.min_interval_s", f"{key}.max_interval_s"),
                )
                for key, mc in classes
            ),
            *(
                _Rule(
                    mc.median_s < mc.p90_s,
                    key,
                    "need 0 < median_s < p90_s",
                    (f"{key}.median_s", f"{key}.p90_s"),
                )
                for key, mc in classes
            ),
        )
        return self


class ServerConfig(BaseModel):
    model_config = _SECTION

    host: str = "127.0.0.1"
    port: Port = 9464


class LoggingConfig(BaseModel):
    model_config = _SECTION

    format: Literal["json", "console"] = "json"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class EventsConfig(BaseModel):
    model_config = _SECTION

    source: Annotated[str, _not_empty(" (CloudEvents requires a source)")] = "urn:wavespeed-bridge"
    # CloudEvents Kafka binding content mode: one JSON object per record, or ce_* headers
    # with the data as the value (what Knative's Kafka source and sink also accept).
    mode: Literal["structured", "binary"] = "structured"
    # Input headers whose value is not UTF-8 text: dropped from the event (and counted), or
    # kept, which the official CloudEvents SDK (Python, 1.x and 2.x) cannot read.
    binary_headers: Literal["drop", "keep"] = "drop"
    # The CloudEvents dataschema attribute: where subscribers find the schema of ``data`` (a
    # registry or catalogue URL); unset, the stable URI of the schema version the bridge writes.
    dataschema: Annotated[str | None, AfterValidator(_absolute_uri)] = None
    # How long WaveSpeed keeps a prediction's outputs after its created_at (7 days): a
    # completed event's data.expires_at.
    output_retention_s: PositiveFloat = 7 * 86_400.0


class WebhooksConfig(BaseModel):
    """The receiver for WaveSpeed's signed webhook deliveries (off by default)."""

    model_config = _SECTION

    enabled: bool = False
    # Loopback unless told otherwise, like server.host; the Helm chart sets 0.0.0.0.
    host: Annotated[str, _not_empty()] = "127.0.0.1"
    # 0 (any free port) is for receivers made in code; a config must name one (Config's rules).
    port: Annotated[int, Field(ge=0, le=65535)] = 9465
    path: Annotated[str, AfterValidator(_url_path)] = "/webhooks/wavespeed"
    # The account's webhook secret (GET /api/v3/webhook/secret, "whsec_..."): from the file
    # if given (a secret mount), else from this environment variable.
    secret_env: str = "WAVESPEED_WEBHOOK_SECRET"  # noqa: S105 (a variable name)
    secret_file: str | None = None
    # Verified deliveries are produced here (acks=all) before the sender gets its 2xx.
    topic: Annotated[str, _not_empty()] = "wavespeed.webhooks"
    max_body_bytes: PositiveInt = 262_144
    # Signed timestamps older (or further ahead) than this are refused; WaveSpeed's 300 s.
    tolerance_s: Annotated[PositiveFloat, AfterValidator(_replay_window)] = 300.0
    # The whole body must arrive within this (slow senders cannot hold a slot for long).
    read_timeout_s: PositiveFloat = 10.0
    # The broker must acknowledge a delivery within this, else 503 and the sender retries.
    publish_timeout_s: PositiveFloat = 10.0
    # Requests handled at once; more get 503 (bounds memory at this x max_body_bytes).
    max_concurrent_requests: PositiveInt = 256
    # Webhook-ids remembered for replay detection (each until its timestamp is stale).
    replay_max_ids: PositiveInt = 100_000
    # false: a verified terminal delivery finishes its task; true: it triggers one poll.
    confirm_by_poll: bool = False
    # Deliveries for task ids not consumed yet: how many are remembered, and how long.
    pending_max: PositiveInt = 10_000
    pending_ttl_s: PositiveFloat = 3600.0

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> Self:
        _enforce(
            info,
            _Rule(
                not self.enabled or bool(self.secret_file) or bool(self.secret_env),
                "webhooks.secret_env",
                "required (or webhooks.secret_file) when enabled",
                ("webhooks.enabled", "webhooks.secret_file"),
            ),
        )
        return self


class TenantRule(BaseModel):
    """One tenant's weight (its share against the others', default 1) and caps."""

    model_config = _SECTION

    tenant: Annotated[str, _not_empty()]
    weight: Weight = 1.0
    # Requests per second it may send, whatever its share (null: no cap of its own).
    requests_per_second: Cap | None = None
    # Tasks it may have polled at once, whatever its share.
    max_in_flight: Annotated[int, Field(ge=1)] | None = None


class TenantsConfig(BaseModel):
    """Many customers on one input topic: fair shares of the budget and the in-flight slots."""

    model_config = _SECTION

    # Where a task's tenant is read: key | header:<name> | json:<field>[.<field>...] of the
    # input object; null: one tenant, as before tenants existed.
    key: Annotated[str | None, AfterValidator(_tenant_key)] = None
    # A task whose key is missing or unreadable belongs to this one (and is counted).
    default: Annotated[str, _not_empty()] = "default"
    # Tenants with a weight other than 1 or caps of their own; the rest weigh 1.
    rules: Annotated[tuple[TenantRule, ...], Field(strict=False)] = ()
    # Records of tenants over their share wait here, unpolled (committed offsets stay below
    # them); past this many, fetching pauses for everyone.
    max_held: PositiveInt = 100_000
    # Tenants named in metrics (those configured above, then the busiest); the rest "other".
    max_labels: PositiveInt = 20

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> Self:
        names = [r.tenant for r in self.rules]
        _enforce(
            info,
            _Rule(
                len(set(names)) == len(names),
                "tenants.rules",
                "each tenant at most once",
            ),
        )
        return self

    def rule(self, tenant: str) -> TenantRule | None:
        return next((r for r in self.rules if r.tenant == tenant), None)


class TracingConfig(BaseModel):
    """OpenTelemetry traces; where they go and how many are kept: the OTEL_* environment."""

    model_config = _SECTION

    enabled: bool = False


class ClusterConfig(BaseModel):
    """What the replicas of one deployment (one WaveSpeed account) share through Kafka."""

    model_config = _SECTION

    # The budget's shares and the pauses a 429 starts (null: none; with budget_scope
    # account, every replica then keeps to fallback_share). One partition is enough.
    coordination_topic: str | None = "wavespeed.bridge.coordination"
    # What replicas learned (completion times per model, webhook statistics), kept across
    # restarts: a compacted topic (null: every replica learns alone and starts cold).
    state_topic: str | None = "wavespeed.bridge.state"
    # How often a replica reports its demand and reads the others' (s).
    report_interval_s: Annotated[float, Field(gt=0, le=10)] = 0.5
    # The share of the account's budget a replica keeps to while it cannot coordinate.
    fallback_share: Annotated[float, Field(gt=0, le=1)] = 0.25
    # How often learned state is published (s), for models that learned something since.
    state_interval_s: PositiveFloat = 30.0


class Config(BaseModel):
    """The whole configuration: :func:`load_config` and :func:`build_config` make one."""

    model_config = _SECTION

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    polling: PollingConfig = Field(default_factory=PollingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tenants: TenantsConfig = Field(default_factory=TenantsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    shutdown_grace_s: PositiveFloat = 20.0

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> Self:
        k, w = self.kafka, self.webhooks
        kafka_topics = ("input_topic", "completed_topic", "failed_topic", "dead_letter_topic")
        others = [w.topic, *(getattr(k, name) for name in (*kafka_topics, "timeout_topic"))]
        _enforce(
            info,
            _Rule(
                self.delivery != "exactly_once" or k.enable_idempotence,
                "delivery",
                "exactly_once needs kafka.enable_idempotence: true (transactions are"
                " idempotent); brokers without them (Tansu) need delivery: at_least_once",
                ("kafka.enable_idempotence",),
            ),
            _Rule(w.port != 0, "webhooks.port", "must be >= 1, got 0"),
            _Rule(
                not w.enabled or w.port != self.server.port,
                "webhooks.port",
                "must differ from server.port (the metrics server's)",
                ("webhooks.enabled", "server.port"),
            ),
            _Rule(
                w.topic not in [getattr(k, name) for name in (*kafka_topics, "timeout_topic")],
                "webhooks.topic",
                "must differ from kafka's input and output topics",
                tuple(f"kafka.{name}" for name in (*kafka_topics, "timeout_topic")),
            ),
            _Rule(
                not w.enabled or w.max_body_bytes <= k.max_message_bytes,
                "webhooks.max_body_bytes",
                f"must not exceed kafka.max_message_bytes ({k.max_message_bytes}): a delivery"
                " is produced to webhooks.topic as it came",
                ("webhooks.enabled", "kafka.max_message_bytes"),
            ),
            *(
                _Rule(
                    topic is None or topic not in taken,
                    f"cluster.{key}",
                    "must differ from the kafka, webhook and other cluster topics",
                )
                for key, topic, taken in (
                    ("coordination_topic", self.cluster.coordination_topic, others),
                    (
                        "state_topic",
                        self.cluster.state_topic,
                        [*others, self.cluster.coordination_topic],
                    ),
                )
            ),
        )
        return self


# --- environment overrides ------------------------------------------------------------------


class _Overrides(Protocol):
    problems: list[str]  # prefixed names that name no setting

    def __call__(self) -> dict[str, Any]: ...


@functools.cache
def _env_source() -> Callable[[Mapping[str, str]], _Overrides]:
    """The settings source for ``BRIDGE_*`` overrides, built on first use: pydantic-settings
    loads asyncio and logging, which bridge.core (it imports Config) must not
    (tests/test_layout.py)."""
    from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
    from pydantic_settings.sources.types import EnvNoneType
    from pydantic_settings.sources.utils import parse_env_vars

    class Environment(Config, BaseSettings):
        """Config's fields as pydantic-settings reads them from the environment: BRIDGE_ and
        the dotted key with __ for its dots, in any case; an empty value is null.

        Config itself stays a plain model, validated as given: a BaseSettings gathers its
        sources in ``__init__`` on every validation, without the validation context, and
        would match the file's keys in any case.
        """

        # Not strict: pydantic-settings would then convert the text itself; from_text does.
        model_config = SettingsConfigDict(
            strict=False,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter=ENV_SEPARATOR,
            case_sensitive=False,
            env_parse_none_str="",
        )

    def from_text(value: Any, tp: Any) -> Any:
        """Environment text as the setting of type ``tp`` takes it."""
        if isinstance(value, dict) and _is_model(tp):
            fields = tp.model_fields
            return {
                k: from_text(v, fields[k].annotation if k in fields else None)
                for k, v in value.items()
            }
        text_setting = tp is str or set(typing.get_args(tp)) == {str, type(None)}
        # EnvNoneType: an empty value, which pydantic-settings turns into null.
        if not isinstance(value, str) or isinstance(value, EnvNoneType) or text_setting:
            return value
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value

    class EnvOverrides(EnvSettingsSource):
        """``BRIDGE_KAFKA__BOOTSTRAP_SERVERS=x`` sets ``kafka.bootstrap_servers``, read from
        the mapping given rather than ``os.environ``.

        A string setting takes the value verbatim (a password ``123456`` stays a string);
        any other is parsed as YAML, so ``8080`` is an integer and ``true`` a boolean.
        """

        def __init__(self, env: Mapping[str, str]) -> None:
            self._env = env
            self.problems: list[str] = []
            super().__init__(Environment)

        def _load_env_vars(self) -> Mapping[str, str | None]:
            env_vars = parse_env_vars(
                self._env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
            )
            return {name: value for name, value in sorted(env_vars.items()) if self._places(name)}

        def _places(self, name: str) -> bool:
            """Whether ``name`` is an override (pydantic-settings skips a stray one silently)."""
            prefix = self.env_prefix.lower()
            if not name.startswith(prefix) or name.upper() in ENV_NOT_OVERRIDES:
                return False
            path = name[len(prefix) :].split(ENV_SEPARATOR)
            field = Config.model_fields.get(path[0])
            if not all(path):
                self.problems.append(f"{name.upper()}: malformed override name")
            elif field is None:
                self.problems.append(f"{path[0]}: unknown key")
            elif len(path) > 1 and not _is_model(field.annotation):
                self.problems.append(f"{name.upper()}: {path[0]} is not a section")
            else:
                return True
            return False

        def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
            # A whole section or list in one variable: YAML, as the config file is.
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError:
                return value

        def prepare_field_value(
            self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
        ) -> Any:
            prepared = super().prepare_field_value(field_name, field, value, value_is_complex)
            return from_text(prepared, field.annotation)

    return EnvOverrides


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


# --- validation and its messages ------------------------------------------------------------


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        below = merged.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            value = _merge(below, value)
        merged[key] = value
    return merged


def _dotted(loc: tuple[int | str, ...]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else part
    return key


def _type_at(loc: tuple[int | str, ...]) -> Any:
    """The declared type at a pydantic error location, or None."""
    tp: Any = Config
    for part in loc:
        if isinstance(part, int) and typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
        elif isinstance(part, str) and _is_model(tp) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return None
    return tp


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
    if _is_model(tp):
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, str(tp))


_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _message(error: ErrorDetails) -> str:
    kind, value = error["type"], error["input"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "bridge":
        return error["msg"]
    tp = _type_at(error["loc"])
    if kind in _BOUNDS:
        if tp is float and isinstance(value, int):
            value = float(value)
        (limit,) = (error.get("ctx") or {}).values()
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # "> 0", as declared, not "> 0.0"
        return f"must be {_BOUNDS[kind]} {limit}, got {value!r}"
    return f"expected {_type_name(tp)}, got {value!r}"


def _prune(data: dict[str, Any], locs: list[tuple[int | str, ...]]) -> dict[str, Any]:
    """A copy of ``data`` without the values at ``locs`` (list items stay, for the indexes)."""
    pruned = copy.deepcopy(data)
    for *path, last in locs:
        node: Any = pruned
        with contextlib.suppress(LookupError, TypeError):  # a path into a value of a wrong type
            for part in path:
                node = node[part]
            if isinstance(node, dict):
                node.pop(last, None)
    return pruned


def build_config(data: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> Config:
    """Validate ``data`` (parsed YAML) with the ``BRIDGE_*`` overrides in ``env`` (default:
    ``os.environ``); raise ConfigError naming every problem."""
    overrides = _env_source()(os.environ if env is None else env)
    merged = _merge(data or {}, overrides())
    checking = _Checking()
    try:
        config = Config.model_validate(merged, context=checking)
    except ValidationError as exc:
        errors = exc.errors()
        problems = [f"{_dotted(e['loc'])}: {_message(e)}" for e in errors]
        # Pydantic judges a model's rules once its fields are valid: judge them again with
        # each failed value left out (its default in its place), except those that read one.
        locs = [e["loc"] for e in errors]
        checking = _Checking(frozenset(_dotted(loc) for loc in locs))
        # What cannot be left out (a required key) fails again, and is reported above.
        with contextlib.suppress(ValidationError):
            Config.model_validate(_prune(merged, locs), context=checking)
        raise ConfigError(overrides.problems + problems + checking.problems) from None
    if overrides.problems or checking.problems:
        raise ConfigError(overrides.problems + checking.problems)
    return config


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read a YAML file (or nothing) and build the config; raise ConfigError on problems."""
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


# --- what the settings mean ------------------------------------------------------------------


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
    from bridge.core.events import DEFAULT_DATASCHEMA

    days = config.events.output_retention_s / 86_400
    lines.append(
        f"contract   dataschema {config.events.dataschema or DEFAULT_DATASCHEMA}; completed"
        f" events expire {days:g} days after created_at (data.expires_at,"
        " events.output_retention_s); the AsyncAPI document: wavespeed-bridge asyncapi"
    )
    if config.delivery == "exactly_once":
        prefix = k.transactional_id_prefix or k.group_id
        lines.append(
            "delivery   exactly_once: one transaction per input partition carries its events"
            " and its offset (with the offset map), committed so that no event waits longer"
            " than kafka.commit_interval_s for it; subscribers reading"
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
