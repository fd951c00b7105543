"""Fuzzing ``GET /auth`` with hostile requests: 10,000 cases a run, real Redis index, real tokens.

Whatever NGINX forwards (any method, any raw URI, any ``Authorization``, spoofed ``X-Geo-*``
headers), the service answers 200 with a route or 401 with the registry's challenge, never anything
else and never through its internal-error path. The answer is judged against a model of its own:
which tokens registry 2.8 accepts and what they grant (known here because this test minted them),
the operation ``operations.classify_request`` parses from the URI, and what the test put in the
index. So a ``local`` route is only ever given to a read whose token grants pull on the repository
the URI names, of content the index holds.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import io
import json
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import ISSUER, REALM, SERVICE, MakeToken, SigningKey
from flask import Flask
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from support import RedisServer

from geo_route import contract
from geo_route.access import Access
from geo_route.config import load_settings
from geo_route.index.model import BlobPresence, DigestRestored, ManifestPresence, PrimaryTag
from geo_route.index.redis_store import RedisIndexStore
from geo_route.negotiation import DOCKER_MANIFEST, OCI_MANIFEST
from geo_route.operations import NAME, READ_METHODS, TAG, Kind, Operation, classify_request
from geo_route.web import create_app

EXAMPLES = 10_000
D1, D2, D3 = (f"sha256:{n:064x}" for n in (1, 2, 3))
D512 = "sha512:" + "5" * 128
LONGEST_NAME = "a/" * 127 + "b"  # 255 characters: the longest name the registry accepts
TOO_LONG_NAME = "a/" * 128 + "b"  # 257 characters, every component valid
REPOSITORIES = ("group/app", "library/ubuntu", "a", "x/y/z", LONGEST_NAME, TOO_LONG_NAME)

# What the index holds: blob D1, manifests D1 and D2, tag v1 pinned to D1 (here) and v2 to D3 (not here).
SEEDED = ("group/app", "x/y/z", LONGEST_NAME)
SEED_BLOBS = frozenset((repository, D1) for repository in SEEDED)
SEED_MANIFESTS = frozenset((repository, digest) for repository in SEEDED for digest in (D1, D2))
SEED_PINS = {(repository, tag): digest for repository in SEEDED for tag, digest in (("v1", D1), ("v2", D3))}

# The README's decision table for authorized operations that never need the index.
ACCEPTS = ("", OCI_MANIFEST, f"{DOCKER_MANIFEST}, {OCI_MANIFEST}; q=0.9", DOCKER_MANIFEST, "*/*")
WRITES = frozenset({Kind.MANIFEST_PUT, Kind.MANIFEST_DELETE, Kind.BLOB_DELETE, Kind.REPOSITORY_RENAME})
# Writes through the site fence the tags they change; with no fence, seeding again pins them at once.
NO_FENCE = "  socket_timeout: 5\nrouting:\n  write_fence: 0\n"
PRIMARY_REASONS = {
    Kind.CATALOG: "listing",
    Kind.TAGS_LIST: "listing",
    Kind.REFERRERS: "listing",
    Kind.MANIFEST_PUT: "write",
    Kind.MANIFEST_DELETE: "delete",
    Kind.BLOB_DELETE: "delete",
    Kind.REPOSITORY_RENAME: "write",
    **dict.fromkeys(
        (
            Kind.UPLOAD_START,
            Kind.UPLOAD_MOUNT,
            Kind.UPLOAD_CONTINUE,
            Kind.UPLOAD_FINISH,
            Kind.UPLOAD_STATUS,
            Kind.UPLOAD_CANCEL,
        ),
        "upload",
    ),
}
PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")

Grants = dict[tuple[str, str], set[str]]
T = TypeVar("T")


# --- the requests -------------------------------------------------------------------------------------
# Two requests in three are registry operations a client makes (plenty of them served locally), with a
# token that is good one time in three less; in the others any piece may be hostile.

noise = st.text(max_size=8)  # any code point but surrogates: NUL, controls, unicode
ONE_IN_3 = st.integers(1, 3)


def piece(draw: st.DrawFn, plain: st.SearchStrategy[T], odd: st.SearchStrategy[T]) -> T:
    """A draw from ``plain``, or one time in three from ``odd``."""
    return draw(odd if draw(ONE_IN_3) == 1 else plain)


PLAIN_METHODS = ("GET", "GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "PATCH", "DELETE")
ODD_METHODS = ("OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get", "Head", "", " GET", "GET ", "G\x00ET", "GET\r\n")
odd_methods = st.one_of(st.sampled_from(ODD_METHODS), st.text(max_size=12), st.none())

NAME_TRICKS: tuple[Callable[[str], str], ...] = (
    str.upper,
    lambda name: name.replace("/", "%2f"),
    lambda name: name.replace("/", "%2F"),
    lambda name: name.replace("/", "//"),
    lambda name: name.replace("/", "/./"),
    lambda name: name.replace("/", "\\"),
    lambda name: "../" + name,
    lambda name: "%2e%2e/" + name,
    lambda name: name + "/..",
    lambda name: name + "/%2E%2E",
    lambda name: name + "\x00",
    lambda name: name + "%00",
    lambda name: name + "/",
    lambda name: "/" + name,
    lambda name: name.replace("a", "\u0430"),  # Cyrillic a
    lambda name: name + "\u212a",  # Kelvin sign, lowercases to k
    lambda name: name + "\t",
    lambda name: name + ";x=y",
    lambda name: name + "/" + name,
    lambda name: (name + "/") * 40 + name,  # every component valid, far too long
)
ODD_PREFIXES = ("/v2", "//v2/", "/V2/", "/v2//", "v2/", "/v2/./", "/v2/../v2/", "/%76%32/", "/v2%2f", "/v1/", "")
MORE_ODD_PREFIXES = ("http://evil/v2/", "/v2/_catalog/../", "/auth?/v2/", "/v2/ ", "/v2/\x00")
MANIFEST_REFERENCES = ("v1", "v1", "v2", "v3", "latest", D1, D1, D2, D3, D512)
BLOB_REFERENCES = (D1, D1, D2, D3, D512)
PLAIN_PATHS = (
    *(f"/manifests/{reference}" for reference in MANIFEST_REFERENCES),
    *(f"/blobs/{digest}" for digest in BLOB_REFERENCES),
    "/blobs/uploads/",
    "/blobs/uploads/upload-id-1",
    "/tags/list",
    f"/referrers/{D1}",
)
ROUTE_PIECES = ("/manifests/", "/blobs/", "/blobs/uploads/", "/blobs/uploads", "/tags/list", "/referrers/", "/_catalog")
ODD_ROUTE_PIECES = (
    "/Manifests/",
    "/manifests//",
    "/%6danifests/",
    "/blobs/uploads/../../manifests/",
    "/manifests/../blobs/",
    "/manifests/%2e%2e/",
    "",
)
ODD_REFERENCES = (
    D1.upper(),
    "SHA256:" + "1" * 64,
    "sha256:" + "1" * 63,
    "sha256:" + "g" * 64,
    "md5:" + "0" * 32,
    "sha256:",
    "sha256:../../",
    "sha256+b64:abc",
    "v1/..",
    "v1%00",
    "v1;",
    D1 + "/",
    "a" * 128,
    "a" * 129,
    "-v1",
    ".v1",
    "_v1",
    "upload-id-1",
    "",
)
PLAIN_QUERIES = (
    "",
    "",
    "",
    "",
    "",
    "",
    f"?mount={D1}&from=group/app",
    "?from=x/y/z",
    "?n=100&last=v1",
    f"?digest={D1}",
)
ODD_QUERIES = (
    "?",
    f"?mount={D1}&from=x/y/z",
    f"?mount={D1}",
    "?from=group/app&from=a",
    f"?mount={D1}&mount={D2}&from=a",
    "?n=-1&n=5",
    "?%66rom=a",
    "?from=GROUP/APP",
    "?from=" + TOO_LONG_NAME,
    "?;",
    "?&&&",
    "?from",
    "?mount&from=a",
    f"?from=a%2fb&mount={D1}",
    "?from=../group/app",
    f"?from=group/app&mount={D1.upper()}",
)
FRAGMENTS = ("#", "#frag", f"#/../../v2/group/app/blobs/{D1}", "?#", "#?from=a")
BASE_URIS = ("/v2/", "/v2/", "/v2", "/v2/_catalog", "/v2/_catalog?n=10&last=a")

odd_names = st.one_of(
    st.sampled_from(NAME_TRICKS).flatmap(lambda trick: st.sampled_from(REPOSITORIES).map(trick)),
    st.from_regex(NAME, fullmatch=True),
    noise,
)
odd_paths = st.tuples(
    st.one_of(st.sampled_from(ROUTE_PIECES), st.sampled_from(ODD_ROUTE_PIECES), noise),
    st.one_of(
        st.sampled_from(MANIFEST_REFERENCES),
        st.sampled_from(ODD_REFERENCES),
        st.from_regex(TAG, fullmatch=True),
        noise,
    ),
).map("".join)
odd_queries = st.one_of(st.sampled_from(ODD_QUERIES), noise.map(lambda text: "?" + text))
jumbled = st.lists(
    st.sampled_from(
        ("/v2/", *ODD_PREFIXES, *REPOSITORIES, *PLAIN_PATHS, *ROUTE_PIECES, *ODD_REFERENCES, *ODD_QUERIES, *FRAGMENTS)
    ),
    max_size=8,
).map("".join)


def plain_requests(repository: str) -> list[tuple[str, str]]:
    """(method, URI) of registry operations a client makes, mostly reads of ``repository``."""
    names = (repository, repository, repository, "group/app", "x/y/z", "a")
    reads = (
        *(f"/manifests/{reference}" for reference in MANIFEST_REFERENCES),
        *(f"/blobs/{d}" for d in BLOB_REFERENCES),
    )
    other_reads = ("/tags/list", "/tags/list?n=100&last=v1", f"/referrers/{D1}", "/blobs/uploads/upload-id-1")
    writes = (
        ("PUT", "/manifests/v1"),
        ("PUT", f"/manifests/{D2}"),
        ("DELETE", f"/manifests/{D1}"),
        ("DELETE", f"/blobs/{D1}"),
        ("POST", "/blobs/uploads/"),
        ("POST", f"/blobs/uploads/?mount={D1}&from=group/app"),
        ("PATCH", "/blobs/uploads/upload-id-1"),
        ("PUT", f"/blobs/uploads/upload-id-1?digest={D1}"),
        ("DELETE", "/blobs/uploads/upload-id-1"),
    )
    requests = [(method, f"/v2/{name}{path}") for name in names for path in reads for method in ("GET", "GET", "HEAD")]
    requests += [("GET", f"/v2/{name}{path}") for name in names for path in other_reads]
    requests += [(method, f"/v2/{name}{path}") for name in names for method, path in writes]
    return requests + [("GET", "/v2/"), ("HEAD", "/v2/"), ("GET", "/v2/_catalog?n=10")] * 8


# A plain request is one draw (hypothesis spends its time per draw); a hostile one is built piece by piece.
PLAIN_REQUESTS = {repository: st.sampled_from(plain_requests(repository)) for repository in REPOSITORIES}
odd_prefixes = st.one_of(st.sampled_from(ODD_PREFIXES), st.sampled_from(MORE_ODD_PREFIXES))
SHAPES = st.integers(1, 8)


@st.composite
def hostile_uris(draw: st.DrawFn, repository: str) -> str | None:
    shape = draw(SHAPES)
    if shape == 1:
        return None  # no X-Original-URI at all
    if shape == 2:
        return draw(st.text(max_size=300))
    if shape == 3:
        return draw(jumbled)
    if shape == 4:
        return draw(st.sampled_from(BASE_URIS)) + draw(odd_queries)
    prefix = piece(draw, st.just("/v2/"), odd_prefixes)
    name = piece(draw, st.sampled_from((repository, *REPOSITORIES)), odd_names)
    path = piece(draw, st.sampled_from(PLAIN_PATHS), odd_paths)
    query = piece(draw, st.sampled_from(PLAIN_QUERIES), odd_queries)
    return prefix + name + path + query + piece(draw, st.just(""), st.sampled_from(FRAGMENTS))


@dataclass(frozen=True)
class RawAuthorization:
    """A header that carries no token this test signed (absent, garbage, forged)."""

    header: str | None


@dataclass(frozen=True)
class TokenRecipe:
    """A token to mint and how it sits in the header; the model judges it as registry 2.8 does."""

    template: str  # "Bearer {}", "bearer {}", "Basic {}", ...
    key: str  # "rsa", "ec" (trusted), "untrusted", "bad-kid", "alg-none", "hs256-with-public-key"
    iss: str
    aud: Any  # a string or a list (2.8 accepts only a string)
    exp: int | str | None  # seconds from now, a string, or None (absent; exp is required)
    nbf: int | None  # seconds from now, or None (absent)
    access: Any  # the access claim: a list of entries, well formed or not, or garbage
    tamper: bool = False  # one character of the payload changed after signing


BEARER_TEMPLATES = ("Bearer {}", "bearer {}", "BEARER {}")
NOT_BEARER_TEMPLATES = ("Bearer  {}", "Bearer {} ", " Bearer {}", "Basic {}", "{}", "Bearer {}, Bearer x", "Bearer\t{}")
TRUSTED_KEYS = ("rsa", "ec")
FORGED_KEYS = ("untrusted", "bad-kid", "alg-none", "hs256-with-public-key")
PULLING_ACTIONS = (("pull",), ("pull",), ("pull", "push"), ("*",), ("pull", "push", "delete"))
OTHER_ACTIONS = (("pull",), ("push",), ("delete",), ("*",), ())
ODD_ACTIONS = ("pull", "push", "delete", "*", "PULL", "pull ", "")
CATALOG = {"type": "registry", "name": "catalog", "actions": ["*"]}
GARBAGE_ACCESS = (
    "pull",
    {"type": "repository", "name": "group/app", "actions": ["pull"]},
    [1],
    [None],
    [{"type": 1, "name": "group/app", "actions": ["pull"]}],
    [{"type": "repository", "name": "group/app", "actions": "pull"}],
    [{"type": "repository", "name": "group/app", "actions": [1]}],
    [{"type": "repository", "actions": ["pull"]}],
)


def plain_access(repository: str) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Pull (at least) on ``repository``, and maybe something else: one draw."""
    others: list[list[dict[str, Any]]] = [[], [], [], [], [CATALOG]]
    others += [
        [{"type": "repository", "name": name, "actions": list(actions)}]
        for name in REPOSITORIES
        for actions in OTHER_ACTIONS
    ]
    return st.sampled_from(
        [
            [{"type": "repository", "name": repository, "actions": list(actions)}, *other]
            for actions in PULLING_ACTIONS
            for other in others
        ]
    )


