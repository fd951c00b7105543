"""`geo-route registry-config` and `geo-route jwks`: what an operator pastes into each dialect's
registry configuration parses, says what geo-route needs, and works with real processes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ISSUER, REALM, SERVICE, MakeToken, SigningKey
from cryptography import x509
from support import require_binary, wait_until

from geo_route.cli import main
from geo_route.config import Settings, load_settings
from geo_route.devstack.client import StackClient, started_stack
from geo_route.devstack.images import build_oci_image
from geo_route.devstack.registry import TokenAuth, registry_binary, registry_major_version, start_registry
from geo_route.devstack.skopeo import docker_reference
from geo_route.errors import ConfigError, TokenError
from geo_route.index.model import IndexQuery, QueryKind
from geo_route.registry_config import (
    BLOB_MEDIA_TYPE,
    DUMMY_MEDIA_TYPE,
    QUEUE_SIZE_LIMIT,
    jwks_document,
    jwks_of,
    render_registry_config,
)
from geo_route.tokens import TokenVerifier
from geo_route.trusted_keys import jwk_thumbprint, libtrust_kid, thumbprints

LOCAL_SECRET = "Bearer local-0123456789abcdef"
PRIMARY_SECRET = "Bearer it's-a \\primary\" secret"  # quotes and a backslash: quoting must hold
UPDATER = """
updater:
  bind: ["127.0.0.1:18081"]
  local_secret: {local}
  primary_secret: {primary}
