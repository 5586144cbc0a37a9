"""deploy/: the alert rules (promtool), the Grafana dashboard, the Kubernetes manifests
(against the Kubernetes JSON schemas kubernetes-validate ships) and the compose stack.

Metric names are checked against what the server really exports: a registry built the way
``realtime.app.create_app`` builds it, from the realtime and notifications metrics modules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # no stubs installed, as in loadtest/config.py
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)

from notifications.metrics import NotificationMetrics
from realtime.gcfreeze import GcFreezer
from realtime.metrics import Metrics
from realtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "piggybong-realtime.json"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

PROMTOOL_MISSING = (
    "promtool is not installed: the alert rules cannot be checked. Install it with "
    "`apt-get install prometheus` (Debian/Ubuntu: the package ships /usr/bin/promtool; "
    ".ci/run does this) or `brew install prometheus` (macOS)."
)
#: Series the alerts read that come from Prometheus itself or kube-state-metrics.
EXTERNAL_ALERT_METRICS = {"up", "kube_pod_status_ready"}
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())

# PromQL words that are not metric names.
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
}


def exported_metric_names() -> set[str]:
    """Every sample name a node's /metrics can show, labelled series not yet seen included."""
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    Metrics(registry)
    GcFreezer(None, None, registry)
    NotificationMetrics(registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created", ""),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label matchers, grouping, ranges dropped)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"]]


def operations_anchors() -> set[str]:
    """GitHub's anchors of docs/operations.md's headings."""
    anchors = set()
    for line in OPERATIONS.read_text().splitlines():
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(slug.replace(" ", "-"))
    return anchors


def promtool() -> str:
    found = shutil.which("promtool") or next(
        (p for p in ("/usr/bin/promtool", "/usr/local/bin/promtool") if Path(p).exists()), None
    )
    if found is None:
        pytest.fail(PROMTOOL_MISSING, pytrace=False)
    return found


