from __future__ import annotations

from pathlib import Path

import pytest

from bridge.cli import main
from bridge.config import ApiConfig, ConfigError, build_config, load_config, read_api_key

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
