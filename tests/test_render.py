"""NGINX rendering: golden files, every routing header wired, and a real `nginx -t` on the output."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support import free_port, require_binary

from geo_route import contract
from geo_route.cli import main
from geo_route.config import load_settings
from geo_route.errors import ConfigError
from geo_route.render import RenderError, check_with_nginx, render_nginx_conf
from geo_route.routing import Decision, Reason, Route
from geo_route.web.auth import response_headers

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "examples" / "geo-route.reference.yaml"
GOLDEN = {"full": "geo-route.conf", "http": "geo-route-http.conf", "server": "geo-route-server.conf"}


@pytest.mark.parametrize("part", sorted(GOLDEN))
def test_rendered_examples_match_a_fresh_render(part: str) -> None:
    rendered = render_nginx_conf(load_settings(REFERENCE, environ={}), part)  # type: ignore[arg-type]
    golden = ROOT / "nginx" / GOLDEN[part]
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert golden.read_text() == rendered, f"nginx/{GOLDEN[part]} is stale; UPDATE_GOLDEN=1 to regenerate"


def emitted_headers() -> set[str]:
    """Every response header /auth can emit, from the real response builder over every reason."""
    reasons = [value for name, value in vars(Reason).items() if name.isupper()]
    names: set[str] = set()
    for reason in reasons:
        for decision in (
            Decision(200, reason, Route.LOCAL, "/v2/a/manifests/sha256:" + "0" * 64),
            Decision(200, reason, Route.PRIMARY),
            Decision(200, reason, Route.LOCAL, storage_path="/docker/d", storage_link="/docker/l"),
            Decision(401, reason, www_authenticate='Bearer realm="r"'),
        ):
            names.update(name for name, _ in response_headers(decision))
    return names


def test_every_header_the_service_emits_is_wired_in_nginx() -> None:
    config = render_nginx_conf(load_settings(REFERENCE, environ={}), "server")
    for header in emitted_headers() - {"Content-Length", contract.WWW_AUTHENTICATE, contract.REUSE_SECONDS}:
        variable = contract.nginx_variable(header)
        assert re.search(rf"auth_request_set \$\w+ {re.escape(variable)};", config), f"{header} is not captured"
    # WWW-Authenticate of a 401 is copied to the client by auth_request itself; the 401 goes to the JSON body.
    assert "error_page 401 = @geo_route_unauthorized;" in config


def test_decision_cache_honours_the_services_lifetimes(tmp_path: Path) -> None:
    require_binary("nginx")
    settings = load_settings(site_for_nginx(tmp_path), environ={"GEO_ROUTE_NGINX__DECISION_CACHE": "true"})
    text = render_nginx_conf(settings)
    assert "keys_zone=geo_route_decisions:10m" in text
    auth_location = text[text.index("location = /_geo_route/auth") :]
    key = 'proxy_cache_key "$geo_route_auth_token_hash|$request_method|$request_uri|$geo_route_refetch";'
    assert key in auth_location, "a refetch is decided anew (routing.refetch_window)"
    hashed = r'set_hmac_sha256 \$geo_route_auth_token_hash "[^"]+" \$geo_route_auth_authorization;'
    assert re.search(hashed, auth_location), "the key holds a hash of the whole Authorization value sent, no token"
    ignored = re.search(r"proxy_ignore_headers ([^;]+);", auth_location)
    assert ignored and contract.REUSE_SECONDS not in ignored.group(1), "X-Accel-Expires must be honoured"
    assert "proxy_cache_valid" not in text, "only the service's lifetimes apply"
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    check_with_nginx(conf)
    (tmp_path / "off").mkdir()
    assert "proxy_cache " not in render_nginx_conf(load_settings(site_for_nginx(tmp_path / "off"), environ={}))


def test_client_geo_headers_are_cleared_towards_auth_and_upstreams() -> None:
    config = render_nginx_conf(load_settings(REFERENCE, environ={}), "server")
    proxying_blocks = re.findall(r"location [^{]+\{[^}]*proxy_pass[^}]*\}", config)
    assert len(proxying_blocks) == 6  # local, primary, fallback, auth-unavailable, stale, auth
    for block in proxying_blocks:
        for header in contract.ROUTING_HEADERS:
            assert f'proxy_set_header {header} "";' in block
        assert "proxy_set_header Host $http_host;" in block


def site_for_nginx(tmp_path: Path, extra: str = "") -> Path:
    """The reference site with loopback addresses (nginx -t resolves upstream names; no DNS here)."""
    site = tmp_path / "site.yaml"
    text = REFERENCE.read_text().replace("https://registry.primary.example.com", "https://127.0.0.1:5001")
    text = text[: text.index("\nnginx:")]
    site.write_text(
        text
        + f"""