def odd_access(repository: str) -> st.SearchStrategy[Any]:
    entry = st.fixed_dictionaries(
        {
            "type": st.sampled_from(("repository", "repository", "registry", "Repository")),
            "name": st.sampled_from((repository, *REPOSITORIES, "catalog", "*", "group/*", "GROUP/APP")),
        },
        optional={"actions": st.lists(st.sampled_from(ODD_ACTIONS), max_size=3)},
    )
    return st.one_of(st.lists(entry, max_size=4), st.sampled_from(GARBAGE_ACCESS))


PLAIN_ACCESS = {repository: plain_access(repository) for repository in REPOSITORIES}
ODD_ACCESS = {repository: odd_access(repository) for repository in REPOSITORIES}
ODD_CLAIMS: dict[str, st.SearchStrategy[Any]] = {
    "template": st.sampled_from((*BEARER_TEMPLATES, *NOT_BEARER_TEMPLATES)),
    "key": st.sampled_from(FORGED_KEYS),
    "iss": st.sampled_from(("evil", ISSUER + " ", ISSUER.upper())),
    "aud": st.sampled_from(([SERVICE], "other", SERVICE.upper())),
    "exp": st.sampled_from((-3600, "3600", None)),
    "nbf": st.just(3600),
    "tamper": st.just(True),
}
odd_fields = st.lists(st.sampled_from((*ODD_CLAIMS, "access")), min_size=1, max_size=2, unique=True)


