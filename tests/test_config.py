"""Settings: defaults → file → GEO_ROUTE_* environment, one error listing every problem."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from geo_route.cli import main
from geo_route.config import DEFAULT_REDIS_URL, Settings, load_settings, redact_url
from geo_route.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["geo-route.reference.yaml", "geo-route.minimal.yaml"])
def test_shipped_examples_load(name: str) -> None:
    settings = load_settings(EXAMPLES / name, environ={})
    assert settings.token.service == "container_registry"
    assert settings.routing.tag_policy == "pinned"
    assert settings.server.bind == ("127.0.0.1:8080",), "loopback by default"


def test_reference_config_documents_every_key() -> None:
    reference = load_settings(EXAMPLES / "geo-route.reference.yaml", environ={})
    minimal = load_settings(EXAMPLES / "geo-route.minimal.yaml", environ={})
    text = (EXAMPLES / "geo-route.reference.yaml").read_text()
    for section in dataclasses.fields(Settings):
        for field in dataclasses.fields(getattr(reference, section.name)):
            assert f"\n  {field.name}:" in text, f"{section.name}.{field.name} missing from the reference config"
    # The reference shows the defaults: it only differs from the minimal file where the minimal one is silent.
    assert reference.redis == minimal.redis and reference.server == minimal.server
    assert reference.nginx == minimal.nginx
    assert reference.token == minimal.token


def test_environment_overrides_file(tmp_path: Path) -> None:
    environ = {
        "GEO_ROUTE_REDIS__URL": "redis://10.1.2.3:6380/2",
        "GEO_ROUTE_REDIS__SOCKET_TIMEOUT": "0.2",
        "GEO_ROUTE_ROUTING__TAG_POLICY": "primary",
        "GEO_ROUTE_SERVER__BIND": "127.0.0.1:9000,[::1]:9000",
        "GEO_ROUTE_TOKEN__ALGORITHMS": "[RS256]",
        "UNRELATED": "x",
    }
    settings = load_settings(EXAMPLES / "geo-route.minimal.yaml", environ=environ)
    assert settings.redis.url == "redis://10.1.2.3:6380/2"
    assert settings.redis.socket_timeout == 0.2
    assert settings.routing.tag_policy == "primary"
    assert settings.server.bind == ("127.0.0.1:9000", "[::1]:9000")
    assert settings.token.algorithms == ("RS256",)


def test_settings_are_frozen() -> None:
    settings = load_settings(EXAMPLES / "geo-route.minimal.yaml", environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.redis.url = "redis://elsewhere"  # type: ignore[misc]


def test_relative_bundle_path_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        (EXAMPLES / "geo-route.minimal.yaml")
        .read_text()
        .replace("/var/opt/gitlab/registry/gitlab-registry.crt", "keys/bundle.pem")
    )
    assert load_settings(path, environ={}).token.rootcertbundle == str(tmp_path / "keys/bundle.pem")


BAD = """\
local_registry: {url: "ftp://nowhere"}
primary: {url: "https://primary.example.com/v2/"}
token: {realm: r, service: s, issuer: "", rootcertbundle: b.pem, algorithms: [RS256, HS256, none], leeway: -5}
redis: {socket_timeout: fast, pasword: x}
routing: {tag_policy: sometimes}
server: {bind: ["0.0.0.0"], workers: 0, log_level: loud}
surprise: true
"""


def test_every_problem_is_listed_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"GEO_ROUTE_REDIS__MAX_CONNECTIONS": "many", "GEO_ROUTE_NOPE": "1"})
    paths = [problem.split(":", 1)[0] for problem in caught.value.problems]
    assert sorted(paths) == sorted(
        [
            "GEO_ROUTE_NOPE",
            "surprise",
            "local_registry.url",
            "primary.url",
            "token.issuer",
            "token.algorithms",
            "token.leeway",
            "redis.pasword",
            "redis.socket_timeout",
            "redis.max_connections",
            "routing.tag_policy",
            "server.bind",
            "server.workers",
            "server.log_level",
        ]
    )


def test_required_sections(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "local_registry.url: required" in caught.value.problems
    assert "token.rootcertbundle: required" in caught.value.problems


@pytest.mark.parametrize("text", ["[1, 2]", "a: [", "local_registry: 5"])
def test_malformed_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_settings(path, environ={})


def test_redis_password_is_never_shown() -> None:
    settings = load_settings(
        EXAMPLES / "geo-route.minimal.yaml", environ={"GEO_ROUTE_REDIS__URL": "redis://u:s3cret@h:1/0"}
    )
    assert "s3cret" not in repr(settings)
    assert settings.redis.display_url == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


class TestCheckConfigCommand:
    def test_valid_file_exits_zero(self, site_file, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
        assert main(["check-config", "-c", str(site_file())]) == 0
        assert ": ok" in capsys.readouterr().out

    def test_invalid_file_lists_problems_and_exits_non_zero(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text(BAD)
        assert main(["check-config", "-c", str(path)]) == 1
        err = capsys.readouterr().err
        assert "local_registry.url" in err and "server.workers" in err and "surprise: unknown key" in err

    def test_unreadable_bundle_is_a_problem(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["check-config", "-c", str(EXAMPLES / "geo-route.minimal.yaml")]) == 1
        assert "token.rootcertbundle: cannot read" in capsys.readouterr().err


def test_check_config_warns_when_the_staleness_bound_is_left_to_chance(site_file: Callable[..., Path]) -> None:
    from geo_route.cli import config_warnings

    settings = load_settings(site_file(), environ={"GEO_ROUTE_ROUTING__MAX_TAG_AGE": "0"})
    warnings = config_warnings(settings)
    assert any("signing_key" in w for w in warnings) and any("max_tag_age is 0" in w for w in warnings)
    bounded = load_settings(site_file(), environ={"GEO_ROUTE_UPDATER__SIGNING_KEY": "/k.pem"})
    assert config_warnings(bounded) == []
    assert bounded.routing.max_tag_age > 0 and bounded.updater.reconcile_interval > 0, "bounded by default"


def test_check_config_warns_when_local_content_is_never_verified(site_file: Callable[..., Path]) -> None:
    from geo_route.cli import config_warnings

    keyed = {"GEO_ROUTE_UPDATER__SIGNING_KEY": "/k.pem"}
    off = load_settings(site_file(), environ={**keyed, "GEO_ROUTE_UPDATER__VERIFY_BYTES_PER_SECOND": "0"})
    assert any("verify_bytes_per_second is 0" in w for w in config_warnings(off))
    unkeyed = load_settings(site_file(), environ={})
    assert any("cannot read local content back" in w for w in config_warnings(unkeyed))
    assert load_settings(site_file(), environ=keyed).updater.verify_bytes_per_second > 0, "on by default"


def test_check_config_warns_when_a_distribution_3_site_lacks_its_registries_jwks(
    site_file: Callable[..., Path], tmp_path: Path
) -> None:
    from geo_route.cli import config_warnings

    keyed = {"GEO_ROUTE_UPDATER__SIGNING_KEY": "/k.pem", "GEO_ROUTE_TOKEN__DIALECT": "distribution-3"}
    alone = load_settings(site_file(), environ=keyed)
    assert any("token.jwks is empty" in w for w in config_warnings(alone))
    jwks = tmp_path / "token.jwks"
    with_jwks = load_settings(site_file(), environ={**keyed, "GEO_ROUTE_TOKEN__JWKS": str(jwks)})
    assert config_warnings(with_jwks) == []


class TestTokenSettings:
    def test_defaults_accept_every_asymmetric_registry_algorithm(self, settings: Settings) -> None:
        assert set(settings.token.algorithms) == {f"{f}{n}" for f in ("RS", "ES", "PS") for n in (256, 384, 512)} | {
            "EdDSA"
        }
        assert settings.token.dialect == "distribution-2.8" and settings.token.jwks == ""
        assert settings.token.accept_v3_0_ec_quirk is False

    @pytest.mark.parametrize("algorithms", ["[HS256]", "[RS256, none]", "[HS512, PS256]", "[]"])
    def test_symmetric_and_none_are_never_accepted(self, site_file: Callable[..., Path], algorithms: str) -> None:
        with pytest.raises(ConfigError) as caught:
            load_settings(site_file(), environ={"GEO_ROUTE_TOKEN__ALGORITHMS": algorithms})
        assert [p.split(":", 1)[0] for p in caught.value.problems] == ["token.algorithms"]

    def test_a_registrys_signingalgorithms_map_onto_algorithms(self, site_file: Callable[..., Path]) -> None:
        settings = load_settings(site_file(), environ={"GEO_ROUTE_TOKEN__ALGORITHMS": "[PS256, EdDSA]"})
        assert settings.token.algorithms == ("PS256", "EdDSA")

    def test_dialect_is_one_of_the_known_registries(self, site_file: Callable[..., Path]) -> None:
        for dialect in ("distribution-2.8", "distribution-3", "gitlab"):
            environ = {"GEO_ROUTE_TOKEN__DIALECT": dialect}
            assert load_settings(site_file(), environ=environ).token.dialect == dialect
        with pytest.raises(ConfigError, match=r"token\.dialect"):
            load_settings(site_file(), environ={"GEO_ROUTE_TOKEN__DIALECT": "distribution-3.1"})

    def test_relative_jwks_path_is_relative_to_the_file(self, site_file: Callable[..., Path]) -> None:
        path = site_file(extra="")
        settings = load_settings(path, environ={"GEO_ROUTE_TOKEN__JWKS": "keys/jwks.json"})
        assert settings.token.jwks == str(path.parent / "keys/jwks.json")

    def test_unreadable_jwks_is_a_check_config_problem(
        self, site_file: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
    ) -> None:
        (tmp_path / "jwks.json").write_text("{}")
        monkeypatch.setenv("GEO_ROUTE_TOKEN__JWKS", str(tmp_path / "jwks.json"))
        assert main(["check-config", "-c", str(site_file())]) == 1
        assert "token.jwks: JWKS file" in capsys.readouterr().err


def test_check_config_warns_when_the_signing_key_has_no_certificate_in_the_bundle(
    site_file: Callable[..., Path], tmp_path: Path, rsa_key: Any
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from geo_route.cli import config_warnings

    def key_file(key: Any, name: str) -> str:
        path = tmp_path / name
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.write_bytes(pem)
        return str(path)

    in_bundle = load_settings(site_file(), environ={"GEO_ROUTE_UPDATER__SIGNING_KEY": key_file(rsa_key.private, "a")})
    assert config_warnings(in_bundle) == []
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    outside = load_settings(site_file(), environ={"GEO_ROUTE_UPDATER__SIGNING_KEY": key_file(stranger, "b")})
    assert [w for w in config_warnings(outside) if "no certificate in token.rootcertbundle" in w]


def test_redis_cluster_nodes_exclude_the_other_topologies(site_file: Callable[..., Path]) -> None:
    extra = "  cluster_nodes: [127.0.0.1:7001]\n  sentinels: [127.0.0.1:26379]\n"
    with pytest.raises(ConfigError) as raised:
        load_settings(site_file(redis_url="redis://127.0.0.1:6380/0", prefix="a{b}:", extra=extra), environ={})
    text = str(raised.value)
    assert "redis.cluster_nodes: not with redis.sentinels" in text
    assert "redis.url: not used with redis.cluster_nodes" in text
    assert "redis.key_prefix: no braces with redis.cluster_nodes" in text
    settings = load_settings(
        site_file(redis_url=DEFAULT_REDIS_URL, extra="  cluster_nodes: [127.0.0.1:7001]\n"), environ={}
    )
    assert settings.redis.cluster_nodes == ("127.0.0.1:7001",) and settings.redis.cluster_buckets == 256
    assert settings.redis.display_url == "cluster via 127.0.0.1:7001"