nginx:
  listen: ["127.0.0.1:{free_port()}"]
  runtime_dir: {tmp_path}/run
  access_log: {tmp_path}/access.log
  error_log: {tmp_path}/error.log
{extra}"""
    )
    (tmp_path / "run").mkdir()
    return site


def test_nginx_accepts_the_full_config(tmp_path: Path) -> None:
    require_binary("nginx")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(load_settings(site_for_nginx(tmp_path), environ={})))
    check_with_nginx(conf)


def test_blobs_from_storage_render_only_when_set_and_nginx_accepts_them(tmp_path: Path) -> None:
    require_binary("nginx")
    environ = {
        "GEO_ROUTE_LOCAL_REGISTRY__STORAGE_ROOT": str(tmp_path / "registry"),
        "GEO_ROUTE_LOCAL_REGISTRY__HTTP_HEADERS": "X-Content-Type-Options: nosniff,X-Frame-Options: DENY",
    }
    text = render_nginx_conf(load_settings(site_for_nginx(tmp_path), environ=environ))
    storage = text[text.index("location @geo_route_storage {") :]
    assert f"root {tmp_path / 'registry'};" in storage
    assert 'add_header X-Frame-Options "DENY";' in storage
    assert text.count("try_files /.geo-route-dispatch @geo_route_$geo_route_dispatch;") == 2
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    check_with_nginx(conf)
    assert "@geo_route_storage" not in render_nginx_conf(load_settings(REFERENCE, environ={}))


@pytest.mark.parametrize("root", ["relative/path", "/with space", '/quote"d', "/dollar$x"])
def test_a_storage_root_nginx_cannot_hold_as_written_is_refused(root: str) -> None:
    with pytest.raises(ConfigError, match=r"local_registry\.storage_root"):
        load_settings(REFERENCE, environ={"GEO_ROUTE_LOCAL_REGISTRY__STORAGE_ROOT": root})


# What nginx/README.md tells an existing NGINX to load (Debian's packages enable them by themselves).
MODULES = "\n".join(
    f"load_module /usr/lib/nginx/modules/{name}.so;"
    for name in ("ndk_http_module", "ngx_http_lua_module", "ngx_http_set_misc_module")
)


def test_nginx_accepts_the_parts_included_in_an_existing_server(tmp_path: Path) -> None:
    require_binary("nginx")
    settings = load_settings(site_for_nginx(tmp_path), environ={})
    (tmp_path / "http.conf").write_text(render_nginx_conf(settings, "http"))
    (tmp_path / "server.conf").write_text(render_nginx_conf(settings, "server"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""{MODULES}
pid {tmp_path}/run/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    include {tmp_path}/http.conf;
    server {{
        listen 127.0.0.1:{free_port()};
        server_name registry.secondary.test;
        include {tmp_path}/server.conf;
    }}
}}
"""
    )
    check_with_nginx(conf)


def test_nginx_t_failure_is_reported(tmp_path: Path) -> None:
    require_binary("nginx")
    conf = tmp_path / "broken.conf"
    conf.write_text(f"events {{}}\nhttp {{ server {{ listen 127.0.0.1:{free_port()}; bogus_directive on; }} }}\n")
    with pytest.raises(RenderError, match="bogus_directive"):
        check_with_nginx(conf)