@st.composite
def token_recipes(draw: st.DrawFn, repository: str) -> TokenRecipe:
    """A good token granting pull on ``repository``; one time in three with one or two things wrong."""
    recipe = TokenRecipe(
        template="Bearer {}",
        key=draw(st.sampled_from(("ec", "ec", "ec", "rsa"))),
        iss=ISSUER,
        aud=SERVICE,
        exp=3600,
        nbf=None,
        access=draw(PLAIN_ACCESS[repository]),
    )
    if draw(ONE_IN_3) == 1:
        for name in draw(odd_fields):
            odd = ODD_ACCESS[repository] if name == "access" else ODD_CLAIMS[name]
            recipe = dataclasses.replace(recipe, **{name: draw(odd)})
    return recipe


RAW_HEADERS = ("", "Bearer", "Bearer ", "Bearer x", "Bearer a.b.c", "Basic YWxpY2U6c2VjcmV0", "Bearer " + "e" * 20_000)
raw_authorizations = st.builds(
    RawAuthorization,
    st.one_of(
        st.none(), st.sampled_from(RAW_HEADERS), st.text(max_size=60), st.text(max_size=60).map("Bearer {}".format)
    ),
)

SPOOF_NAMES = (
    contract.ROUTE,
    contract.REASON,
    contract.UPSTREAM_PATH,
    contract.REUSE_SECONDS,
    contract.WWW_AUTHENTICATE,
    "X-Geo-Anything",
    "X-Forwarded-For",
    "X-Original-Url",
    "X-Real-Ip",
)
spoof_values = st.one_of(st.sampled_from(("local", "primary", f"/v2/group/app/manifests/{D1}", "0", "86400")), noise)
spoofs = st.dictionaries(st.sampled_from(SPOOF_NAMES), spoof_values, min_size=1, max_size=3)


