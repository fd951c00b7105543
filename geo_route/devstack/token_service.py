"""DEVELOPMENT TOKEN SERVICE: NEVER FOR PRODUCTION.

It stands in for GitLab's ``/jwt/auth`` in the local development stack and the tests, nothing else:
plain-text passwords from a JSON file, no rate limiting, no TLS, no audit, loopback only. In
production the registries' token service is GitLab.

``GET /jwt/auth?service=…&scope=…[&scope=…]`` implements the Docker registry token flow:

* HTTP Basic credentials are checked against the user table; a wrong password or unknown user gets
  401 with ``WWW-Authenticate: Basic realm="…"``.
* No ``Authorization`` header gets an **anonymous** token (``sub: ""``) with no access, as in the
  registry's token spec. skopeo and docker fetch the token themselves after the registry's
  challenge; a request without credentials then fails at the registry with ``unauthorized``, never
  here.
* ``service`` must equal the configured service (else 400); it becomes ``aud``.
* Scopes are parsed and granted as ``token_scopes`` describes: the intersection of what was asked
  and what the user's rules allow, never an error for insufficient access.

Tokens are RS256 JWTs shaped like GitLab's: header ``kid`` (libtrust fingerprint) and ``typ: JWT``;
claims ``iss``, ``sub``, ``aud``, ``exp`` (now + 300), ``nbf`` (now - 5), ``iat``, ``jti``, ``access``.
It is a plain WSGI application (Flask stays in ``geo_route/web``), run under gunicorn with one sync
worker: ``python -m geo_route.devstack.token_service --config CONFIG.json``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hmac
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from gunicorn.app.base import BaseApplication

from geo_route.devstack.keys import load_private_key
from geo_route.devstack.processes import LoggedProcess, http_get, start_until_ready
from geo_route.devstack.token_config import TokenServiceConfig, read_config
from geo_route.devstack.token_scopes import Rules, grant_access, parse_scopes
from geo_route.tokens import libtrust_kid

log = logging.getLogger("geo_route.devstack.token_service")

TOKEN_PATH = "/jwt/auth"
HEALTH_PATH = "/healthz"
TOKEN_LIFETIME = 300
NOT_BEFORE_SKEW = 5
ALGORITHM = "RS256"
STATUS_LINES = {
    200: "200 OK",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
}

Users = Mapping[str, tuple[str, Rules]]
"""username → (password, rules)."""
StartResponse = Callable[..., Any]
Answer = tuple[int, dict[str, Any], list[tuple[str, str]]]


class TokenService:
    """The WSGI application; the key is loaded once, here."""

    def __init__(
        self,
        issuer: str,
        service: str,
        private_key: rsa.RSAPrivateKey,
        users: Users,
        *,
        realm: str = "geo-route devstack",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.service = service
        self.realm = realm
        self._key = private_key
        self._kid = libtrust_kid(private_key.public_key())
        self._users = dict(users)
        self._clock = clock

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path not in (TOKEN_PATH, HEALTH_PATH):
            status, body, headers = error(404, "NOT_FOUND", "no such endpoint")
        elif method not in ("GET", "HEAD"):
            status, body, headers = error(405, "UNSUPPORTED", "only GET")
        elif path == HEALTH_PATH:
            status, body, headers = 200, {"status": "ok"}, []
        else:
            status, body, headers = self.answer(environ.get("QUERY_STRING", ""), environ.get("HTTP_AUTHORIZATION"))
        payload = json.dumps(body).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
            *headers,
        ]
        start_response(STATUS_LINES[status], headers)
        return [payload] if method != "HEAD" else [b""]

    def answer(self, query: str, authorization: str | None) -> Answer:
        params = parse_qs(query, keep_blank_values=True)
        service = params.get("service", [""])[0]
        if service != self.service:
            return error(400, "INVALID_REQUEST", f"service must be {self.service!r}")
        try:
            scopes = parse_scopes(params.get("scope", []))
        except ValueError as exc:
            return error(400, "INVALID_REQUEST", str(exc))
        subject, rules = self.authenticate(authorization)
        if subject is None:
            status, body, _ = error(401, "UNAUTHORIZED", "invalid username or password")
            return status, body, [("WWW-Authenticate", f'Basic realm="{self.realm}"')]
        access = grant_access(scopes, rules)
        asked = " ".join(f"{s.type}:{s.name}:{','.join(s.actions)}" for s in scopes)
        log.info("token for %r: asked %r, granted %s", subject, asked, access)
        return 200, self.issue(subject, access), []

    def authenticate(self, authorization: str | None) -> tuple[str | None, Rules]:
        """(subject, rules): ``("", {})`` when anonymous, ``(None, {})`` when the credentials are wrong."""
        if not authorization:
            return "", {}
        credentials = basic_credentials(authorization)
        if credentials is None:
            return None, {}
        username, password = credentials
        expected, rules = self._users.get(username, ("", {}))
        if username not in self._users or not hmac.compare_digest(password.encode(), expected.encode()):
            return None, {}
        return username, rules

    def issue(self, subject: str, access: list[dict[str, Any]]) -> dict[str, Any]:
        now = int(self._clock())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_LIFETIME,
            "nbf": now - NOT_BEFORE_SKEW,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self._kid, "typ": "JWT"})
        issued_at = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME, "issued_at": issued_at}


def basic_credentials(authorization: str) -> tuple[str, str] | None:
    """(username, password) of a ``Basic`` header, else ``None``."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, separator, password = decoded.partition(":")
    return (username, password) if separator else None


