"""The bridge's contract for one deployment, as an AsyncAPI 3.0 document. Pure.

:func:`document` describes what a bridge running with a given config reads and writes: the
Kafka servers (with the security scheme the config implies), a channel per configured topic
and the webhook receiver, the operations (the consumer group, what is sent where) and every
message's key, headers and value, in the configured CloudEvents content mode.

The event schema is never copied here: it is read from ``bridge/schemas/event.schema.json``
each time and embedded under ``components.schemas``. AsyncAPI tools read payloads as AsyncAPI
Schema Objects (a superset of JSON Schema draft-07: ``@asyncapi/parser`` knows no 2020-12
``schemaFormat``) and resolve every ``$ref`` against the whole document, ignoring ``$id``, so
the schema's own ``#/$defs/...`` and ``#anchor`` references would point nowhere. Its
``$defs`` are therefore lifted to sibling entries (``PredictionEvent.data``) and its
references rewritten to document pointers; ``$id`` and ``$schema`` are left out (the ``$id``
is kept as the schema's ``externalDocs`` URL). A keyword draft-07 readers do not know
(``prefixItems``, ``unevaluatedProperties``, ...) would be silently ignored by them, so it
raises :class:`ValueError` instead.

The output depends only on the config and the schema file, with a stable key order, so a
committed copy (``docs/asyncapi.yaml``) can be compared.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any, Literal

import yaml

from bridge import __version__
from bridge.config import Config
from bridge.core import events as ev
from bridge.core.messages import (
    DEAD_LETTER_REASONS,
    MAX_MODEL_LENGTH,
    TASK_ID_PATTERN,
)
from bridge.core.outcomes import FAILED_STATUSES
from bridge.core.webhook_signature import (
    APPLIED_BY_HEADER,
    ID_HEADER,
    RECEIVED_AT_HEADER,
    RECEIVED_BY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
)

Doc = dict[str, Any]
Format = Literal["yaml", "json"]

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
HTTP_BINDING_VERSION = "0.3.0"
EVENT_SCHEMA = "PredictionEvent"  # components.schemas name of the whole CloudEvent
SCHEMAS = "#/components/schemas/"
TASK_ID = f"^{TASK_ID_PATTERN}$"
# JSON Schema keywords after draft-07 that change validation: draft-07 readers skip them.
_LATER_KEYWORDS = frozenset(
    {
        "prefixItems",
        "unevaluatedItems",
        "unevaluatedProperties",
        "dependentRequired",
        "dependentSchemas",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$recursiveAnchor",
    }
)
_KINDS: tuple[ev.EventType, ...] = ("completed", "failed", "timeout")
# data.status per event type (build_event): a failure keeps the status the API reported.
_STATUSES: dict[str, list[str]] = {
    "completed": ["completed"],
    "failed": sorted({"failed", *FAILED_STATUSES}),
    "timeout": ["timeout"],
}


def load_event_schema() -> Doc:
    """``bridge/schemas/event.schema.json`` as shipped in the package."""
    text = resources.files("bridge").joinpath("schemas/event.schema.json").read_text("utf-8")
    schema: Doc = json.loads(text)
    return schema


def render(doc: Doc, fmt: Format = "yaml") -> str:
    """The document as YAML (block style, no aliases) or JSON, in its own key order."""
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    return yaml.dump(
        doc,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
        default_flow_style=False,
    )


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a repeated schema written out again, never as &id001 / *id001


def document(config: Config, event_schema: Doc | None = None) -> Doc:
    """The AsyncAPI 3.0 document for a bridge running with ``config``; ``event_schema``
    (default: the packaged one) is embedded under ``components.schemas``."""
    schemas, data_ref = embed_event_schema(
        load_event_schema() if event_schema is None else event_schema
    )
    return _Builder(config, schemas, data_ref).build()


# --- the event schema, embedded -------------------------------------------------------------


def embed_event_schema(schema: Doc, name: str = EVENT_SCHEMA) -> tuple[dict[str, Doc], str]:
    """``components.schemas`` entries for the event schema (``name`` and one per ``$defs``
    entry, ``name.<def>``), with references rewritten to document pointers; and the
    reference of the event's ``data`` schema (binary mode's value)."""
    schema = copy.deepcopy(schema)
    defs: Doc = schema.pop("$defs", {})
    anchors: dict[str, str] = {}  # $anchor → its JSON pointer in the schema file

    def place(pointer: str) -> str:
        """A JSON pointer in the schema file → the same place in the document."""
        parts = pointer.split("/")[1:] if pointer else []
        if len(parts) >= 2 and parts[0] == "$defs":
            head = f"{name}.{_unescape(parts[1])}"
            return "/".join([SCHEMAS[1:] + head, *parts[2:]])
        return "/".join([SCHEMAS[1:] + name, *parts])

    def collect(node: Any, pointer: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$anchor"), str):
                anchors[node["$anchor"]] = pointer
            for key, value in node.items():
                collect(value, f"{pointer}/{_escape(key)}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                collect(value, f"{pointer}/{i}")

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            later = _LATER_KEYWORDS & node.keys()
            if later:
                raise ValueError(
                    f"the event schema uses {sorted(later)}, which AsyncAPI (JSON Schema"
                    " draft-07) readers ignore; describe it without them"
                )
            out = {k: rewrite(v) for k, v in node.items() if k not in ("$anchor", "$id")}
            if isinstance(node.get("$ref"), str):
                out["$ref"] = resolve(node["$ref"])
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    def resolve(ref: str) -> str:
        if ref == "#" or ref.startswith("#/"):
            return "#" + place(ref[1:])
        if ref.startswith("#") and ref[1:] in anchors:
            return "#" + place(anchors[ref[1:]])
        raise ValueError(f"the event schema refers to {ref!r}: only its own parts can be embedded")

    collect(schema, "")
    for key, value in defs.items():
        collect(value, f"/$defs/{_escape(key)}")
    schema_id = schema.pop("$id", None)
    schema.pop("$schema", None)
    root = rewrite(schema)
    if isinstance(schema_id, str):
        root["externalDocs"] = {
            "description": "The JSON Schema this is taken from (its $id).",
            "url": schema_id,
        }
    out = {name: root}
    for key, value in defs.items():
        out[f"{name}.{key}"] = rewrite(value)
    data = schema.get("properties", {}).get("data", {})
    data_ref = resolve(data["$ref"]) if "$ref" in data else f"{SCHEMAS}{name}/properties/data"
    return out, data_ref


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


# --- the document ---------------------------------------------------------------------------


def _ref(pointer: str) -> Doc:
    return {"$ref": pointer}


def _kafka_binding(**fields: Any) -> Doc:
    return {"kafka": {**fields, "bindingVersion": KAFKA_BINDING_VERSION}}


def _const(value: str, description: str | None = None) -> Doc:
    schema: Doc = {"type": "string", "const": value}
    if description:
        schema["description"] = description
    return schema


def _digits(description: str) -> Doc:
    return {"type": "string", "pattern": "^[0-9]+$", "description": description}


class _Builder:
    def __init__(self, config: Config, event_schemas: dict[str, Doc], data_ref: str) -> None:
        self.config = config
        self.k = config.kafka
        self.event_schemas = event_schemas
        self.data_ref = data_ref
        self.servers: Doc = {}
        self.channels: Doc = {}
        self.operations: Doc = {}
        self.messages: Doc = {}
        self.schemas: Doc = {}
        self.security: Doc = {}
        self.kafka_servers: list[Doc] = []

    def build(self) -> Doc:
        self._kafka_servers()
        self._input()
        self._events()
        self._dead_letters()
        if self.config.webhooks.enabled:
            self._webhooks()
        components: Doc = {
            "schemas": {**self.schemas, **self.event_schemas},
            "messages": self.messages,
        }
        if self.security:
            components["securitySchemes"] = self.security
        return {
            "asyncapi": ASYNCAPI_VERSION,
            "info": self._info(),
            "defaultContentType": "application/json",
            "servers": self.servers,
            "channels": self.channels,
            "operations": self.operations,
            "components": components,
        }

    def _info(self) -> Doc:
        c, k = self.config, self.k
        delivery = (
            "exactly once: events and input offsets commit in one Kafka transaction per input"
            " partition, so subscribers read with isolation.level=read_committed"
            if c.delivery == "exactly_once"
            else "at least once: an event published again after a crash or a rebalance has"
            " the same source and id, so subscribers deduplicate on them"
        )
        return {
            "title": "wavespeed-bridge",
            "version": __version__,
            "description": (
                "The Kafka contract of one wavespeed-bridge deployment, generated from its"
                " config (`wavespeed-bridge asyncapi --config FILE`). The bridge consumes"
                f" WaveSpeedAI task ids from `{k.input_topic}` (consumer group"
                f" `{k.group_id}`), polls the WaveSpeedAI API for each until it is done, and"
                " publishes one CloudEvent 1.0 per task (CloudEvents Kafka protocol binding,"
                f" {c.events.mode} content mode, source `{c.events.source}`); input it cannot"
                f" read goes to `{k.dead_letter_topic}`. Delivery: {delivery}."
            ),
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        }

    # --- servers ----------------------------------------------------------------------------

    def _kafka_servers(self) -> None:
        k = self.k
        tls = k.security_protocol in ("SSL", "SASL_SSL")
        hosts = [h.strip() for h in k.bootstrap_servers.split(",") if h.strip()]
        security: list[Doc] = []
        how = "no authentication"
        if k.security_protocol.startswith("SASL") and k.sasl_mechanism is not None:
            scheme = {"PLAIN": "plain", "SCRAM-SHA-256": "scramSha256"}.get(
                k.sasl_mechanism, "scramSha512"
            )
            self.security["kafkaSasl"] = {
                "type": scheme,
                "description": (
                    f"SASL/{k.sasl_mechanism} over {'TLS' if tls else 'plaintext'}"
                    f" (kafka.security_protocol {k.security_protocol}); the bridge's user is"
                    " kafka.sasl_username, its password kafka.sasl_password or"
                    " kafka.sasl_password_file."
                ),
            }
            security.append(_ref("#/components/securitySchemes/kafkaSasl"))
            how = f"SASL/{k.sasl_mechanism}"
        if tls:
            # The bridge verifies the brokers' certificates but presents none of its own, so
            # TLS is the protocol (kafka-secure) and no X509 client authentication.
            ca = k.ssl_cafile or "the system trust store"
            how += (
                f"; TLS, the brokers' certificates verified against {ca}"
                f" (hostname check {'on' if k.ssl_check_hostname else 'off'})"
            )
        for i, host in enumerate(hosts, 1):
            name = f"bootstrap-{i}"
            server: Doc = {
                "host": host,
                "protocol": "kafka-secure" if tls else "kafka",
                "title": f"Kafka bootstrap server {host}",
                "description": (f"One of kafka.bootstrap_servers ({k.security_protocol}: {how})."),
            }
            if security:
                server["security"] = copy.deepcopy(security)
            self.servers[name] = server
            self.kafka_servers.append(_ref(f"#/servers/{name}"))

    def _kafka_channel(self, cid: str, topic: str, description: str, messages: list[str]) -> None:
        self.channels[cid] = {
            "address": topic,
            "title": topic,
            "description": description,
            "servers": copy.deepcopy(self.kafka_servers),
            "messages": {m: _ref(f"#/components/messages/{m}") for m in messages},
            # Partitions are the topic's own (created outside the bridge): not stated here.
            "bindings": _kafka_binding(topic=topic),
        }

    def _operation(
        self, oid: str, action: str, cid: str, messages: list[str], summary: str, **more: Any
    ) -> None:
        self.operations[oid] = {
            "action": action,
            "channel": _ref(f"#/channels/{cid}"),
            "summary": summary,
            "messages": [_ref(f"#/channels/{cid}/messages/{m}") for m in messages],
            **more,
        }

    # --- input ------------------------------------------------------------------------------

    def _input(self) -> None:
        c, k = self.config, self.k
        self.schemas["TaskId"] = {
            "type": "string",
            "pattern": TASK_ID,
            "description": "A WaveSpeedAI prediction id: percent-encoded into the result path.",
        }
        self.schemas["TaskRequest"] = {
            "type": "object",
            "description": (
                "A task as a JSON object: `id` (or `task_id`) and optional fields; unknown keys"
                " are ignored, so WaveSpeedAI's submit response (its `data` object) can be"
                " forwarded unchanged."
            ),
            # The parser takes id when present (whatever its type), else task_id.
            "anyOf": [
                {"required": ["id"], "properties": {"id": _ref(SCHEMAS + "TaskId")}},
                {
                    "required": ["task_id"],
                    "not": {"required": ["id"]},
                    "properties": {"task_id": _ref(SCHEMAS + "TaskId")},
                },
            ],
            "properties": {
                "model": {
                    "type": ["string", "null"],
                    "maxLength": MAX_MODEL_LENGTH,
                    "description": "The model, until the API reports it.",
                },
                "timeout_s": {
                    "type": ["number", "null"],
                    "exclusiveMinimum": 0,
                    "maximum": c.polling.max_timeout_s,
                    "description": (
                        "Seconds from created_at to the task's deadline (default"
                        f" polling.default_timeout_s, {c.polling.default_timeout_s:g});"
                        f" at most polling.max_timeout_s ({c.polling.max_timeout_s:g})."
                    ),
                },
                "created_at": {
                    "type": ["string", "number", "null"],
                    "description": (
                        "When the task was submitted: RFC 3339 with a zone, or unix seconds;"
                        " the earliest of this, the record timestamp and the API's counts. A"
                        " value that is neither is ignored."
                    ),
                },
                "metadata": {
                    "type": ["object", "null"],
                    "description": (
                        "Carried unchanged to the event's data.metadata (at most 32 levels"
                        " deep, no NaN or lone surrogates)."
                    ),
                },
            },
        }
        self.schemas["SubmitResponse"] = {
            "type": "object",
            "description": "WaveSpeedAI's submit response envelope, forwarded whole.",
            "required": ["data"],
            "not": {"anyOf": [{"required": ["id"]}, {"required": ["task_id"]}]},
            "properties": {"data": _ref(SCHEMAS + "TaskRequest")},
        }
        headers: Doc = {
            "type": "object",
            "description": (
                "Every header is carried to the task's event (see the events' header rule);"
                " dead letters keep them all."
            ),
            "properties": {
                "traceparent": {
                    "type": "string",
                    "description": "W3C trace context: the event continues this trace.",
                },
                "tracestate": {"type": "string", "description": "W3C trace state."},
                "ce_traceparent": {
                    "type": "string",
                    "description": "The same, when the input is itself a binary-mode CloudEvent.",
                },
                "ce_tracestate": {"type": "string"},
            },
        }
        tenant = c.tenants.key
        if tenant is not None and tenant.startswith("header:"):
            headers["properties"][tenant.removeprefix("header:")] = {
                "type": "string",
                "description": f"The task's tenant (tenants.key {tenant}).",
            }
        key: Doc = {
            "type": ["string", "null"],
            "description": "Any key; carried to the event as data.input.key."
            + (" The task's tenant (tenants.key: key)." if tenant == "key" else ""),
        }
        limit = f"at most kafka.max_message_bytes ({k.max_message_bytes} bytes)"
        self.messages["taskId"] = {
            "name": "taskId",
            "title": "A bare task id",
            "contentType": "text/plain",
            "description": f"The task id as UTF-8 text (surrounding whitespace ignored), {limit}.",
            "headers": headers,
            "payload": {"type": "string", "pattern": f"^\\s*{TASK_ID_PATTERN}\\s*$"},
            "bindings": _kafka_binding(key=key),
        }
        self.messages["taskRequest"] = {
            "name": "taskRequest",
            "title": "A task as JSON",
            "contentType": "application/json",
            "description": (
                f"A JSON object (or a JSON string holding the task id), {limit}."
                + (
                    f" The tenant is its {tenant.removeprefix('json:')}."
                    if tenant and tenant.startswith("json:")
                    else ""
                )
            ),
            "headers": copy.deepcopy(headers),
            "payload": {
                "anyOf": [
                    _ref(SCHEMAS + "TaskRequest"),
                    _ref(SCHEMAS + "SubmitResponse"),
                    _ref(SCHEMAS + "TaskId"),
                ]
            },
            "bindings": _kafka_binding(key=copy.deepcopy(key)),
        }
        self._kafka_channel(
            "tasks",
            k.input_topic,
            "Task ids to follow (kafka.input_topic). A value the bridge cannot read goes to the"
            " dead-letter topic; its offset is committed either way.",
            ["taskId", "taskRequest"],
        )
        self._operation(
            "consumeTasks",
            "receive",
            "tasks",
            ["taskId", "taskRequest"],
            f"The bridge's replicas share the input partitions in consumer group {k.group_id}.",
            bindings=_kafka_binding(
                groupId={"type": "string", "enum": [k.group_id]},
                clientId={"type": "string", "enum": [k.client_id]},
            ),
        )

    # --- events -----------------------------------------------------------------------------

    def _events(self) -> None:
        k = self.k
        timeout_topic = k.timeout_topic or k.failed_topic
        where = {"completed": k.completed_topic, "failed": k.failed_topic, "timeout": timeout_topic}
        for kind in _KINDS:
            self.messages[f"{kind}Event"] = self._event_message(kind)
        topics: dict[str, list[ev.EventType]] = {}
        for kind in _KINDS:
            topics.setdefault(where[kind], []).append(kind)
        for topic, kinds in topics.items():
            cid = kinds[0]  # each kind on one topic: the first names the channel
            messages = [f"{kind}Event" for kind in kinds]
            names = ", ".join(ev.TYPE_PREFIX + kind for kind in kinds)
            unset = "timeout" in kinds and not k.timeout_topic
            self._kafka_channel(
                cid,
                topic,
                f"CloudEvents of type {names} (kafka.{cid}_topic"
                + ("; kafka.timeout_topic is unset" if unset else "")
                + "). Key: the task id.",
                messages,
            )
            self._operation(
                f"publish{cid.capitalize()}",
                "send",
                cid,
                messages,
                f"One event per task that ends {' or '.join(kinds)}.",
            )

    def _event_message(self, kind: ev.EventType) -> Doc:
        c = self.config
        event_type = ev.TYPE_PREFIX + kind
        status: Doc = {"enum": _STATUSES[kind]}
        key = {"type": "string", "pattern": TASK_ID, "description": "The task id."}
        message: Doc = {"name": f"{kind}Event", "title": f"{event_type} CloudEvent"}
        carried = (
            "The input record's headers are carried, except ce_* and content-type (any case)"
            " and, unless events.binary_headers is keep, values that are not UTF-8 text."
        )
        if c.events.mode == "structured":
            message["contentType"] = ev.CONTENT_TYPE.decode()
            message["description"] = (
                "Structured content mode: the value is the whole CloudEvent as JSON. " + carried
            )
            message["headers"] = {
                "type": "object",
                "required": ["content-type"],
                "properties": {"content-type": _const(ev.CONTENT_TYPE.decode())},
            }
            message["payload"] = {
                "allOf": [
                    _ref(SCHEMAS + EVENT_SCHEMA),
                    {
                        "properties": {
                            "type": {"const": event_type},
                            "source": {"const": c.events.source},
                            "data": {"properties": {"status": status}},
                        }
                    },
                ]
            }
        else:
            message["contentType"] = ev.DATA_CONTENT_TYPE
            message["description"] = (
                "Binary content mode: the attributes are ce_* headers and the value is the"
                " event's data. " + carried
            )
            message["headers"] = self._binary_headers(event_type)
            message["payload"] = {
                "allOf": [_ref(self.data_ref), {"properties": {"status": status}}]
            }
        message["bindings"] = _kafka_binding(key=key)
        return message

    def _binary_headers(self, event_type: str) -> Doc:
        """ce_<attribute> for each attribute written as a header, its schema the event
        schema's for that attribute; content-type for datacontenttype."""
        attributes = self.event_schemas[EVENT_SCHEMA].get("properties", {})
        properties: Doc = {}
        for name in (*ev.BINARY_ATTRIBUTES, *ev.TRACE_ATTRIBUTES):
            schema = copy.deepcopy(attributes.get(name, {"type": "string"}))
            schema.setdefault("type", "string")  # a header value is text
            properties[f"ce_{name}"] = schema
        properties["ce_type"] = _const(event_type)
        properties["ce_source"] = _const(self.config.events.source, "events.source")
        properties["content-type"] = _const(ev.DATA_CONTENT_TYPE)
        return {
            "type": "object",
            "required": [*(f"ce_{name}" for name in ev.BINARY_ATTRIBUTES), "content-type"],
            "properties": properties,
        }

    # --- dead letters -----------------------------------------------------------------------

    def _dead_letters(self) -> None:
        k = self.k
        self.messages["deadLetter"] = {
            "name": "deadLetter",
            "title": "An input record the bridge could not read",
            "contentType": "application/octet-stream",
            "description": (
                "The input record's key, value and headers as they came (Kafka Connect style),"
                " plus dlq.* headers saying why and where from."
            ),
            "headers": {
                "type": "object",
                "required": [
                    "dlq.reason",
                    "dlq.detail",
                    "dlq.topic",
                    "dlq.partition",
                    "dlq.offset",
                ],
                "properties": {
                    "dlq.reason": {"type": "string", "enum": list(DEAD_LETTER_REASONS)},
                    "dlq.detail": {"type": "string", "description": "Why, in a sentence."},
                    "dlq.topic": _const(k.input_topic, "The topic the record came from."),
                    "dlq.partition": _digits("Its partition."),
                    "dlq.offset": _digits("Its offset."),
                    "dlq.value_truncated": _digits(
                        "The value's length in bytes, when it was over"
                        f" kafka.max_message_bytes ({k.max_message_bytes}) and only its first"
                        " bytes are kept."
                    ),
                },
            },
            "payload": {
                "type": ["string", "null"],
                "description": (
                    "The input value, byte for byte; null when it had none or the Kafka client"
                    " could not decode it (reason undecodable)."
                ),
            },
            "bindings": _kafka_binding(
                key={
                    "type": ["string", "null"],
                    "description": (
                        "The input record's key as it came; empty when it had neither key nor"
                        " value."
                    ),
                }
            ),
        }
        self._kafka_channel(
            "deadLetter",
            k.dead_letter_topic,
            "Input records the bridge could not read (kafka.dead_letter_topic).",
            ["deadLetter"],
        )
        self._operation(
            "publishDeadLetter", "send", "deadLetter", ["deadLetter"], "One per unreadable input."
        )

    # --- webhooks ---------------------------------------------------------------------------

    def _webhooks(self) -> None:
        w = self.config.webhooks
        self.servers["webhooks"] = {
            "host": f"{w.host}:{w.port}",
            "protocol": "http",
            "title": "The webhook receiver",
            "description": (
                "Where the bridge listens for WaveSpeedAI's signed webhook deliveries"
                " (webhooks.host, webhooks.port); tasks are submitted with"
                f" ?webhook=https://<public host>{w.path}."
            ),
        }
        self.schemas["Prediction"] = {
            "type": "object",
            "description": "A WaveSpeedAI prediction (the result API's data object).",
            "required": ["id", "status"],
            "properties": {
                "id": _ref(SCHEMAS + "TaskId"),
                "status": {"type": "string", "minLength": 1},
                "model": {"type": ["string", "null"]},
                "outputs": {"type": ["array", "null"], "items": {"type": "string"}},
                "error": {"type": ["string", "null"]},
                "created_at": {"type": ["string", "null"]},
                "timings": {
                    "type": ["object", "null"],
                    "properties": {"inference": {"type": ["number", "null"]}},
                },
                "has_nsfw_contents": {"type": ["array", "null"], "items": {"type": "boolean"}},
            },
        }
        delivery_body: Doc = {
            "anyOf": [
                _ref(SCHEMAS + "Prediction"),
                {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": _ref(SCHEMAS + "Prediction")},
                },
            ]
        }
        signed = {
            ID_HEADER: {"type": "string", "pattern": "^[\\x21-\\x7e]{1,256}$"},
            TIMESTAMP_HEADER: {
                "type": "string",
                "pattern": "^[0-9]{1,12}$",
                "description": "Unix seconds, as signed.",
            },
        }
        self.messages["webhookRequest"] = {
            "name": "webhookRequest",
            "title": "A signed webhook delivery",
            "contentType": "application/json",
            "description": (
                f"POST {w.path}, at most webhooks.max_body_bytes ({w.max_body_bytes}). The"
                " signature is HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`;"
                f" timestamps within webhooks.tolerance_s ({w.tolerance_s:g} s). Answers: 200"
                " once published to the webhook topic (or a replay), 400/401/408/413, 503 to"
                " be retried."
            ),
            "headers": {
                "type": "object",
                "required": [ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER],
                "properties": {
                    **copy.deepcopy(signed),
                    SIGNATURE_HEADER: {
                        "type": "string",
                        "maxLength": 1024,
                        "description": "v3,<hex>; several space-separated during rotation.",
                    },
                },
            },
            "payload": copy.deepcopy(delivery_body),
        }
        task_key = {"type": "string", "pattern": TASK_ID, "description": "The task id."}
        self.messages["webhookDelivery"] = {
            "name": "webhookDelivery",
            "title": "A verified webhook delivery",
            "contentType": "application/json",
            "description": "The request's body as it came, with where and when it was received.",
            "headers": {
                "type": "object",
                "required": [ID_HEADER, TIMESTAMP_HEADER, RECEIVED_AT_HEADER, RECEIVED_BY_HEADER],
                "properties": {
                    **copy.deepcopy(signed),
                    RECEIVED_AT_HEADER: {"type": "string", "format": "date-time"},
                    RECEIVED_BY_HEADER: {"type": "string", "description": "The replica."},
                },
            },
            "payload": copy.deepcopy(delivery_body),
            "bindings": _kafka_binding(key=copy.deepcopy(task_key)),
        }
        self.messages["webhookMark"] = {
            "name": "webhookMark",
            "title": "A delivery acted on",
            "contentType": "application/octet-stream",
            "description": "The replica tracking the task took the delivery; the others forget it.",
            "headers": {
                "type": "object",
                "required": [APPLIED_BY_HEADER, ID_HEADER],
                "properties": {
                    APPLIED_BY_HEADER: {"type": "string", "description": "The replica."},
                    ID_HEADER: copy.deepcopy(signed[ID_HEADER]),
                },
            },
            "payload": {"type": "string", "maxLength": 0},
            "bindings": _kafka_binding(key=copy.deepcopy(task_key)),
        }
        self.channels["webhookReceiver"] = {
            "address": w.path,
            "title": f"POST {w.path}",
            "description": "WaveSpeedAI's signed webhook deliveries (webhooks.path).",
            "servers": [_ref("#/servers/webhooks")],
            "messages": {"webhookRequest": _ref("#/components/messages/webhookRequest")},
        }
        self._operation(
            "receiveWebhook",
            "receive",
            "webhookReceiver",
            ["webhookRequest"],
            "Verify a delivery, publish it to the webhook topic, then answer 2xx.",
            bindings={"http": {"method": "POST", "bindingVersion": HTTP_BINDING_VERSION}},
        )
        both = ["webhookDelivery", "webhookMark"]
        self._kafka_channel(
            "webhooks",
            w.topic,
            "Verified webhook deliveries, read by every replica (webhooks.topic).",
            both,
        )
        self._operation(
            "publishWebhookDelivery",
            "send",
            "webhooks",
            ["webhookDelivery"],
            "The receiver's replica publishes each verified delivery (acks=all) before its 2xx.",
        )
        self._operation(
            "publishWebhookMark", "send", "webhooks", ["webhookMark"], "Marks a delivery acted on."
        )
        self._operation(
            "readWebhooks",
            "receive",
            "webhooks",
            both,
            "Every replica reads every partition (no consumer group); the task's owner acts.",
        )
