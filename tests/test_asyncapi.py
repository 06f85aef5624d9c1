"""The AsyncAPI 3.0 document (``bridge/core/asyncapi.py``, ``wavespeed-bridge asyncapi``).

- The generator: channels, operations and servers follow the config; the security scheme;
  structured and binary messages; the event schema embedded with its references resolving.
- The schemas mean what the code does: records the code builds validate against them (and
  records of another kind do not); the input schemas accept what the parser accepts.
- ``docs/asyncapi.yaml`` is the document for ``config/bridge.yaml``.
- ``asyncapi validate`` (``@asyncapi/cli``, installed by ``scripts/tools``) passes the
  documents of five configs, with its usage analytics off and no network.
- Integration: events and dead letters read back from the broker, in both content modes,
  validate against the schemas taken from the generated document.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from bridge import __version__, cli
from bridge.config import Config, build_config, load_config
from bridge.core import asyncapi
from bridge.core import events as ev
from bridge.core.messages import DEAD_LETTER_REASONS, Rejected, TaskRequest, parse_task
from bridge.core.outcomes import Prediction
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    Received,
    create_topics,
    make_config,
    produce,
    read_all,
    running_bridge,
    sim_create,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "asyncapi.yaml"
REGENERATE = (
    ".venv/bin/wavespeed-bridge asyncapi --config config/bridge.yaml --output docs/asyncapi.yaml"
)
Doc = dict[str, Any]


def config(**sections: dict[str, Any]) -> Config:
    return build_config(sections, env={})


SASL_SSL = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "bridge",
    "sasl_password": "pw-never-in-the-document",
    "ssl_cafile": "/etc/kafka/ca.pem",
}
# The documents asyncapi validate checks.
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "binary": {"events": {"mode": "binary"}},
    "webhooks": {"webhooks": {"enabled": True, "host": "0.0.0.0", "path": "/hooks/ws"}},
    "timeout-topic": {"kafka": {"timeout_topic": "wavespeed.timeout"}},
    "sasl-ssl": {"kafka": {**SASL_SSL, "bootstrap_servers": "b-1:9096,b-2:9096,b-3:9096"}},
}


# --- validating against the document's schemas -----------------------------------------------

DOC_URI = "urn:wavespeed-bridge:asyncapi"
# jsonschema checks date-time and uri only with optional packages: the forms the bridge writes.
FORMATS = FormatChecker()
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return bool(_RFC3339.fullmatch(value)) and bool(datetime.fromisoformat(value))


def _uri(value: object) -> bool:
    return not isinstance(value, str) or bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", value))


# Registered by call: the decorator form is untyped.
FORMATS.checks("date-time")(_date_time)
FORMATS.checks("uri")(_uri)


def schema_at(doc: Doc, pointer: str) -> Draft202012Validator:
    """A validator for the schema at ``pointer`` in ``doc``; its ``$ref``s resolve in ``doc``."""
    resource: Resource[Any] = DRAFT202012.create_resource(doc)
    registry: Registry[Any] = Registry().with_resource(DOC_URI, resource)
    return Draft202012Validator(
        {"$ref": f"{DOC_URI}#{pointer}"}, registry=registry, format_checker=FORMATS
    )


def errors(doc: Doc, pointer: str, instance: object) -> list[str]:
    return [e.message for e in schema_at(doc, pointer).iter_errors(instance)]


def text_headers(headers: list[tuple[str, bytes | None]] | dict[str, bytes]) -> dict[str, Any]:
    pairs = headers.items() if isinstance(headers, dict) else headers
    return {k: v.decode() if v is not None else None for k, v in pairs}


def message(name: str) -> str:
    return f"/components/messages/{name}"


def refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def keys(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        yield from node
        for value in node.values():
            yield from keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from keys(value)


def pointed(doc: Doc, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# --- records as the code builds them ---------------------------------------------------------


def event_record(
    kind: ev.EventType, mode: ev.EventMode, *, source: str = "urn:wavespeed-bridge"
) -> ev.OutputRecord:
    prediction = (
        Prediction(id="pred_1", model="m", status="completed", outputs=["https://x/1.png"])
        if kind == "completed"
        else Prediction(id="pred_1", status="cancelled", error="cancelled by the user")
        if kind == "failed"
        else None
    )
    event = ev.build_event(
        kind=kind,
        task_id="pred_1",
        model="wavespeed-ai/flux-dev",
        prediction=prediction,
        reason="deadline of 300s passed" if kind == "timeout" else None,
        created_at=1_700_000_000.0,
        observed_at=1_700_000_003.5,
        polls=2,
        metadata={"order": 42},
        source=source,
        input_key=b"user-1",
        origins=[("wavespeed.tasks", 0, 7)],
    )
    return ev.event_record("out", event, (("trace", b"abc"),), mode)


def check_event(doc: Doc, name: str, rec: ev.OutputRecord | Received) -> list[str]:
    """Every way ``rec`` breaks message ``name`` of ``doc``: payload, headers, key."""
    assert rec.value is not None and rec.key is not None
    at = message(name)
    return [
        *errors(doc, f"{at}/payload", json.loads(rec.value)),
        *errors(doc, f"{at}/headers", text_headers(rec.headers)),
        *errors(doc, f"{at}/bindings/kafka/key", rec.key.decode()),
    ]


# --- the generator ---------------------------------------------------------------------------


def channels(doc: Doc) -> dict[str, str]:
    return {cid: ch["address"] for cid, ch in doc["channels"].items()}


def test_the_channels_follow_the_config() -> None:
    doc = asyncapi.document(config())
    assert channels(doc) == {
        "tasks": "wavespeed.tasks",
        "completed": "wavespeed.completed",
        "failed": "wavespeed.failed",
        "deadLetter": "wavespeed.dead-letter",
    }
    assert set(doc["channels"]["failed"]["messages"]) == {"failedEvent", "timeoutEvent"}
    assert list(doc["operations"]) == [
        "consumeTasks",
        "publishCompleted",
        "publishFailed",
        "publishDeadLetter",
    ]
    assert list(doc["servers"]) == ["bootstrap-1"]
    assert doc["asyncapi"] == "3.0.0"

    timeouts = asyncapi.document(config(kafka={"timeout_topic": "wavespeed.timeout"}))
    assert channels(timeouts)["timeout"] == "wavespeed.timeout"
    assert set(timeouts["channels"]["failed"]["messages"]) == {"failedEvent"}
    assert set(timeouts["channels"]["timeout"]["messages"]) == {"timeoutEvent"}
    assert timeouts["operations"]["publishTimeout"]["action"] == "send"

    # A timeout topic that is the failed topic is no channel of its own.
    same = asyncapi.document(config(kafka={"timeout_topic": "wavespeed.failed"}))
    assert channels(same) == channels(doc)

    renamed = asyncapi.document(
        config(kafka={"input_topic": "in", "completed_topic": "ok", "dead_letter_topic": "dlq"})
    )
    assert channels(renamed) == {
        "tasks": "in",
        "completed": "ok",
        "failed": "wavespeed.failed",
        "deadLetter": "dlq",
    }
    for channel in renamed["channels"].values():
        assert channel["bindings"]["kafka"]["topic"] == channel["address"]
        assert "partitions" not in channel["bindings"]["kafka"]  # the config does not know


def test_webhooks_add_the_receiver_and_the_webhook_topic() -> None:
    off = asyncapi.document(config())
    assert "webhooks" not in off["servers"] and "webhooks" not in off["channels"]
    doc = asyncapi.document(
        config(webhooks={"enabled": True, "host": "0.0.0.0", "port": 8443, "path": "/in/ws"})
    )
    assert doc["servers"]["webhooks"] == {
        **doc["servers"]["webhooks"],
        "host": "0.0.0.0:8443",
        "protocol": "http",
    }
    receiver = doc["channels"]["webhookReceiver"]
    assert receiver["address"] == "/in/ws"
    assert receiver["servers"] == [{"$ref": "#/servers/webhooks"}]
    assert doc["channels"]["webhooks"]["address"] == "wavespeed.webhooks"
    # Kafka channels are not on the HTTP server.
    assert doc["channels"]["tasks"]["servers"] == [{"$ref": "#/servers/bootstrap-1"}]
    operations = {k: (v["action"], v["channel"]["$ref"]) for k, v in doc["operations"].items()}
    assert operations["receiveWebhook"] == ("receive", "#/channels/webhookReceiver")
    assert operations["readWebhooks"] == ("receive", "#/channels/webhooks")
    assert operations["publishWebhookDelivery"] == ("send", "#/channels/webhooks")
    assert doc["operations"]["receiveWebhook"]["bindings"]["http"]["method"] == "POST"


def test_the_consumer_group_is_the_receive_operations_binding() -> None:
    doc = asyncapi.document(config(kafka={"group_id": "g-7", "client_id": "c-7"}))
    binding = doc["operations"]["consumeTasks"]["bindings"]["kafka"]
    assert binding["groupId"] == {"type": "string", "enum": ["g-7"]}
    assert binding["clientId"] == {"type": "string", "enum": ["c-7"]}
    assert doc["operations"]["consumeTasks"]["action"] == "receive"


@pytest.mark.parametrize(
    ("kafka", "protocol", "scheme"),
    [
        ({}, "kafka", None),
        ({"security_protocol": "SSL"}, "kafka-secure", None),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "u",
                "sasl_password": "pw-never-in-the-document",
            },
            "kafka",
            "plain",
        ),
        ({**SASL_SSL, "sasl_mechanism": "SCRAM-SHA-256"}, "kafka-secure", "scramSha256"),
        (SASL_SSL, "kafka-secure", "scramSha512"),
    ],
)
def test_the_security_scheme_follows_kafka_security(
    kafka: dict[str, Any], protocol: str, scheme: str | None
) -> None:
    doc = asyncapi.document(config(kafka={**kafka, "bootstrap_servers": "a:9093, b:9093"}))
    assert [s["host"] for s in doc["servers"].values()] == ["a:9093", "b:9093"]
    for server in doc["servers"].values():
        assert server["protocol"] == protocol
        if scheme is None:
            assert "security" not in server
        else:
            assert server["security"] == [{"$ref": "#/components/securitySchemes/kafkaSasl"}]
    schemes = doc["components"].get("securitySchemes", {})
    assert [s["type"] for s in schemes.values()] == ([scheme] if scheme else [])
    assert "pw-never-in-the-document" not in asyncapi.render(doc)


def test_structured_and_binary_messages() -> None:
    structured = asyncapi.document(config())
    binary = asyncapi.document(config(events={"mode": "binary", "source": "urn:x"}))
    s, b = (d["components"]["messages"]["completedEvent"] for d in (structured, binary))
    assert s["contentType"] == ev.CONTENT_TYPE.decode()
    assert s["payload"]["allOf"][0] == {"$ref": "#/components/schemas/PredictionEvent"}
    assert s["headers"]["required"] == ["content-type"]
    assert b["contentType"] == "application/json"
    assert b["payload"]["allOf"][0] == {"$ref": "#/components/schemas/PredictionEvent.data"}
    assert b["headers"]["required"] == [
        *(f"ce_{name}" for name in ev.BINARY_ATTRIBUTES),
        "content-type",
    ]
    assert set(b["headers"]["properties"]) >= {f"ce_{n}" for n in ev.TRACE_ATTRIBUTES}
    assert b["headers"]["properties"]["ce_source"]["const"] == "urn:x"
    for doc in (structured, binary):
        key = doc["components"]["messages"]["failedEvent"]["bindings"]["kafka"]["key"]
        assert key["pattern"] == asyncapi.TASK_ID


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_events_the_code_builds_validate_and_the_wrong_kind_does_not(mode: ev.EventMode) -> None:
    doc = asyncapi.document(config(events={"mode": mode}))
    for kind in ("completed", "failed", "timeout"):
        rec = event_record(kind, mode)
        assert check_event(doc, f"{kind}Event", rec) == [], kind
        others = {"completed", "failed", "timeout"} - {kind}
        for other in others:  # the type (and status) tell the messages apart
            assert check_event(doc, f"{other}Event", rec), (kind, other)
    # Another deployment's source is not this one's.
    foreign = event_record("completed", mode, source="urn:elsewhere")
    assert check_event(doc, "completedEvent", foreign)


def test_the_event_schema_is_embedded_with_its_references_resolving() -> None:
    schema = asyncapi.load_event_schema()
    doc = asyncapi.document(config(events={"mode": "binary"}))
    embedded = doc["components"]["schemas"]
    every = list(refs(doc))
    assert every and all(ref.startswith("#/") for ref in every)
    for ref in every:
        pointed(doc, ref)  # KeyError if it points nowhere
    assert not {"$id", "$schema", "$anchor", "$defs"} & set(keys(embedded))
    assert embedded["PredictionEvent"]["required"] == schema["required"]
    for name, definition in schema.get("$defs", {}).items():
        lifted = embedded[f"PredictionEvent.{name}"]
        assert lifted["properties"].keys() == definition["properties"].keys()
    if isinstance(schema.get("$id"), str):
        assert embedded["PredictionEvent"]["externalDocs"]["url"] == schema["$id"]


def test_embedding_rewrites_pointer_and_anchor_references() -> None:
    schema: Doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.com/e.json",
        "type": "object",
        "properties": {
            "data": {"$ref": "#data"},
            "other": {"$ref": "#/$defs/other/properties/x"},
            "self": {"$ref": "#"},
            "nested": {"$ref": "#/properties/data"},
        },
        "$defs": {
            "data": {"$anchor": "data", "type": "object"},
            "other": {"properties": {"x": {"type": "integer"}}},
        },
    }
    out, data_ref = asyncapi.embed_event_schema(schema, "E")
    assert data_ref == "#/components/schemas/E.data"
    assert out["E"]["properties"] == {
        "data": {"$ref": "#/components/schemas/E.data"},
        "other": {"$ref": "#/components/schemas/E.other/properties/x"},
        "self": {"$ref": "#/components/schemas/E"},
        "nested": {"$ref": "#/components/schemas/E/properties/data"},
    }
    assert out["E.data"] == {"type": "object"}
    assert schema["$defs"]["data"]["$anchor"] == "data"  # the input is not changed

    inline = asyncapi.embed_event_schema({"properties": {"data": {"type": "object"}}}, "E")
    assert inline[1] == "#/components/schemas/E/properties/data"

    with pytest.raises(ValueError, match="prefixItems"):
        asyncapi.embed_event_schema({"properties": {"a": {"prefixItems": [{}]}}})
    with pytest.raises(ValueError, match="only its own parts"):
        asyncapi.embed_event_schema({"properties": {"a": {"$ref": "other.json#/x"}}})
    with pytest.raises(ValueError, match="only its own parts"):
        asyncapi.embed_event_schema({"properties": {"a": {"$ref": "#nowhere"}}})


# Values on the input topic, some the parser takes and some it refuses.
INPUTS = [
    b"pred_abc123",
    b"  pred_abc123\n",
    b"../balance",
    b"a" * 129,
    b'"pred_json_string"',
    b'{"id": "pred_1"}',
    b'{"task_id": "pred_1", "model": "wavespeed-ai/flux-dev", "timeout_s": 600}',
    b'{"id": "pred_1", "task_id": "../x"}',
    b'{"id": 5, "task_id": "pred_1"}',
    b'{"task_id": "../x"}',
    b'{"data": {"id": "pred_1", "status": "created"}, "code": 200}',
    b'{"data": {"id": "../x"}}',
    b'{"id": "pred_1", "timeout_s": 0}',
    b'{"id": "pred_1", "timeout_s": 86401}',
    b'{"id": "pred_1", "timeout_s": true}',
    b'{"id": "pred_1", "model": 5}',
    b'{"id": "pred_1", "model": "' + b"m" * 201 + b'"}',
    b'{"id": "pred_1", "metadata": [1]}',
    b'{"id": "pred_1", "metadata": {"order": 42}, "created_at": "2024-01-01T12:00:00Z"}',
    b'{"id": "pred_1", "model": null, "timeout_s": null, "metadata": null}',
    b"[1, 2]",
    b"{}",
]


@pytest.mark.parametrize("value", INPUTS, ids=lambda v: v[:40].decode())
def test_the_input_schemas_accept_what_the_parser_accepts(value: bytes) -> None:
    doc = asyncapi.document(config())
    parsed = parse_task(value, max_bytes=1 << 20, max_timeout_s=86_400.0)
    text = value.decode()
    if text.strip()[:1] in ("{", "[", '"'):
        problems = errors(doc, message("taskRequest") + "/payload", json.loads(text))
    else:
        problems = errors(doc, message("taskId") + "/payload", text)
    assert isinstance(parsed, TaskRequest | Rejected)
    assert (problems == []) == isinstance(parsed, TaskRequest), (parsed, problems)


def test_dead_letters_validate_and_every_reason_is_named() -> None:
    doc = asyncapi.document(config())
    at = message("deadLetter")
    headers = doc["components"]["messages"]["deadLetter"]["headers"]
    assert headers["properties"]["dlq.reason"]["enum"] == list(DEAD_LETTER_REASONS)
    # Every reason the code dead-letters with is in the enum.
    used = set()
    for module in ("core/messages.py", "core/book.py"):
        tree = ast.parse((ROOT / "bridge" / module).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Rejected"
                and isinstance(node.args[0], ast.Constant)
            ):
                used.add(node.args[0].value)
    assert used == set(DEAD_LETTER_REASONS)
    for value, limit in ((b"not a task id!", 1024), (b"x" * 100, 10)):
        rec = ev.dead_letter_record(
            topic="wavespeed.dead-letter",
            source_topic="wavespeed.tasks",
            partition=3,
            offset=1187,
            key=b"user-1",
            value=value,
            headers=(("trace", b"abc"),),
            reason="invalid_id",
            detail="task id must match ...",
            max_value_bytes=limit,
        )
        assert errors(doc, f"{at}/headers", text_headers(rec.headers)) == []
        assert rec.key is not None and rec.value is not None
        assert errors(doc, f"{at}/bindings/kafka/key", rec.key.decode()) == []
        assert errors(doc, f"{at}/payload", rec.value.decode()) == []
    wrong = {"dlq.reason": "bored", "dlq.detail": "", "dlq.topic": "wavespeed.tasks"}
    assert errors(doc, f"{at}/headers", {**wrong, "dlq.partition": "0", "dlq.offset": "x"})


def test_the_output_is_deterministic_and_round_trips() -> None:
    cfg = config(webhooks={"enabled": True}, kafka=SASL_SSL)
    doc = asyncapi.document(cfg)
    text = asyncapi.render(doc)
    assert text == asyncapi.render(asyncapi.document(cfg))
    assert "&id" not in text and "*id" not in text  # no YAML aliases
    assert yaml.safe_load(text) == doc
    assert json.loads(asyncapi.render(doc, "json")) == doc
    assert doc["info"]["version"] == __version__


def test_the_committed_document_is_current() -> None:
    expected = asyncapi.render(asyncapi.document(load_config(ROOT / "config" / "bridge.yaml", {})))
    assert COMMITTED.exists(), f"docs/asyncapi.yaml is missing; generate it: {REGENERATE}"
    assert COMMITTED.read_text() == expected, (
        f"docs/asyncapi.yaml is stale; regenerate it: {REGENERATE}"
    )


def test_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({"events": {"mode": "binary"}}))
    expected = asyncapi.document(load_config(path, {}))
    assert cli.main(["asyncapi", "--config", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == expected
    assert cli.main(["asyncapi", "-c", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    out = tmp_path / "out" / "contract.json"
    out.parent.mkdir()
    assert cli.main(["asyncapi", "--config", str(path), "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == expected and capsys.readouterr().out == ""

    path.write_text(yaml.safe_dump({"kafka": {"security_protocol": "SASL_SSL"}}))
    with pytest.raises(SystemExit) as exited:
        cli.main(["asyncapi", "--config", str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "kafka.sasl_mechanism: required" in err
    assert cli.main(["asyncapi", "--config", str(ROOT / "config" / "bridge.yaml"), "-o", "/"]) == 1
    assert "cannot write" in capsys.readouterr().err


# --- asyncapi validate -----------------------------------------------------------------------


def _asyncapi_tool() -> str | None:
    found = shutil.which("asyncapi")
    if found:
        return found
    local = ROOT / ".tools" / "bin" / "asyncapi"
    return str(local) if local.exists() else None


@pytest.fixture(scope="module")
def asyncapi_cli() -> str:
    path = _asyncapi_tool()
    if path is None:
        if shutil.which("npm") is None:
            pytest.skip("asyncapi not installed and no npm: scripts/tools installs @asyncapi/cli")
        pytest.fail("asyncapi not installed: run scripts/tools (npm install of @asyncapi/cli)")
    return path


def validate(
    tool: str, path: Path, *, wrapper: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``asyncapi validate``, its analytics off: with them on it posts each run to New Relic."""
    settings = path.parent / "asyncapi-analytics.json"
    settings.write_text(json.dumps({"analyticsEnabled": "false", "infoMessageShown": "true"}))
    env = {
        **os.environ,
        "ASYNCAPI_METRICS_CONFIG_PATH": str(settings),
        # node-config's notes about the CLI's (absent) config directory and NODE_ENV.
        "SUPPRESS_NO_CONFIG_WARNING": "1",
        "SUPPRESS_STRICTNESS_CHECK": "1",
    }
    return subprocess.run(
        [*wrapper, tool, "validate", path.name, "--fail-severity", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=path.parent,
    )


@pytest.mark.parametrize("name", [*CONFIGS, "shipped"])
def test_asyncapi_validate_passes_the_document(
    asyncapi_cli: str, tmp_path: Path, name: str
) -> None:
    path = tmp_path / f"{name}.yaml"
    if name == "shipped":  # docs/asyncapi.yaml, current by the test above
        path.write_text(COMMITTED.read_text())
    else:
        path.write_text(asyncapi.render(asyncapi.document(config(**CONFIGS[name]))))
    result = validate(asyncapi_cli, path)
    output = result.stdout + result.stderr
    print(output)  # the validator's own words, for the report (-s)
    assert result.returncode == 0, output
    assert f"File {path.name} is valid" in output, output
    assert "metrics" not in output and "anonymously" not in output, output


def test_asyncapi_validate_fails_a_broken_document(asyncapi_cli: str, tmp_path: Path) -> None:
    """The validator really reads the schemas: the event schema embedded as it is in its
    file (``#/$defs/data`` relative to its ``$id``) is refused, as is a bad binding."""
    doc = asyncapi.document(config())
    raw = copy.deepcopy(doc)
    raw["components"]["schemas"]["PredictionEvent"] = asyncapi.load_event_schema()
    bad = copy.deepcopy(doc)
    bad["operations"]["consumeTasks"]["bindings"]["kafka"]["groupId"] = {"type": "group"}
    for name, broken, expected in (("raw", raw, "#/$defs/data"), ("bad", bad, "groupId")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(asyncapi.render(broken))
        result = validate(asyncapi_cli, path)
        assert result.returncode != 0, result.stdout
        assert expected in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_asyncapi_validate_makes_no_network_connection(asyncapi_cli: str, tmp_path: Path) -> None:
    path = tmp_path / "default.yaml"
    path.write_text(asyncapi.render(asyncapi.document(config())))
    trace = tmp_path / "connect.trace"
    wrapper = ("strace", "-f", "-e", "trace=connect", "-o", str(trace))
    result = validate(asyncapi_cli, path, wrapper=wrapper)
    if "Operation not permitted" in result.stderr and not trace.exists():
        pytest.skip("ptrace is not permitted here")
    assert result.returncode == 0, result.stdout + result.stderr
    network = [line for line in trace.read_text().splitlines() if "AF_INET" in line]
    assert network == [], network


# --- integration: what the broker holds matches the document ---------------------------------


def channel_of(doc: Doc, topic: str, exclude: str = "") -> tuple[str, Doc]:
    (found,) = [
        (cid, ch)
        for cid, ch in doc["channels"].items()
        if ch["address"] == topic and cid != exclude
    ]
    return found


def dead_letter_problems(doc: Doc, rec: Received) -> list[str]:
    at = message("deadLetter")
    value = rec.value.decode() if rec.value is not None else None
    key = rec.key.decode() if rec.key is not None else None
    return [
        *errors(doc, f"{at}/headers", text_headers(rec.headers)),
        *errors(doc, f"{at}/payload", value),
        *errors(doc, f"{at}/bindings/kafka/key", key),
    ]


TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_events_read_back_validate_against_the_document(
    broker: Broker, sim: Simulator, names: Names, mode: str
) -> None:
    await create_topics(broker, names)
    sections: dict[str, dict[str, Any]] = {"events": {"mode": mode, "source": "urn:aa:test"}}
    if mode == "binary":  # the timeout channel of its own, in one of the two runs
        timeout_topic = f"timeout-{names.tag}"
        await broker.create_topics([timeout_topic])
        sections["kafka"] = {"timeout_topic": timeout_topic}
    cfg = make_config(broker, sim.base_url, names, **sections)
    # The schemas come from the document as a subscriber gets it: the rendered text.
    doc = yaml.safe_load(asyncapi.render(asyncapi.document(cfg)))
    created = await sim_create(
        sim,
        [
            {"model": "wavespeed-ai/flux-dev", "duration_s": 0.2},
            {"model": "wavespeed-ai/flux-dev", "duration_s": 0.2},
            {"model": "wavespeed-ai/flux-dev", "duration_s": 0.2, "outcome": "cancelled"},
            {"model": "wavespeed-ai/flux-dev", "duration_s": 60},
        ],
    )
    done, traced, cancelled, late = created
    async with running_bridge(cfg):
        await produce(broker.bootstrap, names.input, [done, "pred_nobody_knows_this"])
        await produce(
            broker.bootstrap,
            names.input,
            [{"id": traced, "model": "wavespeed-ai/flux-dev", "metadata": {"order": 42}}],
            key=b"user-1",
            headers=[("traceparent", TRACEPARENT), ("trace", b"abc")],
        )
        await produce(broker.bootstrap, names.input, [cancelled, {"id": late, "timeout_s": 1.5}])
        await produce(
            broker.bootstrap,
            names.input,
            [b"not a task id!", b'{"id": 5}', b'{"id": "pred_1", "timeout_s": -1}'],
            key=b"k",
            headers=[("origin", b"upstream")],
        )
        topics = [*names.outputs, *sections.get("kafka", {}).values()]
        got = await read_all(broker.bootstrap, topics, expect=8, timeout=60, settle=0.5)
    kinds: dict[str, int] = {}
    for rec in got:
        cid, channel = channel_of(doc, rec.topic)
        if cid == "deadLetter":
            name = "deadLetter"
            assert dead_letter_problems(doc, rec) == [], rec
        else:
            if mode == "structured":
                event_type = str(rec.event["type"])
            else:
                event_type = rec.headers["ce_type"].decode()
            kind = event_type.removeprefix(ev.TYPE_PREFIX)
            name = f"{kind}Event"
            assert check_event(doc, name, rec) == [], (name, rec)
        # The record came on a channel that lists its message.
        assert name in channel["messages"], (name, cid)
        kinds[name] = kinds.get(name, 0) + 1
    assert kinds == {"completedEvent": 2, "failedEvent": 2, "timeoutEvent": 1, "deadLetter": 3}
    if mode == "binary":
        (traced_rec,) = [r for r in got if r.key == traced.encode()]
        assert traced_rec.headers["ce_traceparent"] == TRACEPARENT  # an optional header, checked
    reasons = sorted(r.headers["dlq.reason"].decode() for r in got if r.topic == names.dead_letter)
    assert reasons == ["invalid_field", "invalid_id", "missing_id"]


def test_module_runs_as_a_script_entry() -> None:
    """``python -m bridge asyncapi`` (what the regeneration hint's command runs)."""
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "asyncapi", "--config", "config/bridge.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == COMMITTED.read_text()
