"""``geo-route client-config`` and ``geo-route systemd-units``: every output parses as what it claims
to be (TOML, JSON, systemd unit), and the units pass ``systemd-analyze verify`` where it exists."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from geo_route.cli import main
from geo_route.client_config import Origin, primary_origin, render_client_config, site_origin
from geo_route.config import load_settings
from geo_route.errors import ConfigError
from geo_route.systemd_units import AUTH_UNIT, UPDATER_UNIT, UnitOptions, hidden_path_warnings, render_units

BASE = """\
local_registry: {url: "http://127.0.0.1:5000"}
primary: {url: "https://registry.primary.example.com"}
token: {realm: "https://gitlab.example.com/jwt/auth", service: container_registry, issuer: x, rootcertbundle: /x.crt}
"""
TLS_SITE = BASE + (
    'nginx: {listen: ["0.0.0.0:443"], server_name: "registry-eu.example.com",'
    " tls_certificate: /a.crt, tls_certificate_key: /a.key}\n"
)
HTTP_SITE = BASE + 'nginx: {listen: ["10.0.0.5:5080"]}\n'


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(TLS_SITE)
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "site_url", "expected"),
    [
        (TLS_SITE, None, Origin("https", "registry-eu.example.com")),
        (HTTP_SITE, None, Origin("http", "10.0.0.5:5080")),
        (
            BASE + 'nginx: {listen: ["8443 ssl"], server_name: "_ eu.example"}\n',
            None,
            Origin("http", "eu.example:8443"),
        ),
        (BASE, "https://site.example:5443", Origin("https", "site.example:5443")),
    ],
)
def test_the_site_is_named_from_nginx_or_the_flag(
    tmp_path: Path, text: str, site_url: str | None, expected: Origin
) -> None:
    assert site_origin(load_settings(write(tmp_path, text)), site_url) == expected


def test_a_site_without_a_name_asks_for_site_url(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE + 'nginx: {listen: ["0.0.0.0:5080"]}\n'))
    with pytest.raises(ConfigError, match="--site-url"):
        site_origin(settings)
    assert main(["client-config", "-c", str(tmp_path / "site.yaml"), "--for", "podman"]) == 1


def test_containerd_hosts_toml_mirrors_pulls_and_resolution_only(site_file: Path) -> None:
    settings = load_settings(site_file)
    snippet = render_client_config("containerd", site_origin(settings), primary_origin(settings))
    assert snippet.path == "/etc/containerd/certs.d/registry.primary.example.com/hosts.toml"
    parsed = tomllib.loads(snippet.text)
    assert parsed == {
        "server": "https://registry.primary.example.com",
        "host": {"https://registry-eu.example.com": {"capabilities": ["pull", "resolve"]}},
    }


def test_docker_daemon_json_mirrors_only_docker_hub(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, HTTP_SITE))
    site = site_origin(settings)
    snippet = render_client_config("docker", site, primary_origin(settings))
    assert json.loads(snippet.text) == {"insecure-registries": ["10.0.0.5:5080"]}
    assert any("Docker Hub images only" in note for note in snippet.notes)
    assert any("docker pull 10.0.0.5:5080/" in note for note in snippet.notes)
    hub = render_client_config("docker", site, primary_origin(settings, "registry-1.docker.io"))
    assert json.loads(hub.text) == {
        "registry-mirrors": ["http://10.0.0.5:5080"],
        "insecure-registries": ["10.0.0.5:5080"],
    }


@pytest.mark.parametrize(("text", "insecure"), [(TLS_SITE, False), (HTTP_SITE, True)])
def test_podman_registries_conf_is_v2_with_the_site_as_mirror(tmp_path: Path, text: str, insecure: bool) -> None:
    settings = load_settings(write(tmp_path, text))
    site = site_origin(settings)
    snippet = render_client_config("podman", site, primary_origin(settings))
    (registry,) = tomllib.loads(snippet.text)["registry"]
    assert registry["prefix"] == registry["location"] == "registry.primary.example.com"
    (mirror,) = registry["mirror"]
    assert mirror["location"] == site.host
    assert mirror["pull-from-mirror"] == "all"
    assert mirror.get("insecure", False) is insecure


@pytest.mark.parametrize("client", ["docker", "containerd", "podman"])
def test_the_command_prints_only_the_file_on_standard_output(
    site_file: Path, client: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["client-config", "-c", str(site_file), "--for", client, "--registry", "registry.example:5050"]) == 0
    out, err = capsys.readouterr()
    parsed = json.loads(out) if client == "docker" else tomllib.loads(out)
    assert "registry.example:5050" in json.dumps(parsed) or client == "docker"
    assert err.startswith("# /etc/")


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_units_parse_and_hold_what_a_deployment_needs(site_file: Path) -> None:
    settings = load_settings(site_file)
    units = render_units(settings, UnitOptions(site_file="/etc/geo-route/site.yaml"))
    assert set(units) == {AUTH_UNIT, UPDATER_UNIT}
    for name, command in ((AUTH_UNIT, "serve"), (UPDATER_UNIT, "updater")):
        service = parse_unit(units[name])["Service"]
        assert service["ExecStart"] == f"/opt/geo-route/bin/geo-route {command} -c /etc/geo-route/site.yaml"
        assert service["Restart"] == "on-failure"
        assert service["KillMode"] == "mixed"
        assert service["User"] == service["Group"] == "geo-route"
        for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
            assert service[key] == "yes"
        assert service["ProtectSystem"] == "strict"
        assert service["ReadWritePaths"] == f"/run/{name.removesuffix('.service')}"
        assert int(service["LimitNOFILE"]) >= 65536
    updater = parse_unit(units[UPDATER_UNIT])["Service"]
    assert int(updater["TimeoutStopSec"]) > 80  # the loops' joins on stop, so the leases are released


def test_units_escape_and_grant_what_the_binds_need(tmp_path: Path) -> None:
    text = BASE + 'server: {bind: ["0.0.0.0:443", "unix:/run/geo-route/auth.sock"]}\n'
    units = render_units(load_settings(write(tmp_path, text)), UnitOptions(site_file="/etc/geo route/50%.yaml"))
    service = parse_unit(units[AUTH_UNIT])["Service"]
    assert service["ExecStart"].endswith('serve -c "/etc/geo route/50%%.yaml"')
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["ReadWritePaths"] == "/run/geo-route-auth /run/geo-route"
    updater = parse_unit(units[UPDATER_UNIT])["Service"]
    assert updater["CapabilityBoundingSet"] == ""
    # /run is a tmpfs: the socket's directory exists only because the unit creates it, group-readable
    # so NGINX (in the group) reaches the 0660 socket; it outlives a restart.
    assert (service["RuntimeDirectory"], service["RuntimeDirectoryMode"]) == ("geo-route-auth geo-route", "0750")
    assert service["RuntimeDirectoryPreserve"] == "restart"
    assert (updater["RuntimeDirectory"], updater["RuntimeDirectoryPreserve"]) == ("geo-route-updater", "no")
    assert hidden_path_warnings(UnitOptions(site_file="/tmp/site.yaml"))


SHARED_SOCKETS = (
    'server: {bind: ["127.0.0.1:8080", "unix:/run/geo-route/auth.sock"]}\n'
    'updater: {bind: ["unix:/var/run/geo-route/updater.sock"]}\n'
)


def test_socket_directories_under_run_are_created_and_kept_while_another_unit_uses_them(tmp_path: Path) -> None:
    units = render_units(load_settings(write(tmp_path, BASE + SHARED_SOCKETS)), UnitOptions(site_file="/etc/s.yaml"))
    for name in (AUTH_UNIT, UPDATER_UNIT):
        service = parse_unit(units[name])["Service"]
        assert service["RuntimeDirectory"] == f"{name.removesuffix('.service')} geo-route"
        assert service["RuntimeDirectoryMode"] == "0750"
        # Stopping one unit must not delete the other's socket with the directory they share.
        assert service["RuntimeDirectoryPreserve"] == "yes"
    text = BASE + 'server: {bind: ["unix:/srv/geo-route/auth.sock", "unix:/run/auth.sock"]}\n'
    service = parse_unit(render_units(load_settings(write(tmp_path, text)), UnitOptions(site_file="/s"))[AUTH_UNIT])
    assert service["Service"]["RuntimeDirectory"] == "geo-route-auth"  # neither is a directory under /run
    assert service["Service"]["ReadWritePaths"] == "/run/geo-route-auth /run /srv/geo-route"


@pytest.mark.parametrize("sockets", ["", SHARED_SOCKETS], ids=["tcp", "unix-sockets"])
def test_written_units_pass_systemd_analyze_verify(tmp_path: Path, sockets: str) -> None:
    assert shutil.which("systemd-analyze"), (
        "systemd-analyze is missing: apt-get install systemd (script/bootstrap does)"
    )
    site_file = write(tmp_path, TLS_SITE + sockets)
    # ExecStart must name an executable that exists: this virtualenv's geo-route.
    prefix = str(Path(sys.executable).parent.parent)
    assert main(["systemd-units", "-c", str(site_file), "--prefix", prefix, "-o", str(tmp_path / "units")]) == 0
    paths = sorted(str(path) for path in (tmp_path / "units").iterdir())
    assert [Path(p).name for p in paths] == [AUTH_UNIT, UPDATER_UNIT]
    result = subprocess.run(
        ["systemd-analyze", "verify", *paths], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 on unknown keys and bad values too, and only reports them: none may be reported.
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