def test_tls_listen_and_http_primary(tmp_path: Path) -> None:
    require_binary("nginx")
    text = render_nginx_conf(
        load_settings(
            site_for_nginx(tmp_path),
            environ={
                "GEO_ROUTE_PRIMARY__URL": "http://10.9.8.7:5000",
                "GEO_ROUTE_NGINX__TLS_CERTIFICATE": "/etc/ssl/geo.crt",
                "GEO_ROUTE_NGINX__TLS_CERTIFICATE_KEY": "/etc/ssl/geo.key",
            },
        )
    )
    assert re.search(r"listen 127\.0\.0\.1:\d+ ssl;", text)
    assert "proxy_pass http://geo_route_primary$request_uri;" in text
    assert "proxy_ssl_verify" not in text


def test_render_cli_writes_atomically_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_binary("nginx")
    output = tmp_path / "out" / "nginx.conf"
    assert main(["render-nginx", "-c", str(site_for_nginx(tmp_path)), "-o", str(output)]) == 0
    assert "nginx -t ok" in capsys.readouterr().err
    assert output.read_text().startswith("# geo-route")
    assert [p.name for p in output.parent.iterdir()] == ["nginx.conf"], "no temporary file left behind"


def test_render_cli_refuses_a_bad_site_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nginx: {listen: 5}\n")
    assert main(["render-nginx", "-c", str(bad)]) == 1
    assert "local_registry.url: required" in capsys.readouterr().err


def test_the_edge_is_sized_from_the_descriptor_limit_and_times_out_slow_clients(tmp_path: Path) -> None:
    require_binary("nginx")
    settings = load_settings(site_for_nginx(tmp_path), environ={"GEO_ROUTE_NGINX__OPEN_FILES_LIMIT": "20000"})
    text = render_nginx_conf(settings)
    assert "worker_rlimit_nofile 20000;" in text
    assert "worker_connections 18750;" in text  # 15/16: logs, listeners and cache files keep the rest
    for directive in (
        "client_header_timeout 10s;",
        "client_body_timeout 30s;",
        "send_timeout 30s;",
        "keepalive_timeout 20s;",
        "reset_timedout_connection on;",
        "limit_conn_zone $binary_remote_addr zone=geo_route_per_address:10m;",
    ):
        assert directive in text, directive
    server = render_nginx_conf(settings, "server")
    for location in ("location /v2/ {", "location /gitlab/v1/ {"):
        block = server[server.index(location) :]
        block = block[: block.index("\n}")]
        assert "limit_conn geo_route_per_address 1024;" in block and "limit_conn_status 429;" in block
        assert "error_page 429 = @geo_route_too_many_requests;" in block
        # 50 denials a second after a burst of 500 (1/50 s each, 10 s ahead at most): then 429
        # before the subrequest; a request the service lets through gives its 1/50 s back.
        assert block.index("rewrite_by_lua_block {") < block.index("auth_request /_geo_route/auth;")
        assert "if due - now > 10 then" in block and "denials:set(address, due + 0.02," in block
        assert "if ngx.var.http_authorization == nil or due - now > 10 / 2 then" in block
        assert "ngx.shared.geo_route_denials:incr(ngx.var.binary_remote_addr, -0.02)" in block
    assert "lua_shared_dict geo_route_denials 10m;" in text
    log_block = server[server.index("log_by_lua_block {") :]
    assert 'local denied = ngx.var.status == "401" or ngx.var.status == "403"' in log_block
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    check_with_nginx(conf)


def test_no_per_address_cap_and_no_metrics_server_when_off(tmp_path: Path) -> None:
    environ = {
        "GEO_ROUTE_NGINX__PER_ADDRESS_CONNECTIONS": "0",
        "GEO_ROUTE_NGINX__PER_ADDRESS_DENIALS": "0",
        "GEO_ROUTE_NGINX__METRICS_LISTEN": "",
        "GEO_ROUTE_ROUTING__REFETCH_WINDOW": "0",
    }
    text = render_nginx_conf(load_settings(site_for_nginx(tmp_path), environ=environ))
    for absent in (
        "limit_conn",
        "geo_route_metrics",
        "log_by_lua",
        "@geo_route_too_many_requests",
        "geo_route_fetched",
        "geo_route_denials",
        "geo_route_limit",
        "rewrite_by_lua",
    ):
        assert absent not in text, absent


