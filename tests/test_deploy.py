"""deploy/: every metric the dashboard and the alerts use exists; the Kubernetes manifest is wired right."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import ROOT
from kafka_local import free_port
from starlette.testclient import TestClient

from pusher import create_app
from settings import Settings, load_settings

DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> set[str]:
    """The metric names /metrics exposes (series names, with _total/_bucket/… as exposed)."""
    settings = load_settings(
        {
            "JOURNAL_PATH": str(tmp_path_factory.mktemp("deploy") / "j.db"),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "KAFKA_PRODUCER_TIMEOUT": "1",
        },
        env_file="/nonexistent",
    )
    with TestClient(create_app(settings)) as client:
        client.get("/health")
        client.post("/api/v1/commands", json={"device_id": "d", "command_type": "c", "payload": {}, "protocol": "x"})
        text = client.get("/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _used(text: str) -> set[str]:
    return set(re.findall(r"\bpusher_[a-z_]+", text))


def test_alert_rules_use_only_exposed_metrics(exposed):
    """Every metric in the alert rules exists in /metrics, and the rules cover the promised cases."""
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yaml").read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"PusherKafkaDisconnected", "PusherBacklogGrowing", "PusherOldestPendingCommand"} <= names
    assert {"PusherErrorRate", "PusherCommandsExpiring"} <= names
    assert {"PusherStatusOutboxGrowing", "PusherStatusEventsIgnored"} <= names
    used = set().union(*(_used(rule["expr"]) for rule in rules))
    assert used and used <= exposed, used - exposed


def test_dashboard_uses_only_exposed_metrics(exposed):
    """Every metric in the Grafana dashboard exists in /metrics."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    used = set().union(*(_used(t["expr"]) for panel in dashboard["panels"] for t in panel["targets"]))
    assert len(dashboard["panels"]) >= 8 and used <= exposed, used - exposed


def test_kubernetes_sidecar_manifest():
    """Liveness on /health, readiness on /ready, the journal on a volume, and only real settings."""
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pusher = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "pusher")
    assert pusher["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pusher["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {e["name"]: e["value"] for e in pusher["env"]}
    assert set(env) <= {name.upper() for name in Settings.__struct_fields__}
    mount = pusher["volumeMounts"][0]["mountPath"]
    assert env["JOURNAL_PATH"].startswith(mount + "/")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