@dataclass(frozen=True)
class FuzzRequest:
    method: str | None
    uri: str | None
    authorization: RawAuthorization | TokenRecipe
    spoof: dict[str, str] = field(default_factory=dict)
    accept: str = ""


TOKEN_RECIPES = {repository: token_recipes(repository) for repository in REPOSITORIES}


@st.composite
def fuzz_requests(draw: st.DrawFn) -> FuzzRequest:
    """Two requests in three are what a registry client sends; in the others any piece may be hostile."""
    repository = draw(st.sampled_from(REPOSITORIES))
    accept = draw(st.sampled_from(ACCEPTS))
    if draw(ONE_IN_3) != 1:
        plain_method, plain_uri = draw(PLAIN_REQUESTS[repository])
        return FuzzRequest(plain_method, plain_uri, draw(TOKEN_RECIPES[repository]), accept=accept)
    method, uri = piece(draw, st.sampled_from(PLAIN_METHODS), odd_methods), draw(hostile_uris(repository))
    authorization: RawAuthorization | TokenRecipe = (
        draw(raw_authorizations) if draw(ONE_IN_3) == 1 else draw(TOKEN_RECIPES[repository])
    )
    return FuzzRequest(method, uri, authorization, spoof=piece(draw, st.just({}), spoofs), accept=accept)


