"""The auth_request contract between NGINX and the auth service, defined once.

The NGINX template is rendered from these names, and a test checks that every response header
the service can emit has its ``auth_request_set``, so code and config cannot drift apart.
"""

from __future__ import annotations

import json
import re

# Request headers NGINX sets on the subrequest (the subrequest itself is always GET).
ORIGINAL_METHOD = "X-Original-Method"
ORIGINAL_URI = "X-Original-URI"
AUTHORIZATION = "Authorization"
ACCEPT = "Accept"  # the client's own, joined when it sent several: content negotiation of pinned tags
# "1" when this client address fetched the same blob or manifest (by digest) whole from the local
# registry within routing.refetch_window: it may have rejected the bytes (NGINX's own memory; a
# client's header of that name never reaches the service).
REFETCH = "X-Geo-Refetch"

# Response headers of GET /auth.
ROUTE = "X-Geo-Route"  # "local" | "primary"
REASON = "X-Geo-Reason"  # see routing.Reason
UPSTREAM_PATH = "X-Geo-Upstream-Path"  # the digest path for a pinned tag served locally
# On a tag routed to the primary: the digest path of a pin NGINX may serve locally if the primary
# cannot be reached (stale-if-error, within routing.stale_if_error; see routing.stale_path).
STALE_PATH = "X-Geo-Stale-Path"
# On a blob present here, with local_registry.storage_root: its file and the repository's link to
# it, below the storage root; NGINX sends the file itself when both exist (routing.with_storage_files).
STORAGE_PATH = "X-Geo-Storage-Path"
STORAGE_LINK = "X-Geo-Storage-Link"
WWW_AUTHENTICATE = "WWW-Authenticate"  # on 401 only
# The request's operation (``operations.Kind``: blob, manifest-by-tag, upload-start, ...): NGINX's
# counters break requests and bytes down by it (a bounded label, never the repository).
OPERATION = "X-Geo-Operation"
# On 401 only: the "detail" of the registry's UNAUTHORIZED error as JSON, written by NGINX into its body.
UNAUTHORIZED_DETAIL = "X-Geo-Unauthorized-Detail"

# How long NGINX may reuse the decision (its proxy_cache honours X-Accel-Expires; 0 = never).
# NGINX consumes it; it never reaches a client.
REUSE_SECONDS = "X-Accel-Expires"

# NGINX copies WWW-Authenticate of a 401 to the client by itself, and consumes X-Accel-Expires; the
# others need auth_request_set (and a client's own copies of them are cleared towards the service
# and the registries).
ROUTING_HEADERS = (
    ROUTE,
    REASON,
    OPERATION,
    UPSTREAM_PATH,
    STALE_PATH,
    STORAGE_PATH,
    STORAGE_LINK,
    UNAUTHORIZED_DETAIL,
)
RESPONSE_HEADERS = (*ROUTING_HEADERS, WWW_AUTHENTICATE, REUSE_SECONDS)

# The only statuses the auth endpoint ever answers (anything else becomes a 500 in NGINX).
ALLOWED_STATUSES = (200, 401, 403)


def nginx_variable(header: str) -> str:
    """The ``$upstream_http_*`` variable NGINX exposes for a response header."""
    return "$upstream_http_" + header.lower().replace("-", "_")


def wsgi_environ_key(header: str) -> str:
    """The WSGI environ key of a request header (``X-Original-URI`` → ``HTTP_X_ORIGINAL_URI``)."""
    return "HTTP_" + header.upper().replace("-", "_")


def asgi_header_name(header: str) -> bytes:
    """The name of a header in an ASGI scope's ``headers`` (``X-Original-URI`` → ``b"x-original-uri"``)."""
    return header.lower().encode("latin-1")


CHALLENGE_SCOPE = re.compile(r',scope="((?:[^"\\]|\\.)*)"')
ESCAPED = re.compile(r"\\(.)")


def unauthorized_detail(challenge: str) -> str:
    """The ``detail`` registry 2.8 writes into a 401's UNAUTHORIZED error, as compact JSON: one
    ``{"Type","Class","Name","Action"}`` record per action of the challenge's ``scope``, in order
    (``null`` when the challenge names no scope, as for ``/v2/``).

    The registry lists the access records the request needed; a challenge names exactly those,
    grouped by resource, so the records come back in the same order (a mount from the same
    repository, which the registry lists as pull, push, pull, comes back as pull, push).
    """
    match = CHALLENGE_SCOPE.search(challenge)
    if match is None:
        return "null"
    records = []
    for scope in ESCAPED.sub(r"\1", match.group(1)).split(" "):
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")  # a name may hold one ":" (registry host:port)
        records += [{"Type": kind, "Class": "", "Name": name, "Action": action} for action in actions.split(",")]
    return json.dumps(records, separators=(",", ":"))
