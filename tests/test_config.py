from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from bridge.cli import main
from bridge.config import (
    ApiConfig,
    Config,
    ConfigError,
    build_config,
    load_config,
    read_api_key,
)

ROOT = Path(__file__).resolve().parents[1]


def problems(data: dict[str, object], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(data, env or {})
    return info.value.problems


def test_defaults_are_valid() -> None:
    config = build_config({}, {})
    assert config.kafka.input_topic == "wavespeed.tasks"
    assert config.polling.interval_s == 2.0
    assert config.polling.default_timeout_s == 300.0
    assert config.api.verify_tls is True


@pytest.mark.parametrize("name", ["bridge.yaml", "local.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    load_config(ROOT / "config" / name, env={})


def test_wrong_type_names_the_key() -> None:
    assert problems({"kafka": {"session_timeout_ms": "soon"}}) == [
        "kafka.session_timeout_ms: expected an integer, got 'soon'"
    ]


def test_unknown_key_names_the_key() -> None:
    assert problems({"kafka": {"bootstrap_server": "x"}}) == ["kafka.bootstrap_server: unknown key"]
    assert problems({"pollling": {}}) == ["pollling: unknown key"]


def test_bool_is_not_an_integer_and_literals_are_checked() -> None:
    found = problems({"server": {"port": True}, "logging": {"format": "xml"}})
    assert "server.port: expected an integer, got True" in found
    assert "logging.format: expected one of 'json', 'console', got 'xml'" in found


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"api": {"read_timeout_s": "x", "nope": 1}, "polling": {"jitter": "y"}})
    assert len(found) == 3


def test_semantic_checks() -> None:
    found = problems(
        {
            "kafka": {"security_protocol": "SASL_SSL"},
            "polling": {"interval_s": 0},
            "api": {"result_path": "/x"},
        }
    )
    assert "kafka.sasl_mechanism: required when security_protocol is SASL_*" in found
    assert "polling.interval_s: must be > 0, got 0.0" in found
    assert "api.result_path: must start with / and contain {id} exactly once" in found


def test_env_overrides_every_key_with_yaml_typing() -> None:
    config = build_config(
        {"kafka": {"bootstrap_servers": "a:1"}},
        {
            "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "b:2",
            "BRIDGE_SERVER__PORT": "9000",
            "BRIDGE_API__VERIFY_TLS": "false",
            "BRIDGE_SHUTDOWN_GRACE_S": "7.5",
            "BRIDGE_KAFKA__TIMEOUT_TOPIC": "",
            "OTHER": "ignored",
        },
    )
    assert config.kafka.bootstrap_servers == "b:2"
    assert config.server.port == 9000
    assert config.api.verify_tls is False
    assert config.shutdown_grace_s == 7.5
    assert config.kafka.timeout_topic is None


def test_env_string_settings_stay_strings_and_bridge_config_is_not_an_override() -> None:
    config = build_config(
        {"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}},
        {
            "BRIDGE_CONFIG": "/etc/wavespeed-bridge/bridge.yaml",
            "BRIDGE_KAFKA__SASL_USERNAME": "007",
            "BRIDGE_KAFKA__SASL_PASSWORD": "123456",
            "BRIDGE_KAFKA__CLIENT_ID": "true",
        },
    )
    assert config.kafka.sasl_username == "007"
    assert config.kafka.sasl_password == "123456"
    assert config.kafka.client_id == "true"


def test_env_override_errors_name_the_key() -> None:
    assert problems({}, {"BRIDGE_KAFKA__NOPE": "1"}) == ["kafka.nope: unknown key"]
    assert problems({}, {"BRIDGE_SERVER__PORT": "eighty"}) == [
        "server.port: expected an integer, got 'eighty'"
    ]


def test_model_classes_list() -> None:
    config = build_config(
        {"polling": {"model_classes": [{"pattern": "*", "median_s": 3, "p90_s": 9}]}}, {}
    )
    assert config.polling.model_classes[0].median_s == 3.0
    assert problems({"polling": {"model_classes": [{"median_s": 3}]}}) == [
        "polling.model_classes[0].pattern: required"
    ]


def test_api_key_from_file_wins_over_env(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert read_api_key(ApiConfig(api_key_file=str(key_file)), {"WAVESPEED_API_KEY": "e"}) == (
        "from-file"
    )
    assert read_api_key(ApiConfig(), {"WAVESPEED_API_KEY": "from-env"}) == "from-env"
    assert read_api_key(ApiConfig(), {}) is None


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "config" / "bridge.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka:\n  group_id: 5\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["check-config", str(bad)])
    assert exit_info.value.code == 2
    assert "kafka.group_id: expected a string, got 5" in capsys.readouterr().err


def test_events_mode_and_total_timeout() -> None:
    config = build_config({}, {})
    assert config.events.mode == "structured" and config.api.total_timeout_s == 15.0
    config = build_config({"events": {"mode": "binary"}, "api": {"total_timeout_s": 3}}, {})
    assert config.events.mode == "binary" and config.api.total_timeout_s == 3.0
    assert build_config({}, {"BRIDGE_EVENTS__MODE": "binary"}).events.mode == "binary"
    assert problems({"events": {"mode": "Binary"}}) == [
        "events.mode: expected one of 'structured', 'binary', got 'Binary'"
    ]
    assert problems({"events": {"source": ""}}) == [
        "events.source: must not be empty (CloudEvents requires a source)"
    ]
    assert problems({"api": {"total_timeout_s": 0}}) == [
        "api.total_timeout_s: must be > 0, got 0.0"
    ]


def test_dataschema_is_an_absolute_uri_and_retention_positive() -> None:
    url = "https://registry.example/schemas/prediction-event/7"
    config = build_config({"events": {"dataschema": url, "output_retention_s": 3600}}, {})
    assert config.events.dataschema == url and config.events.output_retention_s == 3600.0
    assert build_config({}, {}).events.dataschema is None
    assert problems({"events": {"dataschema": "schemas/event.json"}}) == [
        "events.dataschema: must be an absolute URI such as https://..., got 'schemas/event.json'"
    ]
    assert problems({"events": {"dataschema": "https://x/a b"}}) != []
    assert problems({"events": {"output_retention_s": 0}}) != []


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("structured", "structured mode: each record's value is the whole CloudEvent as JSON"),
        ("binary", "binary mode: attributes in ce_* headers, content-type application/json"),
    ],
)
def test_check_config_explains_the_events_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, says: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"events:\n  mode: {mode}\n")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"events     CloudEvents Kafka binding, {says}" in out


