# ruff: noqa: E501  (the page template below is HTML; its lines are not wrapped)
"""GET /status: ``status.gather_status`` as an HTML page, only to clients on loopback.

Read-only; the page holds figures and addresses, never a credential or token. The auth service may
bind a non-loopback address for NGINX; ``/status`` answers 404 to any peer but 127.0.0.0/8 and ::1
(NGINX never passes a client's request here: it proxies only its ``auth_request`` subrequest).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from flask import Response, request
from jinja2 import Environment, select_autoescape

from geo_route.config import Settings
from geo_route.status import SiteStatus, StatusSource, describe_run, gather_status, percent, seconds, size

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>geo-route status</title>
<style>
body { font: 15px/1.4 sans-serif; margin: 24px; color: #1d2733; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 22px 0 6px; }
.figures { display: flex; gap: 14px; flex-wrap: wrap; }
.figure { border: 1px solid #c9d3de; border-radius: 6px; padding: 10px 16px; min-width: 170px; background: #f3f7fb; }
.figure b { display: block; font-size: 26px; color: #0b5cad; } .figure span { color: #4b5a6a; font-size: 13px; }
table { border-collapse: collapse; margin-top: 4px; } td, th { border: 1px solid #d5dde6; padding: 3px 9px; }
th { background: #e8eef5; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.problem { color: #a40000; } .muted { color: #5f6b78; }
</style></head><body>
<h1>geo-route status</h1>
<div class="muted">at {{ when }}; counters since NGINX started</div>
<div class="figures">
  <div class="figure" id="hit-ratio"><b>{{ hit_ratio }}</b><span>hit ratio: blob and manifest reads served here</span></div>
  <div class="figure" id="byte-hit-ratio"><b>{{ byte_hit_ratio }}</b><span>of their bytes served here</span></div>
  <div class="figure" id="bytes-saved"><b>{{ bytes_saved }}</b><span>bytes saved: sent here, not from the primary</span></div>
  <div class="figure" id="notification-lag"><b>{{ lag }}</b><span>notification lag (last event, local / primary)</span></div>
  <div class="figure" id="pins-count"><b>{{ pins_count }}</b><span>pins; oldest {{ oldest_pin }}</span></div>
</div>
{% for problem in status.problems %}<p class="problem">problem: {{ problem }}</p>{% endfor %}
{% if traffic %}
<h2>Traffic by route</h2>
<table id="routes"><tr><th>route</th><th>requests</th><th>bytes</th></tr>
{% for route in routes %}<tr><td>{{ route }}</td><td class="n">{{ "%.0f"|format(traffic.requests.get(route, 0)) }}</td>
<td class="n" data-bytes="{{ "%.0f"|format(traffic.sent_bytes.get(route, 0)) }}">{{ size(traffic.sent_bytes.get(route, 0)) }}</td></tr>
{% endfor %}</table>
<h2>Bytes by operation</h2>
<table id="operations"><tr><th>operation</th>{% for route in routes %}<th>{{ route }}</th>{% endfor %}</tr>
{% for operation, by_route in traffic.bytes_by_operation.items() %}<tr><td>{{ operation }}</td>
{% for route in routes %}<td class="n">{{ size(by_route.get(route, 0)) }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h2>Fallbacks by cause</h2>
<table id="fallback-causes"><tr><th>cause</th><th>fallbacks</th></tr>
{% for cause, count in traffic.fallback_causes.items() %}<tr><td>{{ cause }}</td><td class="n">{{ "%.0f"|format(count) }}</td></tr>
{% else %}<tr><td colspan="2">none</td></tr>{% endfor %}</table>
<h2>Recent fallbacks</h2>
<table id="recent"><tr><th>time (UTC)</th><th>route</th><th>request</th><th>local status</th><th>cause</th><th>status</th><th>request id</th></tr>
{% for answer in traffic.recent %}<tr><td>{{ clock(answer.at) }}</td><td>{{ answer.route }}</td><td>{{ answer.method }} {{ answer.operation }}</td>
<td>{{ answer.local_status }}</td><td>{{ answer.cause }}</td><td>{{ answer.status }}</td><td>{{ answer.request_id }}</td></tr>
{% else %}<tr><td colspan="7">none</td></tr>{% endfor %}</table>
{% endif %}
<h2>Updater</h2>
<table id="updater">
{% for name, label in (("reconcile", "last reconciliation"), ("verify", "last verification")) %}
<tr><th>{{ label }}</th><td>{% if name in status.records %}{{ seconds(status.record_age(name)) }} ago,
{{ describe_run(status.records[name]) }}{% else %}never{% endif %}</td></tr>{% endfor %}
{% for source in ("local", "primary") %}{% set record = status.records.get("events:" ~ source) %}
<tr><th>notification lag ({{ source }})</th><td>{% if record %}{{ seconds(record.fields.get("lag", 0)) }}, last event
{{ seconds(status.record_age("events:" ~ source)) }} ago{% else %}no event yet{% endif %}</td></tr>{% endfor %}
{% if status.figures %}<tr><th>resolution queue</th><td>{{ status.figures.resolutions }} ({{ status.figures.resolutions_due }} due,
oldest waiting {{ seconds(status.figures.resolutions_oldest_due) }})</td></tr>
<tr><th>verification queue</th><td>{{ status.figures.suspects }}</td></tr>
<tr><th>quarantined</th><td>{{ status.figures.quarantined }}</td></tr>{% endif %}
</table>
{% if status.pins %}{% set pins = status.pins %}
<h2>Pins (bound {{ status.max_tag_age }} s)</h2>
<p id="pin-states">{{ pins.pins }} pins: {{ pins.fresh }} fresh, {{ pins.within_bound }} due for refresh,
{{ pins.past_bound }} past the bound, {{ pins.unconfirmed }} unconfirmed; {{ pins.tombstones }} tombstones
{% if pins.repositories_read < pins.repositories %}(first {{ pins.repositories_read }} of {{ pins.repositories }} repositories){% endif %}</p>
<table id="pins"><tr><th>tag</th><th>digest</th><th>age</th><th>state</th></tr>
{% for repository, tag, digest, age, state in pins.rows %}<tr><td>{{ repository }}:{{ tag }}</td><td>{{ digest[:19] }}…</td>
<td class="n">{{ seconds(age) }}</td><td>{{ state }}</td></tr>{% endfor %}</table>
{% endif %}
{% if status.topology %}{% set topology = status.topology %}
<h2>Redis</h2>
<table id="redis"><tr><th>mode</th><td>{{ topology.mode }}{% if topology.master_name %} (master name {{ topology.master_name }}){% endif %}</td></tr>
<tr><th>{{ "primaries" if topology.mode == "cluster" else "primary" }}</th><td>{{ topology.primary }} ({{ topology.role }}, Redis {{ topology.version }}, {{ topology.used_memory }} used)</td></tr>
{% for replica in topology.replicas %}<tr><th>replica</th><td>{{ replica }}</td></tr>{% endfor %}
{% for address, answer in topology.sentinels %}<tr><th>sentinel {{ address }}</th><td>names {{ answer }}</td></tr>{% endfor %}
</table>{% endif %}
</body></html>
"""
ROUTES = ("local", "stale", "primary", "fallback", "auth-unavailable", "none")
TEMPLATE = Environment(autoescape=select_autoescape(default=True)).from_string(PAGE)