"""


@pytest.fixture
def site(site_file: Callable[..., Path]) -> Callable[..., Settings]:
    def make(extra: str = "") -> Settings:
        updater = UPDATER.format(local=json.dumps(LOCAL_SECRET), primary=json.dumps(PRIMARY_SECRET))
        return load_settings(site_file(extra=updater + extra), environ={})

    return make


@pytest.mark.parametrize("dialect", ["distribution-2.8", "distribution-3"])
@pytest.mark.parametrize(
    ("target", "url", "secret", "ignored"),
    [
        ("local", "http://127.0.0.1:18081/events/local", LOCAL_SECRET, [DUMMY_MEDIA_TYPE]),
        ("primary", "http://127.0.0.1:18081/events/primary", PRIMARY_SECRET, [BLOB_MEDIA_TYPE]),
    ],
)
def test_distribution_yaml_names_the_updater_its_secret_and_the_token_section(
    site: Callable[..., Settings], dialect: Any, target: Any, url: str, secret: str, ignored: list[str]
) -> None:
    settings = site()
    config = yaml.safe_load(render_registry_config(settings, dialect, target))
    assert set(config) == {"notifications", "auth"}
    (endpoint,) = config["notifications"]["endpoints"]
    assert endpoint == {
        "name": "geo-route",
        "url": url,
        "headers": {"Authorization": [secret]},
        "timeout": "2s",
        "threshold": 5,
        "backoff": "1s",
        "ignore": {"mediatypes": ignored, "actions": ["pull"]},
    }
    token = config["auth"]["token"]
    expected = {"realm": REALM, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": settings.token.rootcertbundle}
    if dialect == "distribution-3":
        expected["jwks"] = "/etc/docker/registry/geo-route.jwks"
    assert token == expected  # no signingalgorithms: token.algorithms is not narrowed


def test_distribution_3_gets_signingalgorithms_when_token_algorithms_narrows(site: Callable[..., Settings]) -> None:
    narrowed = site_with_algorithms(site(), ["RS256", "ES256"])
    token = yaml.safe_load(render_registry_config(narrowed, "distribution-3", jwks_path="/srv/keys.jwks"))["auth"][
        "token"
    ]
    assert token["signingalgorithms"] == ["RS256", "ES256"]
    assert token["jwks"] == "/srv/keys.jwks"
    two_eight = yaml.safe_load(render_registry_config(narrowed, "distribution-2.8"))
    assert "signingalgorithms" not in two_eight["auth"]["token"]  # 2.8 has no such option


def site_with_algorithms(settings: Settings, algorithms: list[str]) -> Settings:
    return dataclasses.replace(settings, token=dataclasses.replace(settings.token, algorithms=tuple(algorithms)))


def test_the_updater_url_can_be_given_and_a_missing_secret_is_an_error(
    site: Callable[..., Settings], settings: Settings
) -> None:
    config = yaml.safe_load(
        render_registry_config(site(), "distribution-2.8", "primary", updater_url="https://geo.example.com/")
    )
    assert config["notifications"]["endpoints"][0]["url"] == "https://geo.example.com/events/primary"
    with pytest.raises(ConfigError, match=r"updater\.local_secret"):
        render_registry_config(settings, "distribution-2.8", "local")  # the plain site file has no secrets


@pytest.mark.parametrize(("target", "secret"), [("local", LOCAL_SECRET), ("primary", PRIMARY_SECRET)])
def test_gitlab_ruby_is_a_notifications_list_with_bounded_retries(
    site: Callable[..., Settings], target: Any, secret: str
) -> None:
    text = render_registry_config(site(), "gitlab", target)
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert code[0] == "registry['notifications'] = [" and code[-1] == "]"
    assert "auth" not in "".join(code)  # Omnibus writes the registry's auth.token itself
    ruby = require_binary("ruby")
    path = Path(site().token.rootcertbundle).parent / f"gitlab-{target}.rb"
    path.write_text(text)
    assert subprocess.run([ruby, "-c", str(path)], capture_output=True, text=True, check=True).stdout == "Syntax OK\n"
    (endpoint,) = evaluate_gitlab_rb(ruby, path)["notifications"]
    assert endpoint == {
        "name": "geo-route",
        "url": f"http://127.0.0.1:18081/events/{target}",
        "headers": {"Authorization": [secret]},
        "timeout": "2s",
        "backoff": "1s",
        "maxretries": 300,  # routing.max_tag_age (300 s) of retries, 1 s apart at least
        "queuesizelimit": QUEUE_SIZE_LIMIT,
        "ignore": {"mediatypes": [DUMMY_MEDIA_TYPE if target == "local" else BLOB_MEDIA_TYPE], "actions": ["pull"]},
    }


def evaluate_gitlab_rb(ruby: str, path: Path) -> dict[str, Any]:
    """Run the snippet as gitlab.rb is run (``registry`` is a hash) and return ``registry`` as JSON."""
    program = "require 'json'; registry = {}; gitlab_rails = {}; eval(File.read(ARGV[0])); print JSON.dump(registry)"
    result = subprocess.run([ruby, "-e", program, str(path)], capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout))


def test_gitlab_maxretries_follow_the_staleness_bound(site: Callable[..., Settings]) -> None:
    text = render_registry_config(site("routing:\n  max_tag_age: 900\n"), "gitlab", "primary")
    assert re.search(r"'maxretries' => 900,", text)


def test_the_jwks_lists_every_bundle_key_under_its_libtrust_id_and_thumbprints(
    settings: Settings, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    keys = jwks_document(settings)["keys"]
    by_kid = {entry["kid"]: entry for entry in keys}
    for signer in (rsa_key, ec_key):
        public = signer.private.public_key()
        assert {libtrust_kid(public), jwk_thumbprint(public)} | thumbprints(public) <= set(by_kid)
    assert by_kid[rsa_key.kid]["kty"] == "RSA" and by_kid[ec_key.kid]["kty"] == "EC"
    assert all(set(entry) <= {"kty", "n", "e", "crv", "x", "y", "kid"} for entry in keys)  # public members only


@pytest.mark.parametrize("name", ["rsa_key", "ec_key"])
def test_a_token_naming_its_key_by_libtrust_kid_verifies_through_the_jwks_file_alone(
    tmp_path: Path, request: pytest.FixtureRequest, untrusted_key: SigningKey, make_token: MakeToken, name: str
) -> None:
    """geo-route's own verifier takes the file as token.jwks; the bundle holds another key only."""
    signer: SigningKey = request.getfixturevalue(name)
    signer_bundle = tmp_path / "signer.pem"
    signer_bundle.write_bytes(signer.certificate_pem())
    other_bundle = tmp_path / "other.pem"
    other_bundle.write_bytes(untrusted_key.certificate_pem())
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "local_registry": {"url": "http://127.0.0.1:5000"},
                "primary": {"url": "http://127.0.0.1:5001"},
                "token": {"realm": REALM, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(signer_bundle)},
            }
        )
    )
    assert main(["jwks", "-c", str(site), "-o", str(tmp_path / "keys.jwks")]) == 0
    token_settings = load_settings(site, environ={}).token
    verifying = dataclasses.replace(token_settings, rootcertbundle=str(other_bundle), jwks=str(tmp_path / "keys.jwks"))
    verifier = TokenVerifier.from_settings(verifying)
    public = signer.private.public_key()
    for kid in (libtrust_kid(public), jwk_thumbprint(public)):
        grants = verifier.verify(make_token(key=signer, headers={"kid": kid}))
        assert grants.subject == "alice"
    with pytest.raises(TokenError, match="kid"):
        TokenVerifier.from_settings(dataclasses.replace(verifying, jwks="")).verify(make_token(key=signer))