def test_webhooks_section_defaults_and_env() -> None:
    w = build_config({}, {}).webhooks
    assert (w.enabled, w.host, w.port, w.path) == (False, "127.0.0.1", 9465, "/webhooks/wavespeed")
    assert (w.topic, w.max_body_bytes, w.tolerance_s) == ("wavespeed.webhooks", 262_144, 300.0)
    assert (w.confirm_by_poll, w.pending_max, w.pending_ttl_s) == (False, 10_000, 3600.0)
    on = build_config({}, {"BRIDGE_WEBHOOKS__ENABLED": "true", "BRIDGE_WEBHOOKS__PORT": "9999"})
    assert on.webhooks.enabled and on.webhooks.port == 9999


def test_webhooks_validation_names_each_key() -> None:
    found = problems(
        {
            "server": {"port": 9465},
            "kafka": {"max_message_bytes": 1000},
            "webhooks": {
                "enabled": True,
                "path": "webhooks?x=1",
                "topic": "wavespeed.tasks",
                "tolerance_s": 0,
                "max_body_bytes": 2000,
                "pending_max": -1,
                "secret_env": "",
            },
        }
    )
    assert "webhooks.port: must differ from server.port (the metrics server's)" in found
    assert any(p.startswith("webhooks.path: must start with /") for p in found)
    assert "webhooks.topic: must differ from kafka's input and output topics" in found
    assert "webhooks.tolerance_s: must be > 0, got 0.0" in found
    assert "webhooks.pending_max: must be > 0, got -1" in found
    assert any(p.startswith("webhooks.max_body_bytes: must not exceed") for p in found)
    assert "webhooks.secret_env: required (or webhooks.secret_file) when enabled" in found
    assert problems({"webhooks": {"path": "/a b"}})[0].startswith("webhooks.path")
    assert problems({"webhooks": {"tolerance_s": 7200}})[0].startswith("webhooks.tolerance_s")
    # Off, the same port as the metrics server is no conflict.
    assert build_config({"server": {"port": 9465}}, {}).webhooks.port == 9465