def test_metrics_server_listens_apart_and_counts_by_bounded_labels() -> None:
    settings = load_settings(REFERENCE, environ={})
    http_part = render_nginx_conf(settings, "http")
    assert "lua_shared_dict geo_route_metrics 1m;" in http_part
    metrics_server = http_part[http_part.index("server {") :]
    assert "listen 127.0.0.1:9145;" in metrics_server and "location = /metrics {" in metrics_server
    server_part = render_nginx_conf(settings, "server")
    log_block = server_part[server_part.index("log_by_lua_block {") :]
    log_block = log_block[log_block.index("if ngx.var.geo_route_counted") : log_block.index("\n}")]
    series = set(re.findall(r"'(\w+)\{(\w+)=", log_block))
    assert series == {
        ("requests_total", "route"),
        ("sent_bytes_total", "route"),
        ("fallbacks_total", "local_status"),
        ("operation_requests_total", "route"),
        ("operation_sent_bytes_total", "route"),
        ("fallback_causes_total", "cause"),
    }
    assert set(re.findall(r"[{,](\w+)=", log_block)) == {"route", "status", "local_status", "operation", "cause"}
    assert "uri" not in log_block and "repository" not in log_block
    # The operation label is only ever one of the service's own values (operations.Kind), or "none".
    assert 'string.find(operation, "[^a-z-]") then operation = "none"' in log_block


@pytest.mark.parametrize("value", ["9145", "127.0.0.1", "127.0.0.1:9145; evil"])
def test_metrics_listen_must_be_host_and_port(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"nginx\.metrics_listen"):
        load_settings(site_for_nginx(tmp_path), environ={"GEO_ROUTE_NGINX__METRICS_LISTEN": value})


def test_refetches_are_remembered_per_client_address_and_told_to_the_service(tmp_path: Path) -> None:
    """routing.refetch_window: the log phase remembers whole local GETs by digest; the auth
    subrequest sends X-Geo-Refetch from that memory only (never a client's own header)."""
    text = render_nginx_conf(load_settings(site_for_nginx(tmp_path), environ={}))
    assert "lua_shared_dict geo_route_fetched 32m;" in text
    log_block = text[text.index("log_by_lua_block {") :]
    assert 'ngx.var.geo_route_log_route == "local"' in log_block
    assert "ngx.shared.geo_route_fetched:set(ngx.var.binary_remote_addr .. path, true, 600)" in log_block
    auth_location = text[text.index("location = /_geo_route/auth") :]
    assert "proxy_pass_request_headers off;" in auth_location
    assert "proxy_set_header X-Geo-Refetch $geo_route_refetch;" in auth_location
    assert "ngx.shared.geo_route_fetched:get(ngx.var.binary_remote_addr .. path)" in auth_location


def test_nginx_reaches_the_auth_service_on_its_first_unix_socket(tmp_path: Path) -> None:
    """One socket per worker (server.socket_per_worker, PATH.N), else the unix: bind itself."""
    socket = tmp_path / "auth.sock"
    both = {"GEO_ROUTE_SERVER__BIND": f'["127.0.0.1:8080", "unix:{socket}"]', "GEO_ROUTE_SERVER__WORKERS": "3"}
    (tmp_path / "unix").mkdir()
    text = render_nginx_conf(load_settings(site_for_nginx(tmp_path / "unix"), environ=both))
    upstream = re.search(r"upstream geo_route_auth \{(.*?)\}", text, re.DOTALL)
    assert upstream is not None
    servers = re.findall(r"^\s*server ([^;]+);", upstream.group(1), flags=re.MULTILINE)
    expected = [f"unix:{socket}.{n} max_fails=0" for n in range(3)]  # never set aside (a restart decides at once)
    assert servers == expected and "keepalive" in upstream.group(1), upstream.group(1)
    one_socket = ({"GEO_ROUTE_SERVER__SOCKET_PER_WORKER": "false"}, {"GEO_ROUTE_SERVER__WORKER_CLASS": "asgi"})
    for number, override in enumerate(one_socket):
        (tmp_path / f"one{number}").mkdir()
        settings = load_settings(site_for_nginx(tmp_path / f"one{number}"), environ={**both, **override})
        assert auth_upstream_server(render_nginx_conf(settings)) == f"unix:{socket}"
    tcp_only = render_nginx_conf(load_settings(site_for_nginx(tmp_path), environ={}))
    assert "server 127.0.0.1:8080;" in tcp_only and "unix:" not in tcp_only