def render_status_html(status: SiteStatus) -> str:
    traffic = status.traffic
    lags = [status.records.get(f"events:{source}") for source in ("local", "primary")]
    return TEMPLATE.render(
        status=status,
        traffic=traffic,
        routes=ROUTES,
        when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status.generated_at)),
        hit_ratio=percent(traffic.hit_ratio) if traffic else "-",
        byte_hit_ratio=percent(traffic.byte_hit_ratio) if traffic else "-",
        bytes_saved=size(traffic.bytes_saved) if traffic else "-",
        lag=" / ".join(seconds(float(r.fields.get("lag", 0))) if r else "-" for r in lags),
        pins_count=status.pins.pins if status.pins else "-",
        oldest_pin=seconds(status.pins.oldest) if status.pins else "-",
        size=size,
        seconds=seconds,
        describe_run=describe_run,
        clock=lambda at: time.strftime("%H:%M:%S", time.gmtime(at)),
    )


def is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


def status_view(settings: Settings, store: Callable[[], StatusSource]) -> Callable[[], Response]:
    """The view: 404 unless the peer is on loopback; the store is opened on first use."""

    def view() -> Response:
        if not is_loopback(request.remote_addr):
            return Response(b"not found\n", 404, mimetype="text/plain")
        page = render_status_html(gather_status(settings, store()))
        return Response(page, 200, mimetype="text/html", headers={"Cache-Control": "no-store"})

    return view