def test_webhook_secret_from_file_wins_over_env(tmp_path: Path) -> None:
    from bridge.config import WebhooksConfig, read_webhook_secret

    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text("whsec_from-file\n")
    env = {"WAVESPEED_WEBHOOK_SECRET": "whsec_from-env"}
    assert read_webhook_secret(WebhooksConfig(secret_file=str(secret_file)), env) == (
        "whsec_from-file"
    )
    assert read_webhook_secret(WebhooksConfig(), env) == "whsec_from-env"
    assert read_webhook_secret(WebhooksConfig(), {}) is None
    assert read_webhook_secret(WebhooksConfig(), {"WAVESPEED_WEBHOOK_SECRET": "whsec_"}) is None
    with pytest.raises(ConfigError, match=r"webhooks\.secret_file: cannot read"):
        read_webhook_secret(WebhooksConfig(secret_file=str(tmp_path / "missing")), {})


def test_check_config_explains_the_webhooks_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    off = tmp_path / "off.yaml"
    off.write_text("{}\n")
    assert main(["check-config", str(off)]) == 0
    assert "webhooks   off (webhooks.enabled: false)" in capsys.readouterr().out
    on = tmp_path / "on.yaml"
    on.write_text("webhooks:\n  enabled: true\n  secret_file: /run/secrets/webhook-secret\n")
    assert main(["check-config", str(on)]) == 0
    out = capsys.readouterr().out
    assert "POST http://127.0.0.1:9465/webhooks/wavespeed" in out
    assert "secret from file /run/secrets/webhook-secret" in out
    assert "'wavespeed.webhooks' (acks=all) before the 2xx" in out


