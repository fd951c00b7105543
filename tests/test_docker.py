"""docker/: the compose file parses and references only files that exist; its site file is valid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from geo_route.config import load_settings
from geo_route.registry_config import Target, render_registry_config
from geo_route.render import render_nginx_conf

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_compose_references_only_existing_files() -> None:
    spec = compose()
    declared_volumes = set(spec.get("volumes") or {})
    assert spec["services"], "no services"
    for name, service in spec["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build["dockerfile"]).is_file(), f"{name}: dockerfile missing"
        else:
            assert service.get("image"), f"{name}: neither build nor image"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in spec["services"], f"{name}: depends on unknown service {dependency}"


def test_published_ports_are_loopback_only() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_dockerfile_copies_existing_paths() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE):
        for source in sources.split():
            assert (DOCKER.parent / source).exists(), f"COPY {source}: missing"


def test_compose_site_file_is_valid() -> None:
    settings = load_settings(DOCKER / "site.yaml", environ={})
    services = compose()["services"]
    assert settings.local_registry.url == "http://secondary:5000" and "secondary" in services
    assert settings.primary.url == "http://primary:5000" and "primary" in services


def test_registry_configs_share_the_token_settings_with_the_site() -> None:
    settings = load_settings(DOCKER / "site.yaml", environ={})
    for site in ("primary", "secondary"):
        token = yaml.safe_load((DOCKER / f"registry-{site}.yml").read_text())["auth"]["token"]
        assert token["issuer"] == settings.token.issuer
        assert token["service"] == settings.token.service
        assert token["rootcertbundle"] == settings.token.rootcertbundle
    service = json.loads((DOCKER / "token-service.json").read_text())
    assert (service["issuer"], service["service"]) == (settings.token.issuer, settings.token.service)


def test_python_modules_run_by_compose_exist() -> None:
    for name, service in compose()["services"].items():
        command = service.get("entrypoint") or []
        if command[:2] == ["python", "-m"]:
            module = DOCKER.parent / (command[2].replace(".", "/") + ".py")
            assert module.is_file(), f"{name}: {command[2]} does not exist"


def test_nginx_reaches_the_auth_service_by_its_compose_name() -> None:
    """NGINX runs in its own container: its auth upstream must be the auth service's name on the
    compose network and the port it binds, not the service's own bind address (0.0.0.0)."""
    settings = load_settings(DOCKER / "site.yaml", environ={})
    text = render_nginx_conf(settings, "http")
    servers = re.findall(r"upstream geo_route_auth \{\s*server (\S+);", text)
    assert len(servers) == 1, servers
    host, _, port = servers[0].rpartition(":")
    services = compose()["services"]
    assert host in services, f"NGINX's auth upstream {servers[0]} is no compose service"
    assert services[host].get("command", [])[:1] == ["serve"], f"{host} does not run the auth service"
    assert port == settings.server.bind[0].rpartition(":")[2]


@pytest.mark.parametrize(("site", "target"), [("primary", "primary"), ("secondary", "local")])
def test_registries_notify_the_updater_as_registry_config_prints(site: str, target: Target) -> None:
    """Both registries notify the compose updater, with the sections `geo-route registry-config`
    prints for it (the secret the site file's updater expects, the same ignore lists)."""
    settings = load_settings(DOCKER / "site.yaml", environ={})
    services = compose()["services"]
    assert services["updater"]["command"][:1] == ["updater"]
    port = settings.updater.bind[0].rpartition(":")[2]
    printed = yaml.safe_load(
        render_registry_config(settings, "distribution-2.8", target, updater_url=f"http://updater:{port}")
    )
    config = yaml.safe_load((DOCKER / f"registry-{site}.yml").read_text())
    assert config["notifications"] == printed["notifications"]
    assert config["auth"] == printed["auth"]


def test_the_token_realm_is_reachable_by_host_clients_and_by_replicate() -> None:
    """Clients on the host follow the realm to the token service's published port; the replicate
    service shares the token service's network namespace, where the realm's loopback is the service."""
    settings = load_settings(DOCKER / "site.yaml", environ={})
    realm = urlsplit(settings.token.realm)
    services = compose()["services"]
    token_service = services["token-service"]
    bind = json.loads((DOCKER / "token-service.json").read_text())["bind"]
    assert (realm.hostname, realm.port) == ("127.0.0.1", int(bind.rpartition(":")[2]))
    assert f"127.0.0.1:{realm.port}:{realm.port}" in token_service["ports"]
    assert services["replicate"]["network_mode"] == "service:token-service"
    assert "tools" in services["replicate"]["profiles"], "replicate runs on demand, not with up"