# --- the model ------------------------------------------------------------------------------------------


def expected_grants(authorization: RawAuthorization | TokenRecipe) -> Grants | None:
    """What registry 2.8 makes of the header: the token's grants, or None (no valid token)."""
    if isinstance(authorization, RawAuthorization):
        return None
    recipe = authorization
    valid = (
        recipe.template in BEARER_TEMPLATES
        and recipe.key in TRUSTED_KEYS
        and not recipe.tamper
        and recipe.iss == ISSUER
        and recipe.aud == SERVICE
        and isinstance(recipe.exp, int)
        and recipe.exp > 0
        and (recipe.nbf is None or recipe.nbf < 0)
    )
    return access_claim_grants(recipe.access) if valid else None


def access_claim_grants(claim: Any) -> Grants | None:
    """The ``access`` claim as (type, name) → actions, or None when the claim is malformed."""
    if not isinstance(claim, list):
        return None
    grants: Grants = {}
    for entry in claim:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("type"), str)
            or not isinstance(entry.get("name"), str)
        ):
            return None
        actions = entry.get("actions", [])
        if not isinstance(actions, list) or not all(isinstance(action, str) for action in actions):
            return None
        grants.setdefault((entry["type"], entry["name"]), set()).update(actions)
    return grants


def allows(grants: Grants, access: Access) -> bool:
    granted = grants.get((access.type, access.name), set())
    return access.action in granted or "*" in granted


def expected_route(operation: Operation, accept: str) -> tuple[str, str]:
    """(route, reason) of an authorized, recognized operation, by the seeded index (every pin is
    an OCI manifest: local only for an ``Accept`` that names that type, as the registry answers)."""
    key = (operation.repository, operation.digest)
    if operation.kind is Kind.BASE:
        return "local", "base"
    if operation.kind is Kind.BLOB:
        return ("local", "blob-local") if key in SEED_BLOBS else ("primary", "blob-not-local")
    if operation.kind is Kind.MANIFEST_BY_DIGEST:
        return ("local", "manifest-local") if key in SEED_MANIFESTS else ("primary", "manifest-not-local")
    if operation.kind is Kind.MANIFEST_BY_TAG:
        pinned = SEED_PINS.get((operation.repository, operation.tag))
        if pinned is None:
            return "primary", "tag-not-pinned"
        if (operation.repository, pinned) not in SEED_MANIFESTS:
            return "primary", "tag-not-local"
        return ("local", "tag-pinned") if OCI_MANIFEST in accept else ("primary", "tag-negotiated")
    return "primary", PRIMARY_REASONS[operation.kind]


