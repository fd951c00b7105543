"""A small read-only Docker registry v2 client on the standard library (``http.client``).

What reconciliation needs: the catalog and tag lists (paginated by ``n`` and the ``Link`` header),
manifests by tag or digest (with an ``Accept`` naming the OCI and Docker types: 2.8 answers 404 for
an OCI manifest otherwise, protocol notes §3.4), and ``HEAD`` of blobs and manifests. Every request
carries ``Authorization`` from an ``Authorizer`` and has a timeout; each thread keeps one keep-alive
connection, and a request on a reused connection that the server has closed is retried once on a
fresh one (every request here is a GET or HEAD, so a retry is harmless).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

from geo_route.errors import GeoRouteError
from geo_route.negotiation import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
PAGE_SIZE = 100  # the registry's own default page; 2.8.2 refuses an n above catalog.maxentries
MAX_PAGES = 100_000  # a server that keeps sending the same Link must not loop forever
NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?', re.IGNORECASE)
USER_AGENT = "geo-route-reconcile"


class RegistryError(GeoRouteError):
    """A request failed: transport error, timeout, or an unexpected status (``status`` 0 for transport)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Authorizer(Protocol):
    def authorization(self, repository: str | None) -> str:
        """The ``Authorization`` value for a repository's pull (``None``: the catalog)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest as the registry serves it; ``children`` for an index, ``blobs`` otherwise."""

    digest: str
    media_type: str
    children: tuple[str, ...]
    blobs: tuple[str, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES or bool(self.children)


@dataclass(frozen=True, slots=True)
class ManifestHead:
    """What a registry answered to ``HEAD`` of a manifest."""

    digest: str
    media_type: str


def parse_next_link(value: str | None) -> str | None:
    """The path and query of a ``Link: <…>; rel="next"`` header (an absolute URL's host is ignored)."""
    if not value:
        return None
    match = NEXT_LINK.search(value)
    if match is None:
        return None
    parts = urlsplit(match.group(1))
    return parts.path + (f"?{parts.query}" if parts.query else "")


def parse_manifest(body: bytes, digest: str, content_type: str) -> Manifest:
    """Children (an index's ``manifests``) or blobs (``config`` + ``layers``; schema 1 ``fsLayers``)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"manifest {digest} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RegistryError(f"manifest {digest} is not a JSON object")
    media_type = str(document.get("mediaType") or content_type.split(";", 1)[0].strip())
    children = tuple(_digests(document.get("manifests")))
    blobs = [] if children else _digests([document.get("config")]) + _digests(document.get("layers"))
    blobs += [str(layer["blobSum"]) for layer in document.get("fsLayers") or [] if isinstance(layer, dict)]
    return Manifest(digest, media_type, children, tuple(dict.fromkeys(blobs)))


def _digests(descriptors: Any) -> list[str]:
    if not isinstance(descriptors, list):
        return []
    return [str(d["digest"]) for d in descriptors if isinstance(d, dict) and isinstance(d.get("digest"), str)]


STREAM_CHUNK = 1 << 20


def pump(response: http.client.HTTPResponse, sink: Callable[[bytes], None]) -> None:
    """The whole body into ``sink``; a short body (the server closed early) is an error.

    ``HTTPResponse.read(amt)`` ends quietly at EOF even when Content-Length bytes are still owed
    (its ``length`` is what is left): a registry that dies mid-body must not look like a whole,
    corrupt body to the verifier. A chunked body cut short raises IncompleteRead by itself."""
    while chunk := response.read(STREAM_CHUNK):
        sink(chunk)
    if response.length:
        raise http.client.IncompleteRead(b"", response.length)


def follow_redirect(
    location: str, timeout: float, tls: ssl.SSLContext | None, sink: Callable[[bytes], None], what: str
) -> bool:
    """Read a redirect's target (object storage: a signed URL, no registry credentials)."""
    parts = urlsplit(location)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(f"{what}: redirect to {location[:100]!r} is not an http(s) URL")
    if parts.scheme == "https":
        context = tls or ssl.create_default_context()
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(
            "GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers={"User-Agent": USER_AGENT}
        )
        response = connection.getresponse()
        if response.status == 404:
            return False
        if response.status != 200:
            raise RegistryError(f"{what}: storage answered HTTP {response.status}", response.status)
        pump(response, sink)
        return True
    except (OSError, http.client.HTTPException) as exc:
        raise RegistryError(f"{what}: storage: {type(exc).__name__} {exc}") from None
    finally:
        connection.close()


def sha256_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class RegistryClient:
    """Read-only access to one registry origin (``http(s)://host[:port]``); safe to share between threads."""

    def __init__(
        self,
        origin: str,
        authorizer: Authorizer,
        *,
        timeout: float = 10.0,
        tls_context: ssl.SSLContext | None = None,
        throttle: Callable[[], None] | None = None,
    ) -> None:
        """``throttle``, if given, is called before every request (and may sleep: a rate limit)."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a registry origin: {origin!r}")
        self.origin = origin.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._authorizer = authorizer
        self._throttle = throttle
        self._timeout = timeout
        self._tls = tls_context or (ssl.create_default_context() if self._https else None)
        self._local = threading.local()
        self._opened: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    # -- the registry API ---------------------------------------------------------------------------

    def list_repositories(self) -> list[str]:
        return self._list_pages("/v2/_catalog", "repositories", None)

    def list_repositories_after(self, last: str, limit: int) -> list[str]:
        """One page of the catalog: at most ``limit`` repositories after ``last`` in its (lexical)
        order, as the registry pages it (``n`` and ``last``); fewer only at the catalog's end."""
        query = urlencode({"n": limit, **({"last": last} if last else {})})
        answer = self.request("GET", f"/v2/_catalog?{query}", None)
        self._expect(answer, "GET /v2/_catalog")
        try:
            return [str(name) for name in json.loads(answer.body).get("repositories") or []]
        except (ValueError, AttributeError) as exc:
            raise RegistryError(f"GET /v2/_catalog: not the expected JSON ({exc})") from None

    def list_tags(self, repository: str) -> list[str] | None:
        """The repository's tags; ``None`` when the registry does not know the repository (404)."""
        try:
            return self._list_pages(f"/v2/{repository}/tags/list", "tags", repository)
        except RegistryError as exc:
            if exc.status == 404:
                return None
            raise

    def get_manifest(self, repository: str, reference: str) -> Manifest | None:
        """The manifest by tag or digest; ``None`` on 404."""
        answer = self.request("GET", self._manifest_path(repository, reference), repository, MANIFEST_ACCEPT)
        if answer.status == 404:
            return None
        self._expect(answer, f"GET manifest {repository}:{reference}")
        digest = reference if ":" in reference else ""  # a tag never contains a colon
        digest = digest or answer.headers.get("docker-content-digest") or sha256_digest(answer.body)
        return parse_manifest(answer.body, digest, answer.headers.get("content-type", ""))

    def head_manifest(self, repository: str, reference: str) -> ManifestHead | None:
        """The digest and media type a tag (or digest) names, asked with every manifest type in
        ``Accept`` (so a list is answered as itself); ``None`` on 404. Falls back to a GET when
        the registry sends no ``Docker-Content-Digest``."""
        answer = self.request("HEAD", self._manifest_path(repository, reference), repository, MANIFEST_ACCEPT)
        if answer.status == 404:
            return None
        self._expect(answer, f"HEAD manifest {repository}:{reference}")
        digest = answer.headers.get("docker-content-digest")
        media_type = answer.headers.get("content-type", "").split(";", 1)[0].strip()
        if digest:
            return ManifestHead(digest, media_type)
        manifest = self.get_manifest(repository, reference)
        return ManifestHead(manifest.digest, manifest.media_type) if manifest else None

    def has_blob(self, repository: str, digest: str) -> bool:
        """``HEAD`` the blob: 200 (or a redirect to storage) → present, 404 → absent."""
        answer = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", repository)
        if answer.status == 404:
            return False
        if answer.status in (200, 307, 302):
            return True
        raise self._unexpected(answer, f"HEAD blob {repository}@{digest}")

    def stream_content(self, repository: str, digest: str, *, manifest: bool, sink: Callable[[bytes], None]) -> bool:
        """GET a blob (or a manifest, by digest) and pass its bytes to ``sink`` chunk by chunk, as
        they arrive; False on 404. A redirect (object storage) is followed without credentials."""
        if manifest:
            target, accept = self._manifest_path(repository, digest), MANIFEST_ACCEPT
        else:
            target, accept = f"/v2/{repository}/blobs/{digest}", None
        headers = {"Authorization": self._authorizer.authorization(repository), "User-Agent": USER_AGENT}
        if accept:
            headers["Accept"] = accept
        what = f"GET {self.origin}{target}"
        for attempt in (1, 2):
            connection, reused = self._connection()
            started = False
            try:
                connection.request("GET", target, headers=headers)
                response = connection.getresponse()
                if response.status in (301, 302, 303, 307, 308):
                    location = response.getheader("location") or ""
                    response.read()
                    if response.will_close:
                        self._drop(connection)
                    return follow_redirect(location, self._timeout, self._tls, sink, what)
                if response.status != 200:
                    body = response.read()
                    if response.will_close:
                        self._drop(connection)
                    if response.status == 404:
                        return False
                    raise self._unexpected(Answer(response.status, {}, body), what)
                started = True
                pump(response, sink)
                if response.will_close:
                    self._drop(connection)
                return True
            except (OSError, http.client.HTTPException) as exc:
                self._drop(connection)
                if reused and attempt == 1 and not started:
                    continue
                raise RegistryError(f"{what}: {type(exc).__name__} {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- plumbing -----------------------------------------------------------------------------------

    def _list_pages(self, path: str, key: str, repository: str | None) -> list[str]:
        items: dict[str, None] = {}
        target: str | None = f"{path}?n={PAGE_SIZE}"
        for _ in range(MAX_PAGES):
            if target is None:
                break
            answer = self.request("GET", target, repository)
            self._expect(answer, f"GET {path}")
            try:
                page = json.loads(answer.body).get(key) or []
            except (ValueError, AttributeError) as exc:
                raise RegistryError(f"GET {path}: not the expected JSON ({exc})") from None
            before = len(items)
            items.update((str(item), None) for item in page)
            target = parse_next_link(answer.headers.get("link"))
            if len(items) == before:
                break
        return list(items)

    @staticmethod
    def _manifest_path(repository: str, reference: str) -> str:
        return f"/v2/{repository}/manifests/{quote(reference, safe=':')}"

    def _expect(self, answer: Answer, what: str) -> None:
        if answer.status != 200:
            raise self._unexpected(answer, what)

    @staticmethod
    def _unexpected(answer: Answer, what: str) -> RegistryError:
        detail = answer.body[:200].decode("utf-8", "replace").strip()
        return RegistryError(f"{what}: HTTP {answer.status} {detail}".rstrip(), answer.status)

    def request(self, method: str, target: str, repository: str | None, accept: str | None = None) -> Answer:
        if self._throttle is not None:
            self._throttle()
        headers = {"Authorization": self._authorizer.authorization(repository), "User-Agent": USER_AGENT}
        if accept:
            headers["Accept"] = accept
        for attempt in (1, 2):
            connection, reused = self._connection()
            try:
                connection.request(method, target, headers=headers)
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(connection)
                if reused and attempt == 1:
                    continue  # the server closed an idle keep-alive connection: once more on a new one
                where = f"{method} {self.origin}{target.split('?', 1)[0]}"
                raise RegistryError(f"{where}: {type(exc).__name__} {exc}") from None
            if response.will_close:
                self._drop(connection)
            answer_headers = {name.lower(): value for name, value in response.getheaders()}
            return Answer(response.status, answer_headers, body)
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, True
        if self._https:
            connection = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._tls)
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        self._local.connection = connection
        with self._lock:
            self._opened.add(connection)
        return connection, False

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._local.connection = None
        with self._lock:
            self._opened.discard(connection)

    def close(self) -> None:
        with self._lock:
            for connection in self._opened:
                connection.close()
            self._opened.clear()
