"""deploy/: the Grafana dashboard and the Prometheus alert rules parse (promtool) and name only real metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from support import require_binary

from geo_route.config import load_settings
from geo_route.index.model import IndexFigures, StatusRecord
from geo_route.render import render_nginx_conf
from geo_route.web.metrics import IndexGauges, Metrics, UpdaterMetrics, VerificationMetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "geo-route.json"
RULES = ROOT / "deploy" / "prometheus" / "geo-route.rules.yml"
REFERENCE = ROOT / "examples" / "geo-route.reference.yaml"

# PromQL words that are not metric names: aggregations and functions are told apart by the "(" after them.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every family (``# TYPE``) and sample name the registry exposes: ``_total``, ``_bucket``, ``_sum``..."""
    names = set()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            # a family with labels has no samples until a child exists: its sample names by type
            names.add(name)
            names.update({"histogram": [f"{name}_bucket", f"{name}_sum", f"{name}_count"]}.get(kind, []))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def nginx_names() -> set[str]:
    """The counters and the gauge the rendered NGINX config's /metrics prints (the http part's Lua)."""
    text = render_nginx_conf(load_settings(REFERENCE, environ={}), "http")
    loop = re.search(r'ipairs\(\{([^}]*)\}\) do\s+local full = "(geo_route_nginx_)" \.\. name', text)
    assert loop, "the counters' loop in templates/geo-route-http.conf.j2 changed; update this test"
    names = {loop.group(2) + name for name in re.findall(r'"(\w+)"', loop.group(1))}
    names.update(re.findall(r"# TYPE (geo_route_nginx_\w+) ", text))
    return names


@pytest.fixture(scope="module")
def real_metrics() -> set[str]:
    verification = CollectorRegistry(auto_describe=True)
    VerificationMetrics(verification)
    names = set().union(*(exported_names(r) for r in (Metrics().registry, UpdaterMetrics().registry, verification)))
    nginx = nginx_names()
    # requests, sent bytes, fallbacks, connections; requests and bytes by operation, fallbacks by cause
    assert len(nginx) == 7, nginx
    return names | nginx | index_gauge_names() | recorded_names()


def index_gauge_names() -> set[str]:
    """What the updater reads from the index at scrape time (``IndexGauges``), from a real store's figures."""
    figures = IndexFigures(0.0, 1, 1, 2.0, 1, 3.0, 0, 4)
    records = {name: StatusRecord(5.0, {}) for name in ("reconcile", "verify")}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IndexGauges(lambda: figures, lambda: records))  # type: ignore[arg-type]
    return exported_names(registry)


def recorded_names() -> set[str]:
    """The recording rules' series (the dashboard may use them)."""
    return {rule["record"] for rule in rules() if "record" in rule}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (promtool has checked it is valid PromQL)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = GROUPING.sub("", text)  # grouping label lists
    names = set()
    for match in IDENTIFIER.finditer(text):
        word = match.group()
        follows = text[match.end() :].lstrip()[:1]
        if word not in KEYWORDS and follows != "(" and not re.fullmatch(r"\d", text[match.start() - 1 : match.start()]):
            names.add(word)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    """Every panel query, with Grafana's range variable made concrete so it is plain PromQL."""
    return [
        target["expr"].replace("$__rate_interval", "5m")
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_every_alert_has_a_duration_severity_and_text() -> None:
    for rule in rules():
        assert ("alert" in rule) != ("record" in rule), rule
    for rule in alerts():
        assert rule["alert"].startswith("GeoRoute")
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert sum("for" in rule for rule in alerts()) >= len(alerts()) - 1  # a verification mismatch alerts at once


def test_promtool_accepts_the_rules_and_every_panel_query(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    as_rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(dashboard_exprs())],
            }
        ]
    }
    panels = tmp_path / "dashboard.rules.yml"
    panels.write_text(yaml.safe_dump(as_rules))
    for path in (RULES, panels):
        checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_unit_tests_fire_the_alerts() -> None:
    promtool = require_binary("promtool", "prometheus")
    tests = ROOT / "deploy" / "prometheus" / "geo-route.rules.test.yml"
    ran = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, cwd=tests.parent)
    assert ran.returncode == 0, ran.stdout + ran.stderr


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_expression_names_only_metrics_that_exist(source: str, real_metrics: set[str]) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else [rule["expr"] for rule in rules()]
    assert exprs
    for expr in exprs:
        names = metric_names_in(expr)
        assert names, expr
        assert names <= real_metrics, f"{sorted(names - real_metrics)} in {expr!r} are not exported"


def test_the_name_extraction_sees_every_selector() -> None:
    expr = 'sum by (le) (rate(a_bucket{x="b{c}",y!~"d"}[5m])) / ignoring(z) b_total offset 5m > bool 0 or on() c'
    assert metric_names_in(expr) == {"a_bucket", "b_total", "c"}


def test_the_operators_questions_have_real_metrics_not_proxies() -> None:
    """Issue 14, item 2: hit ratio recorded, bytes by operation, pin age (no longer the share of
    tag-stale decisions), queues, fallbacks by cause, notification lag by source."""
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    assert "geo_route_nginx_operation_requests_total" in recorded["geo_route:content_hit_ratio:rate5m"]
    assert "geo_route_nginx_operation_sent_bytes_total" in recorded["geo_route:content_byte_hit_ratio:rate5m"]
    pins = next(rule for rule in alerts() if rule["alert"] == "GeoRouteTagPinsPastBound")
    assert metric_names_in(pins["expr"]) == {"geo_route_tag_pin_age_seconds_bucket", "geo_route_max_tag_age_seconds"}
    assert not any("tag-stale" in rule["expr"] for rule in rules())
    used = set().union(*(metric_names_in(expr) for expr in dashboard_exprs()))
    for name in (
        "geo_route_nginx_operation_sent_bytes_total",
        "geo_route_nginx_fallback_causes_total",
        "geo_route_tag_pin_age_seconds_bucket",
        "geo_route_resolution_queue",
        "geo_route_verification_queue",
        "geo_route_notification_lag_seconds_bucket",
        "geo_route_last_reconcile_timestamp_seconds",
    ):
        assert name in used, name