def error(status: int, code: str, message: str) -> Answer:
    return status, {"errors": [{"code": code, "message": message}]}, []


def create_token_app(
    issuer: str,
    service: str,
    private_key_pem_path: str,
    users: Mapping[str, tuple[str, Mapping[str, Collection[str]]]],
) -> TokenService:
    """The development token service as a WSGI application (key read once, from a PEM file)."""
    return TokenService(issuer, service, load_private_key(Path(private_key_pem_path)), users)


class TokenServer(BaseApplication):  # type: ignore[misc]
    """gunicorn: one sync worker on a loopback address."""

    def __init__(self, config: TokenServiceConfig) -> None:
        self.config = config
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [self.config.bind],
            "workers": 1,
            "worker_class": "sync",
            "timeout": 30,
            "graceful_timeout": 5,
            "accesslog": "-",
            "loglevel": "info",
            "proc_name": "geo-route-devstack-token",
        }
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25: no shared ~/.gunicorn socket
            options["control_socket_disable"] = True
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> TokenService:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        config = self.config
        return create_token_app(config.issuer, config.service, config.private_key, config.user_table())


def serve_token_service(config: TokenServiceConfig) -> None:
    """Run until SIGTERM (blocks)."""
    TokenServer(config).run()


@dataclass(frozen=True)
class TokenServiceProcess:
    """A running token service: ``realm`` is what the registries' ``auth.token.realm`` names."""

    config: TokenServiceConfig
    logged: LoggedProcess

    @property
    def url(self) -> str:
        return f"http://{self.config.bind}"

    @property
    def realm(self) -> str:
        return self.url + TOKEN_PATH

    def stop(self) -> None:
        self.logged.stop()


def start_token_service(config: TokenServiceConfig, directory: Path, timeout: float = 30.0) -> TokenServiceProcess:
    """Write ``directory/token-service.json`` and run the service in its own process until it answers."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = config.write(directory / "token-service.json")
    argv = [sys.executable, "-m", "geo_route.devstack.token_service", "--config", str(config_path)]
    health = f"http://{config.bind}{HEALTH_PATH}"
    ready = lambda: http_get(health)[0] == 200  # noqa: E731
    return TokenServiceProcess(config, start_until_ready(argv, directory, "token-service", ready, timeout=timeout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DEVELOPMENT token service (stands in for GitLab's /jwt/auth)")
    parser.add_argument("--config", required=True, help="JSON file written by TokenServiceConfig.write")
    arguments = parser.parse_args(argv)
    serve_token_service(read_config(arguments.config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