def test_run_refuses_webhooks_without_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text("webhooks:\n  enabled: true\n")
    monkeypatch.setenv("WAVESPEED_API_KEY", "k-123456")
    monkeypatch.delenv("WAVESPEED_WEBHOOK_SECRET", raising=False)
    assert main(["run", "--config", str(config)]) == 2
    assert "webhooks.enabled but no webhook secret" in capsys.readouterr().err
    config.write_text("webhooks:\n  enabled: true\n  secret_file: /nonexistent/secret\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "webhooks.secret_file: cannot read" in capsys.readouterr().err


# --- issue 17: constraints beside the fields, the environment through pydantic-settings ---


def test_a_negative_auth_pause_or_linger_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both passed check-config before."""
    assert problems({"api": {"auth_error_pause_s": -5}}) == [
        "api.auth_error_pause_s: must be > 0, got -5.0"
    ]
    assert problems({"kafka": {"linger_ms": -1}}) == ["kafka.linger_ms: must be >= 0, got -1"]
    assert build_config({"kafka": {"linger_ms": 0}}, {}).kafka.linger_ms == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("api:\n  auth_error_pause_s: -5\nkafka:\n  linger_ms: -1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["check-config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "api.auth_error_pause_s: must be > 0" in err and "kafka.linger_ms: must be >= 0" in err


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"kafka": {"session_timeout_ms": 0}}, "kafka.session_timeout_ms: must be > 0, got 0"),
        ({"api": {"requests_per_second": -1}}, "api.requests_per_second: must be >= 0, got -1.0"),
        ({"polling": {"jitter": 1}}, "polling.jitter: must be < 1, got 1.0"),
        ({"server": {"port": 70_000}}, "server.port: must be <= 65535, got 70000"),
        (
            {"kafka": {"auto_offset_reset": "newest"}},
            "kafka.auto_offset_reset: expected one of 'earliest', 'latest', got 'newest'",
        ),
        (
            {"kafka": {"sasl_mechanism": "GSSAPI"}},
            "kafka.sasl_mechanism: expected one of 'PLAIN', 'SCRAM-SHA-256', 'SCRAM-SHA-512'"
            " or null, got 'GSSAPI'",
        ),
        (
            {"polling": {"model_classes": [{"pattern": "*", "min_interval_s": -1}]}},
            "polling.model_classes[0].min_interval_s: must be > 0, got -1.0",
        ),
        ({"shutdown_grace_s": "20"}, "shutdown_grace_s: expected a number, got '20'"),
        ({"KAFKA": {}}, "KAFKA: unknown key"),
    ],
)
def test_each_kind_of_constraint_names_its_key(data: dict[str, object], problem: str) -> None:
    assert problems(data) == [problem]


def _numeric_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        tp = field.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from _numeric_keys(tp, f"{prefix}{name}.")
        elif tp in (int, float):
            yield prefix + name


@pytest.mark.parametrize("key", list(_numeric_keys(Config)))
def test_every_number_has_a_lower_bound(key: str) -> None:
    *sections, name = key.split(".")
    data: dict[str, object] = {name: -1}
    for section in reversed(sections):
        data = {section: data}
    found = problems(data)
    assert len(found) == 1 and re.fullmatch(
        rf"{re.escape(key)}: must be >=? \d+, got -1(\.0)?", found[0]
    ), found


def test_every_problem_names_its_key() -> None:
    found = problems(
        {
            "kafka": {"session_timeout_ms": "soon", "security_protocol": "SASL_SSL", "x": 1},
            "api": {"base_url": "ftp://h", "budget_burst": -1},
            "polling": {
                "interval_s": True,
                "model_classes": [{"pattern": "*", "median_s": 9, "p90_s": 3}, 5],
            },
            "webhooks": {"enabled": True, "port": 9464, "secret_env": ""},
            "delivery": "twice",
        },
        {"BRIDGE_SERVER__PORT": "http", "BRIDGE_NOPE": "1"},
    )
    keys = [p.split(": ", 1)[0] for p in found]
    assert keys == [
        "nope",
        "kafka.session_timeout_ms",
        "kafka.x",
        "api.base_url",
        "api.budget_burst",
        "polling.interval_s",
        "polling.model_classes[1]",
        "server.port",
        "delivery",
        "kafka.sasl_mechanism",
        "kafka.sasl_username",
        "kafka.sasl_password",
        "webhooks.secret_env",
    ], found
    # Rules are judged once the failed values are left out, but a list item that is not a
    # mapping cannot be (the indexes would shift): polling's rules wait for it, and
    # webhooks.port is not compared with a server.port that failed.
    assert not any("model_classes[0]" in p or "server.port (" in p for p in found), found


def test_rules_are_judged_beside_field_errors_but_not_on_failed_values() -> None:
    assert problems({"kafka": {"linger_ms": -1, "heartbeat_interval_ms": 20_000}}) == [
        "kafka.linger_ms: must be >= 0, got -1",
        "kafka.heartbeat_interval_ms: must be below kafka.session_timeout_ms",
    ]
    # Left out, the heartbeat would be its default (3000), above this session timeout.
    assert problems({"kafka": {"heartbeat_interval_ms": 0, "session_timeout_ms": 2000}}) == [
        "kafka.heartbeat_interval_ms: must be > 0, got 0"
    ]


def test_env_names_in_any_case_and_whole_values_as_yaml() -> None:
    config = build_config(
        {},
        {
            "bridge_server__port": "9100",
            "Bridge_Kafka__Linger_Ms": "0",
            "BRIDGE_POLLING__MODEL_CLASSES": "[{pattern: '*', median_s: 3, p90_s: 9}]",
            "BRIDGE_EVENTS": "{source: 'urn:x'}",
        },
    )
    assert (config.server.port, config.kafka.linger_ms, config.events.source) == (9100, 0, "urn:x")
    assert [(c.pattern, c.median_s) for c in config.polling.model_classes] == [("*", 3.0)]


def test_env_values_are_checked_like_the_files() -> None:
    assert problems({}, {"BRIDGE_SERVER__PORT": "0"}) == ["server.port: must be >= 1, got 0"]
    assert problems({}, {"BRIDGE_API__VERIFY_TLS": "maybe"}) == [
        "api.verify_tls: expected true or false, got 'maybe'"
    ]
    assert problems({}, {"BRIDGE_SHUTDOWN_GRACE_S": ""}) == [
        "shutdown_grace_s: expected a number, got None"
    ]


def test_env_names_that_name_no_setting_are_problems() -> None:
    found = problems(
        {},
        {
            "BRIDGE_NOPE": "1",
            "BRIDGE_KAFKA__": "x",
            "BRIDGE_SHUTDOWN_GRACE_S__X": "1",
            "BRIDGE_KAFKA__NOPE": "1",
        },
    )
    assert found == [
        "BRIDGE_KAFKA__: malformed override name",
        "nope: unknown key",
        "BRIDGE_SHUTDOWN_GRACE_S__X: shutdown_grace_s is not a section",
        "kafka.nope: unknown key",
    ]


def test_the_environment_is_os_environ_unless_a_mapping_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BRIDGE_SERVER__PORT", "9100")
    assert build_config({}).server.port == 9100
    assert build_config({}, env={}).server.port == 9464
    assert Config().server.port == 9464  # a model made in code reads no environment


def test_the_config_is_immutable_and_hashable() -> None:
    config = build_config({}, {})
    with pytest.raises(ValidationError, match="frozen"):
        config.kafka.linger_ms = 0
    assert hash(config) == hash(build_config({}, {})) and config == build_config({}, {})
    assert len({config.polling, config.polling.model_copy()}) == 1
    changed = config.model_copy(update={"delivery": "exactly_once"})
    assert changed.delivery == "exactly_once" and config.delivery == "at_least_once"
