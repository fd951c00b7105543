"""What an operator pastes into a registry's configuration so it works with geo-route.

``render_registry_config`` prints, for one registry (this site's, ``local``, or the ``primary``) of
one dialect, the notification endpoint that feeds the updater and the token section that matches
``token.*``: YAML for Distribution 2.8 and 3 (``config.yml``), Ruby for GitLab Omnibus
(``/etc/gitlab/gitlab.rb``). Only where the dialects differ does the output differ: Distribution 3
gets ``jwks`` (its ``rootcertbundle`` keys are named by RFC 7638 thumbprint only, so GitLab's
libtrust-kid tokens need a JWKS file listing them under that kid) and ``signingalgorithms``;
GitLab gets ``maxretries`` and ``queuesizelimit`` (its registry drops events, Distribution's never).

``jwks_document`` is that JWKS file: every key of ``token.rootcertbundle`` under its libtrust
fingerprint and its RFC 7638 thumbprint(s), plus the keys of ``token.jwks`` under their own kid.
The output holds the updater's shared secret (the operator needs it); nothing here logs it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from geo_route.config import SUPPORTED_ALGORITHMS, Dialect, Settings
from geo_route.errors import ConfigError
from geo_route.trusted_keys import PUBLIC_KEY_TYPES, PublicKey, libtrust_kid, load_certificates, load_jwks, thumbprints

Target = Literal["local", "primary"]
DIALECTS: tuple[Dialect, ...] = ("distribution-2.8", "distribution-3", "gitlab")
ENDPOINT_NAME = "geo-route"
# Distribution 2.8 and 3.0 apply ignore.actions only when some media type is listed too (protocol
# notes §1.5); this one matches no event.
DUMMY_MEDIA_TYPE = "application/x-none"
BLOB_MEDIA_TYPE = "application/octet-stream"  # every blob event's mediaType, whatever the layer is
TIMEOUT = "2s"
THRESHOLD = 5
BACKOFF_SECONDS = 1
QUEUE_SIZE_LIMIT = 10_000
DEFAULT_JWKS_PATH = "/etc/docker/registry/geo-route.jwks"


@dataclass(frozen=True)
class Endpoint:
    """The geo-route notification endpoint of one registry."""

    url: str
    secret: str
    ignored_media_types: tuple[str, ...]
    max_retries: int


def endpoint_for(settings: Settings, target: Target, updater_url: str | None = None) -> Endpoint:
    """The updater's URL and secret for ``target``; what the registry may leave out; GitLab's retries."""
    base = (updater_url or default_updater_url(settings)).rstrip("/")
    secret = settings.updater.local_secret if target == "local" else settings.updater.primary_secret
    if not secret:
        raise ConfigError([f"updater.{target}_secret: required (the registry sends it as its Authorization header)"])
    # The updater takes nothing from the primary's blob events (only what this site holds is served
    # here), so the primary need not send them; this site's blob events are what makes blobs local.
    ignored = (DUMMY_MEDIA_TYPE,) if target == "local" else (BLOB_MEDIA_TYPE,)
    return Endpoint(f"{base}/events/{target}", secret, ignored, max_retries_for(settings))


def default_updater_url(settings: Settings) -> str:
    bind = settings.updater.bind[0]
    if bind.startswith("unix:"):
        raise ConfigError(["updater.bind: a unix socket; give the URL the registry reaches it at (--updater-url)"])
    return f"http://{bind}"


def max_retries_for(settings: Settings) -> int:
    """GitLab drops an event after ``maxretries`` failed deliveries: keep it through an outage of
    the updater as long as ``routing.max_tag_age`` (past that a pin is not served anyway, and what a
    dropped event would have added or removed is repaired by re-resolution and reconciliation)."""
    return max(10, math.ceil(retry_horizon(settings) / BACKOFF_SECONDS))


def retry_horizon(settings: Settings) -> int:
    """Seconds an undelivered event is worth retrying: the staleness bound (else reconciliation's)."""
    return settings.routing.max_tag_age or settings.updater.reconcile_interval or 300


def render_registry_config(
    settings: Settings,
    dialect: Dialect,
    target: Target = "local",
    *,
    updater_url: str | None = None,
    jwks_path: str | None = None,
) -> str:
    """The configuration text for one registry of ``dialect``."""
    endpoint = endpoint_for(settings, target, updater_url)
    if dialect == "gitlab":
        return render_gitlab(settings, target, endpoint)
    return render_distribution(settings, dialect, target, endpoint, jwks_path or settings.token.jwks or None)


def render_distribution(
    settings: Settings, dialect: Dialect, target: Target, endpoint: Endpoint, jwks_path: str | None
) -> str:
    which = "this site's registry" if target == "local" else "the primary's registry"
    version = "3" if dialect == "distribution-3" else "2.8"
    lines = [
        f"# geo-route for {which} (Distribution {version}): merge into its config.yml.",
        "# The registry logs the Authorization header below at level info when it starts:",
        "# run it with log: {level: warn}, or keep its log private.",
        "notifications:",
        "  endpoints:",
        f"    - name: {ENDPOINT_NAME}",
        f"      url: {quote(endpoint.url)}",
        "      headers:",
        f"        # sent verbatim; the updater compares the whole value with updater.{target}_secret",
        f"        Authorization: [{quote(endpoint.secret)}]",
        "      # The updater answers within milliseconds (one Redis transaction, or 503 at once when",
        "      # Redis is down); a redelivery after a timeout is harmless (event ids are deduplicated).",
        f"      timeout: {TIMEOUT}",
        "      # Distribution never drops an event: it retries until the updater answers, so these only",
        f"      # pace the retries: after {THRESHOLD} failures in a row it waits the backoff before the next.",
        f"      threshold: {THRESHOLD}",
        f"      backoff: {BACKOFF_SECONDS}s",
        "      ignore:",
        *ignore_comment(target, "        # "),
        f"        mediatypes: [{', '.join(quote(t) for t in endpoint.ignored_media_types)}]",
        "        actions: [pull]",
        *token_section(settings, dialect, jwks_path),
    ]
    return "\n".join(lines) + "\n"


def ignore_comment(target: Target, prefix: str) -> list[str]:
    if target == "local":
        reason = [
            "pull events say nothing about what is here (they fire even for a 404). ignore.actions",
            "needs some media type listed (Distribution 2.8, 3.0, GitLab before v4.32): no event has this one.",
        ]
    else:
        reason = [
            "pull events say nothing; blob events from the primary do not make anything local",
            "(what the primary holds is served by the primary), so it need not send them.",
        ]
    return [prefix + line for line in reason]


def token_section(settings: Settings, dialect: Dialect, jwks_path: str | None) -> list[str]:
    token = settings.token
    lines = [
        "auth:",
        "  token:",
        "    # as geo-route's token.*: the same issuer, audience and keys on every site",
        f"    realm: {quote(token.realm)}",
        f"    service: {quote(token.service)}",
        f"    issuer: {quote(token.issuer)}",
        "    # the certificate(s) of the key that signs registry tokens (the path on the registry's host)",
        f"    rootcertbundle: {quote(token.rootcertbundle)}",
    ]
    narrowed = tuple(token.algorithms) != SUPPORTED_ALGORITHMS
    if dialect == "distribution-3":
        lines += [
            "    # Distribution 3 names the bundle's keys by RFC 7638 thumbprint only: GitLab's tokens (and",
            "    # any with a libtrust kid and no x5c) need this JWKS file, which lists every bundle key under",
            "    # its libtrust fingerprint too. Write it with: geo-route jwks -c SITE -o <this path>",
            f"    jwks: {quote(jwks_path or DEFAULT_JWKS_PATH)}",
        ]
        if narrowed:
            lines += [
                "    # token.algorithms narrows what is accepted: the registry accepts the same",
                f"    signingalgorithms: [{', '.join(quote(a) for a in token.algorithms)}]",
            ]
    elif narrowed:
        lines.append("    # (token.algorithms is narrowed; Distribution 2.8 has no such option: RS*/ES* by key type)")
    return lines


def render_gitlab(settings: Settings, target: Target, endpoint: Endpoint) -> str:
    which = "this site's" if target == "local" else "the primary's"
    horizon = retry_horizon(settings)
    entry = [
        f"    'name' => {ruby_string(ENDPOINT_NAME)},",
        f"    'url' => {ruby_string(endpoint.url)},",
        f"    # sent verbatim; the updater compares the whole value with updater.{target}_secret",
        f"    'headers' => {{ 'Authorization' => [{ruby_string(endpoint.secret)}] }},",
        "    # the updater answers within milliseconds; a redelivery is harmless (ids are deduplicated)",
        f"    'timeout' => {ruby_string(TIMEOUT)},",
        f"    'backoff' => {ruby_string(f'{BACKOFF_SECONDS}s')},",
        "    # GitLab's registry drops an event after maxretries failed deliveries (10 by default);",
        f"    # {endpoint.max_retries} retries, {BACKOFF_SECONDS} s apart at least, last {horizon} s of updater outage",
        "    # (routing.max_tag_age).",
        "    # Past that a lost primary event changes nothing (the pin is no longer served) and a lost",
        "    # event of this site is repaired by reconciliation: content is served by the primary meanwhile.",
        f"    'maxretries' => {endpoint.max_retries},",
        "    # and drops new events while this many wait (default 3000): 10000 holds a burst of pushes",
        "    # during such an outage, a few KB each (tens of MB at most)",
        f"    'queuesizelimit' => {QUEUE_SIZE_LIMIT},",
        *ignore_comment(target, "    # "),
        "    'ignore' => {",
        f"      'mediatypes' => [{', '.join(ruby_string(t) for t in endpoint.ignored_media_types)}],",
        "      'actions' => ['pull'],",
        "    },",
    ]
    token = settings.token
    lines = [
        f"# geo-route for {which} GitLab container registry: /etc/gitlab/gitlab.rb, then gitlab-ctl reconfigure.",
        "# registry['notifications'] replaces the whole list: keep the endpoints you already have",
        "# (on a Geo primary, GitLab's own 'geo_event') next to this one.",
        "registry['notifications'] = [",
        "  {",
        *entry,
        "  },",
        "]",
        "# Token auth: Omnibus writes the registry's auth.token itself; geo-route's token.* must equal it:",
        f"#   realm {token.realm} (GitLab's /jwt/auth), service {token.service},",
        f"#   issuer {token.issuer} (gitlab_rails['registry_issuer']),",
        f"#   rootcertbundle {token.rootcertbundle} (a copy of /var/opt/gitlab/registry/gitlab-registry.crt).",
        "# GitLab's tokens carry a libtrust kid and no x5c: a Distribution 3 registry on a site needs the",
        "# JWKS file of `geo-route jwks` (see `geo-route registry-config --dialect distribution-3`).",
    ]
    return "\n".join(lines) + "\n"


def quote(value: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    return json.dumps(value)


def ruby_string(value: str) -> str:
    """A single-quoted Ruby literal: only ``\\`` and ``'`` are special inside it."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def jwks_document(settings: Settings) -> dict[str, Any]:
    """Every trusted key under every kid a token may name it by: the bundle's keys under their libtrust
    fingerprint and thumbprints, and ``token.jwks``'s under their own kid."""
    extra = load_jwks(settings.token.jwks) if settings.token.jwks else {}
    return jwks_of(load_certificates(settings.token.rootcertbundle), extra)


def jwks_of(certificates: Iterable[x509.Certificate], extra: Mapping[str, PublicKey] | None = None) -> dict[str, Any]:
    keys: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(kid: str, key: PublicKey) -> None:
        if kid not in seen:
            seen.add(kid)
            keys.append({**public_jwk(key), "kid": kid})

    for certificate in certificates:
        key = certificate.public_key()
        if not isinstance(key, PUBLIC_KEY_TYPES):
            continue
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            add(libtrust_kid(key), key)  # libtrust knows RSA and EC keys only
        for kid in sorted(thumbprints(key)):
            add(kid, key)
    for kid, key in (extra or {}).items():
        add(kid, key)
    return {"keys": keys}


def public_jwk(key: PublicKey) -> dict[str, Any]:
    """The public members only (no ``alg``: the registry checks the token's against the key type)."""
    if isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
        return {"kty": "RSA", "n": jwk["n"], "e": jwk["e"]}
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
        return {"kty": "EC", "crv": jwk["crv"], "x": jwk["x"], "y": jwk["y"]}
    jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
    return {"kty": "OKP", "crv": "Ed25519", "x": jwk["x"]}


def jwks_text(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def write_jwks_file(path: Path, certificates: Iterable[x509.Certificate]) -> Path:
    """The JWKS of a bundle at ``path`` (the devstack's Distribution 3 registries)."""
    path.write_text(jwks_text(jwks_of(certificates)), encoding="utf-8")
    return path