def test_the_commands_print_and_write(site_file: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    updater = UPDATER.format(local=json.dumps(LOCAL_SECRET), primary=json.dumps(PRIMARY_SECRET))
    path = site_file(extra=updater)
    assert main(["registry-config", "-c", str(path), "--dialect", "distribution-3", "--for", "primary"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["auth"]["token"]["jwks"]
    assert main(["registry-config", "-c", str(path)]) == 0  # token.dialect (2.8), this site's registry
    assert "events/local" in capsys.readouterr().out
    assert main(["jwks", "-c", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["keys"]
    assert main(["registry-config", "-c", str(site_file())]) == 1  # no secrets: said, nothing printed
    assert "updater.local_secret" in capsys.readouterr().err


# A real registry (Debian's 2.8, or DEVSTACK_REGISTRY_BINARY) started with the printed sections
# delivers its events to a real updater.


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[StackClient]:
    with started_stack(tmp_path / "stack") as client:
        yield client


def test_a_registry_configured_with_the_printed_sections_feeds_the_updater(stack: StackClient, tmp_path: Path) -> None:
    settings = load_settings(stack.info.site_file, environ={})
    dialect = "distribution-3" if registry_major_version(registry_binary()) >= 3 else "distribution-2.8"
    jwks_path = tmp_path / "pasted.jwks"
    printed = yaml.safe_load(render_registry_config(settings, dialect, "local", jwks_path=str(jwks_path)))
    jwks_path.write_text(json.dumps(jwks_document(settings)))
    token = printed["auth"]["token"]
    auth = TokenAuth(
        token["realm"],
        token["service"],
        token["issuer"],
        Path(token["rootcertbundle"]),
        Path(token["jwks"]) if "jwks" in token else None,
    )
    with contextlib.ExitStack() as cleanup:
        registry = start_registry(tmp_path / "pasted", auth, name="pasted", sections=printed)
        cleanup.callback(registry.stop)
        image = build_oci_image(tmp_path / "image", "v1")
        stack.skopeo.copy(
            image.reference, docker_reference(registry.address, "pasted/app", "v1"), dest_creds=stack.credentials()
        )

        def present(kind: QueryKind, digest: str) -> bool:
            return stack.index.lookup(IndexQuery(kind, "pasted/app", digest)).present

        wait_until(lambda: present(QueryKind.MANIFEST, image.digest), 15, "the manifest push event applied")
        wait_until(lambda: all(present(QueryKind.BLOB, b.digest) for b in image.layers), 15, "the blob events")
        assert stack.index.local_tags("pasted/app") == {"v1": image.digest}


def test_jwks_of_one_rsa_certificate_names_its_key_twice(rsa_key: SigningKey) -> None:
    certificate = x509.load_pem_x509_certificate(rsa_key.certificate_pem())
    kids = [entry["kid"] for entry in jwks_of([certificate])["keys"]]
    assert kids == [rsa_key.kid, jwk_thumbprint(rsa_key.private.public_key())]
