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
from geo_route.render import render_nginx_conf
from geo_route.web.metrics import Metrics, UpdaterMetrics, VerificationMetrics

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
            names.add(line.split()[2])
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
    assert len(nginx) == 4, nginx  # requests, sent bytes, fallbacks, connections
    return names | nginx


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
        assert rule["alert"].startswith("GeoRoute")
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert sum("for" in rule for rule in rules()) >= len(rules()) - 1  # a verification mismatch alerts at once


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