def auth_upstream_server(text: str) -> str:
    """The one ``server`` of the rendered ``upstream geo_route_auth``."""
    block = re.search(r"upstream geo_route_auth \{([^}]*)\}", text)
    assert block, "no auth upstream rendered"
    servers = re.findall(r"^\s*server (\S+);", block.group(1), flags=re.MULTILINE)
    assert len(servers) == 1, servers
    return servers[0]


@pytest.mark.parametrize(
    ("bind", "reached_at"),
    [
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("[::]:8080", "[::1]:8080"),
        ("10.1.2.3:8080", "10.1.2.3:8080"),
        ("unix:/run/geo-route/auth.sock", "unix:/run/geo-route/auth.sock.0"),
    ],
)
def test_nginx_reaches_the_auth_service_at_a_connectable_address(tmp_path: Path, bind: str, reached_at: str) -> None:
    """A wildcard bind (listen on every address) is no address to connect to: NGINX uses loopback."""
    environ = {"GEO_ROUTE_SERVER__BIND": bind, "GEO_ROUTE_SERVER__WORKERS": "1"}
    settings = load_settings(site_for_nginx(tmp_path), environ=environ)
    assert auth_upstream_server(render_nginx_conf(settings, "http")) == reached_at


def test_nginx_auth_server_names_the_auth_service_on_another_host(tmp_path: Path) -> None:
    """nginx.auth_server: NGINX in another container reaches the service by its name, whatever it binds."""
    environ = {"GEO_ROUTE_SERVER__BIND": "0.0.0.0:8080", "GEO_ROUTE_NGINX__AUTH_SERVER": "auth:8080"}
    settings = load_settings(site_for_nginx(tmp_path), environ=environ)
    assert auth_upstream_server(render_nginx_conf(settings, "http")) == "auth:8080"


def test_a_worker_socket_path_too_long_for_a_unix_socket_is_refused(tmp_path: Path) -> None:
    """PATH.N must fit in sun_path (108 bytes with its NUL) like the bind itself."""
    path = "/run/" + "d" * 98 + ".sock"  # 108 bytes: the bind fits, PATH.1 does not
    site = site_for_nginx(tmp_path)
    load_settings(site, environ={"GEO_ROUTE_SERVER__BIND": f"unix:{path[:-6]}"})
    with pytest.raises(ConfigError, match=r"server\.bind: .*socket_per_worker"):
        load_settings(site, environ={"GEO_ROUTE_SERVER__BIND": f"unix:{path}"})


@pytest.mark.parametrize("value", ["0.0.0.0:8080", "[::]:8080", "auth", "auth:8080; evil"])
def test_nginx_auth_server_must_be_connectable(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"nginx\.auth_server"):
        load_settings(site_for_nginx(tmp_path), environ={"GEO_ROUTE_NGINX__AUTH_SERVER": value})


@pytest.mark.parametrize(
    ("dialect", "content_type"),
    [
        ("distribution-2.8", "application/json; charset=utf-8"),  # v2.8.2 registry/api/errcode/handler.go
        ("distribution-3", "application/json"),  # v3.0.0 registry/api/errcode/handler.go
        ("gitlab", "application/json; charset=utf-8"),
    ],
)
def test_nginx_s_own_401_has_the_dialect_s_content_type(dialect: str, content_type: str) -> None:
    settings = load_settings(REFERENCE, environ={"GEO_ROUTE_TOKEN__DIALECT": dialect})
    config = render_nginx_conf(settings, "server")
    block = config[config.index("location @geo_route_unauthorized {") :]
    block = block[: block.index("\n}")]
    assert f'default_type "{content_type}";' in block, block