def check_answer(
    operation: Operation, grants: Grants | None, status: int, headers: dict[str, str], accept: str = ""
) -> None:
    assert status in contract.ALLOWED_STATUSES
    for name, value in headers.items():
        assert PRINTABLE_ASCII.fullmatch(value), f"unsafe response header {name}: {value!r}"
    reason = headers[contract.REASON]
    assert reason != "internal-error", "an exception inside the service"
    if operation.kind is Kind.UNRECOGNIZED:
        assert (status, headers.get(contract.ROUTE), reason) == (200, "primary", "unrecognized")
    elif operation.kind is Kind.REPOSITORY_RENAME:  # GitLab's API: the primary authenticates it
        assert (status, headers.get(contract.ROUTE), reason) == (200, "primary", "write")
    elif grants is None or not all(allows(grants, access) for access in operation.required):
        assert status == 401 and contract.ROUTE not in headers
        assert reason in (("insufficient-scope",) if grants is not None else ("no-token", "invalid-token"))
        challenge = headers[contract.WWW_AUTHENTICATE]
        assert challenge.startswith(f'Bearer realm="{REALM}",service="{SERVICE}"')
        assert challenge.endswith(',error="invalid_token"') == (reason == "invalid-token")
    else:
        assert (status, headers[contract.ROUTE], reason) == (200, *expected_route(operation, accept))
    if headers.get(contract.ROUTE) == "local":  # the point of it all, said once more without the model's help
        assert operation.method in READ_METHODS and grants is not None
        assert operation.kind is Kind.BASE or allows(grants, Access("repository", operation.repository, "pull"))
    if reason == "tag-pinned":
        pinned = SEED_PINS[(operation.repository, operation.tag)]
        assert headers[contract.UPSTREAM_PATH] == f"/v2/{operation.repository}/manifests/{pinned}"
    else:
        assert contract.UPSTREAM_PATH not in headers
    if status != 200:
        assert headers[contract.REUSE_SECONDS] == "0" and contract.WWW_AUTHENTICATE in headers


# --- the shell ------------------------------------------------------------------------------------------


