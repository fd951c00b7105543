"""The auth_request contract between NGINX and the auth service, defined once.

The NGINX template is rendered from these names, and a test checks that every response header
the service can emit has its ``auth_request_set``, so code and config cannot drift apart.
"""

from __future__ import annotations

# Request headers NGINX sets on the subrequest (the subrequest itself is always GET).
ORIGINAL_METHOD = "X-Original-Method"
ORIGINAL_URI = "X-Original-URI"
AUTHORIZATION = "Authorization"

# Response headers of GET /auth.
ROUTE = "X-Geo-Route"  # "local" | "primary"
REASON = "X-Geo-Reason"  # see routing.Reason
UPSTREAM_PATH = "X-Geo-Upstream-Path"  # the digest path for a pinned tag served locally
WWW_AUTHENTICATE = "WWW-Authenticate"  # on 401 only

# How long NGINX may reuse the decision (its proxy_cache honours X-Accel-Expires; 0 = never).
# NGINX consumes it; it never reaches a client.
REUSE_SECONDS = "X-Accel-Expires"

RESPONSE_HEADERS = (ROUTE, REASON, UPSTREAM_PATH, WWW_AUTHENTICATE, REUSE_SECONDS)
# NGINX copies WWW-Authenticate of a 401 to the client by itself; the others need auth_request_set.
ROUTING_HEADERS = (ROUTE, REASON, UPSTREAM_PATH)

# The only statuses the auth endpoint ever answers (anything else becomes a 500 in NGINX).
ALLOWED_STATUSES = (200, 401, 403)


def nginx_variable(header: str) -> str:
    """The ``$upstream_http_*`` variable NGINX exposes for a response header."""
    return "$upstream_http_" + header.lower().replace("-", "_")


def wsgi_environ_key(header: str) -> str:
    """The WSGI environ key of a request header (``X-Original-URI`` → ``HTTP_X_ORIGINAL_URI``)."""
    return "HTTP_" + header.upper().replace("-", "_")