# --- Prometheus alert rules ---------------------------------------------------------------


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    tool = promtool()
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)]):
        done = subprocess.run(
            [tool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_promtool_accepts_the_example_prometheus_config() -> None:
    tool = promtool()
    config = DEPLOY / "prometheus" / "prometheus.yml"
    done = subprocess.run(
        [tool, "check", "config", "--syntax-only", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    scrape = load_yaml(config)
    assert scrape["global"]["scrape_interval"] == "30s"
    assert scrape["rule_files"] == ["alerts.yml"]
    assert [job["job_name"] for job in scrape["scrape_configs"]] == ["piggybong-realtime"]


def test_every_rule_has_a_level_a_for_and_a_runbook_section() -> None:
    anchors = operations_anchors()
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) >= 10
    for rule in rules:
        name = rule["alert"]
        assert "for" in rule, name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        anchor = f"alert-{name.lower()}"
        assert notes["runbook"] == f"docs/operations.md#{anchor}", name
        assert anchor in anchors, f"docs/operations.md has no section 'Alert: {name}'"
        assert f'section "Alert: {name}"' in notes["description"], name


def test_alerts_read_only_metrics_the_server_exports() -> None:
    exported = exported_metric_names() | EXTERNAL_ALERT_METRICS
    for rule in alert_rules():
        used = promql_metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']}: not exported: {used - exported}"


def test_alert_unit_tests_fire_and_stay_silent_for_every_alert() -> None:
    fired: set[tuple[str, str]] = set()
    silent: set[str] = set()
    for test in load_yaml(ALERTS_TEST)["tests"]:
        for case in test["alert_rule_test"]:
            expected = case["exp_alerts"]
            if not expected:
                silent.add(case["alertname"])
            fired.update((case["alertname"], alert["exp_labels"]["severity"]) for alert in expected)
    levels = {(rule["alert"], rule["labels"]["severity"]) for rule in alert_rules()}
    assert levels - fired == set(), "levels no test fires"
    assert {name for name, _ in levels} - silent == set(), "alerts no test keeps silent"


def test_the_metric_name_reader_sees_through_promql() -> None:
    expr = (
        'sum by (job, le) (rate(a_total{x="y{}", le=~"1|2"}[5m] offset 10m)) / on (job) '
        "histogram_quantile(0.95, b_bucket[$__rate_interval]) > bool 1e3 unless c"
    )
    assert promql_metric_names(expr) == {"a_total", "b_bucket", "c"}


# --- Grafana dashboard --------------------------------------------------------------------


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def test_dashboard_queries_only_exported_metrics_through_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exported = exported_metric_names()
    used: set[str] = set()
    label_values = re.fullmatch(r"label_values\((.+),\s*\w+\)", variables["instance"]["definition"])
    assert label_values is not None
    exprs = [label_values.group(1)]
    ids = []
    for panel in dashboard_panels(dashboard["panels"]):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            exprs.append(target["expr"])
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= exported, f"not exported: {names - exported} in {expr}"
        used |= names
    wanted = {
        "piggybong_realtime_ws_connections",
        "piggybong_realtime_ws_commands_total",
        "piggybong_realtime_broker_published_total",
        "piggybong_realtime_ws_messages_out_total",
        "piggybong_realtime_hub_publish_to_write_seconds_bucket",
        "piggybong_realtime_ws_queue_overflows_total",
        "piggybong_realtime_ws_rate_limited_total",
        "piggybong_realtime_broker_reconnects_total",
        "piggybong_realtime_notifications_breaker_state",
        "piggybong_realtime_notifications_queue_depth",
        "piggybong_realtime_notifications_retried_total",
        "piggybong_realtime_notifications_dead_lettered_total",
        "piggybong_realtime_gc_pause_seconds_bucket",
    }
    assert wanted - used == set(), "the dashboard misses these"


# --- Kubernetes manifests -----------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every object of deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    objects = manifests()
    assert set(objects) == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
    }
    for kind, obj in objects.items():
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                pytest.fail(f"{kind} (Kubernetes {version}) at {path}: {exc.message}")


def test_the_schema_validation_catches_a_misspelt_field() -> None:
    deployment = manifests()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_deployment_drains_within_its_grace_period() -> None:
    objects = manifests()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = objects["ConfigMap"]["data"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(config["REALTIME_DRAIN_TIMEOUT"]) + float(config["REALTIME_CLOSE_TIMEOUT"]) + 1
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--uid 10001" in dockerfile
    assert container["resources"]["requests"] and container["resources"]["limits"]
    sources = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    assert sources == {
        "configMapRef": objects["ConfigMap"]["metadata"]["name"],
        "secretRef": objects["Secret"]["metadata"]["name"],
    }
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = objects[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert target["name"] == objects["Deployment"]["metadata"]["name"]


def test_config_and_secret_are_settings_the_server_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = manifests()
    secret = objects["Secret"]["stringData"]
    assert set(secret) == {
        "REALTIME_JWT_SECRET", "REALTIME_API_KEYS", "REALTIME_REDIS_URL", "REALTIME_ADMIN_TOKEN",
    }  # fmt: skip
    for value in secret.values():
        assert "REPLACE-ME" in value, "the example Secret holds placeholders only"
    env = {**objects["ConfigMap"]["data"], **secret}
    fields = set(Settings.model_fields)
    for name, value in env.items():
        assert name.startswith("REALTIME_") and name[9:].lower() in fields, name
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.host == "0.0.0.0"
    assert settings.api_keys and settings.jwt_secret and settings.redis_url


# --- Compose stack ------------------------------------------------------------------------


def test_compose_stack_has_two_nodes_redis_prometheus_and_grafana() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"redis", "realtime-1", "realtime-2", "prometheus", "grafana"}
    assert "--appendonly" in services["redis"]["command"]
    assert (
        services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
        == "yes"
    )
    for name, port in (("realtime-1", 8001), ("realtime-2", 8002)):
        node = services[name]
        build = node["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        assert any(str(p).split(":")[-2] == str(port) for p in node["ports"]), name
        assert node["environment"]["REALTIME_REDIS_URL"].startswith("redis://redis:")
    mounted: dict[str, Path] = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name} mounts a missing {source}"
                mounted[target] = path
    assert mounted["/etc/prometheus/alerts.yml"] == ALERTS
    assert mounted["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    dashboards = [p for t, p in mounted.items() if t.startswith("/var/lib/grafana/dashboards")]
    assert dashboards == [DASHBOARD]
    provisioning = mounted["/etc/grafana/provisioning/dashboards"]
    (provider,) = load_yaml(provisioning / "piggybong.yml")["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["realtime-1:8000", "realtime-2:8000"]