def wsgi_text(text: str) -> str:
    """A header value as a WSGI server hands it over: the raw UTF-8 bytes, decoded as latin-1."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


def call_auth(app: Flask, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """One ``GET /auth`` through the application's WSGI callable, as gunicorn makes it."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/auth",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    environ.update((contract.wsgi_environ_key(name), wsgi_text(value)) for name, value in headers.items())
    answers: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(
        status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        answers.append((status, response_headers))
        return never_written

    body = b"".join(app(environ, start_response))
    [(status_line, response_headers)] = answers
    assert body == b""
    return int(status_line.split(" ", 1)[0]), dict(response_headers)


def never_written(data: bytes) -> object:
    raise AssertionError("the auth endpoint writes no body")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenMint:
    """Signs each recipe once (a run reuses many), with real keys, through ``make_token``."""

    def __init__(self, make_token: MakeToken, keys: dict[str, SigningKey]) -> None:
        self._make_token = make_token
        self._keys = keys
        self._now = int(time.time())
        self._minted: dict[str, str] = {}

    def header(self, authorization: RawAuthorization | TokenRecipe) -> str | None:
        if isinstance(authorization, RawAuthorization):
            return authorization.header
        cache_key = repr(dataclasses.replace(authorization, template=""))
        token = self._minted.get(cache_key) or self._minted.setdefault(cache_key, self.mint(authorization))
        return authorization.template.format(token)

    def mint(self, recipe: TokenRecipe) -> str:
        claims: dict[str, Any] = {
            "iss": recipe.iss,
            "aud": recipe.aud,
            "exp": self._now + recipe.exp if isinstance(recipe.exp, int) else recipe.exp,
            "nbf": None if recipe.nbf is None else self._now + recipe.nbf,
        }
        if recipe.key in ("alg-none", "hs256-with-public-key"):
            token = self.forge(recipe.key, {**claims, "access": recipe.access, "sub": "mallory"})
        else:
            key = self._keys[recipe.key if recipe.key in ("rsa", "untrusted") else "ec"]
            headers = {"kid": key.kid.lower()} if recipe.key == "bad-kid" else None  # the ec key's, misspelt
            token = self._make_token(recipe.access, key=key, headers=headers, **claims)
        if recipe.tamper:
            head, payload, signature = token.split(".")
            middle = len(payload) // 2
            swapped = "B" if payload[middle] == "A" else "A"
            token = f"{head}.{payload[:middle]}{swapped}{payload[middle + 1 :]}.{signature}"
        return token

    def forge(self, how: str, claims: dict[str, Any]) -> str:
        """Classic forgeries: ``alg: none``, and HS256 keyed with the trusted public key's PEM."""
        claims = {name: value for name, value in claims.items() if value is not None}
        algorithm = "none" if how == "alg-none" else "HS256"
        header = {"alg": algorithm, "typ": "JWT", "kid": self._keys["rsa"].kid}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        if how == "alg-none":
            return signing_input + "."
        mac = hmac.new(self._keys["rsa"].public_pem(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"


def seed(index: RedisIndexStore, repositories: Collection[str] = SEEDED) -> None:
    """Presence, pins (OCI manifests, answered now on the index's clock), no deletion marks."""
    now = index.now()
    index.apply(
        [
            *(BlobPresence(repository, digest, True) for repository, digest in SEED_BLOBS),
            *(ManifestPresence(repository, digest, True) for repository, digest in SEED_MANIFESTS),
            *(DigestRestored(repository, digest) for repository, digest in SEED_MANIFESTS),
            *(
                PrimaryTag(repository, tag, digest, now, OCI_MANIFEST)
                for (repository, tag), digest in SEED_PINS.items()
                if repository in repositories
            ),
        ]
    )


@pytest.fixture
def fuzz_app(site_file: Callable[..., Path], redis_server: RedisServer) -> Flask:
    """The auth service on the session's redis-server, with a timeout no scheduler hiccup reaches."""
    path = site_file(redis_url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:12]}:", extra=NO_FENCE)
    app = create_app(load_settings(path, environ={}))
    seed(app.extensions["geo_route"]["index"])
    return app


def test_fuzzed_requests_get_only_the_answers_the_contract_allows(
    fuzz_app: Flask, make_token: MakeToken, rsa_key: SigningKey, ec_key: SigningKey, untrusted_key: SigningKey
) -> None:
    mint = TokenMint(make_token, {"rsa": rsa_key, "ec": ec_key, "untrusted": untrusted_key})
    index: RedisIndexStore = fuzz_app.extensions["geo_route"]["index"]
    tally: Counter[str] = Counter()

    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(request=fuzz_requests())
    def check(request: FuzzRequest) -> None:
        headers = {
            name: value
            for name, value in (
                (contract.ORIGINAL_METHOD, request.method),
                (contract.ORIGINAL_URI, request.uri),
                (contract.AUTHORIZATION, mint.header(request.authorization)),
                ("Accept", request.accept),
            )
            if value is not None
        }
        status, answer = call_auth(fuzz_app, {**request.spoof, **headers})
        operation = classify_request(wsgi_text(request.method or ""), wsgi_text(request.uri or ""))
        check_answer(operation, expected_grants(request.authorization), status, answer, request.accept)
        if request.spoof:
            assert call_auth(fuzz_app, headers) == (status, answer), "client-supplied headers changed the answer"
        if operation.kind in WRITES and status == 200:  # the write invalidated tags or marked a digest: seed again
            seed(index, [operation.repository])
        tally[f"{status} {answer.get(contract.ROUTE, '-')} {answer[contract.REASON]}"] += 1

    check()
    assert sum(tally.values()) >= EXAMPLES
    for answer in [
        "200 local base",
        "200 local blob-local",
        "200 local manifest-local",
        "200 local tag-pinned",
        "200 primary tag-negotiated",
        "200 primary blob-not-local",
        "200 primary tag-not-local",
        "200 primary unrecognized",
        "401 - no-token",
        "401 - invalid-token",
        "401 - insufficient-scope",
    ]:
        assert tally[answer] > 0, (answer, tally)
