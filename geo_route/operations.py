"""Classify (method, raw request URI) into a registry operation and the access it requires.

Routes are tried in the order Distribution 2.8 registers them (base, catalog, tags, manifests,
blobs, uploads, upload chunks; referrers from OCI 1.1), each anchored and validated with the OCI
grammars, so a name with slashes splits the way the registry splits it. Anything that is not a
well-formed registry operation becomes ``UNRECOGNIZED``: it is never served locally.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qs

from geo_route.access import Access

NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = rf"{NAME_COMPONENT}(?:/{NAME_COMPONENT})*"
NAME_MAX_LENGTH = 255
TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
DIGEST = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+"
UPLOAD_ID = r"[A-Za-z0-9_.=-]+"
REGISTERED_DIGESTS = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}
NAME_RE = re.compile(NAME)
TAG_RE = re.compile(TAG)

READ_METHODS = frozenset({"GET", "HEAD"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Kind(Enum):
    BASE = "base"
    CATALOG = "catalog"
    TAGS_LIST = "tags-list"
    MANIFEST_BY_TAG = "manifest-by-tag"
    MANIFEST_BY_DIGEST = "manifest-by-digest"
    MANIFEST_PUT = "manifest-put"
    MANIFEST_DELETE = "manifest-delete"
    BLOB = "blob"
    BLOB_DELETE = "blob-delete"
    UPLOAD_START = "upload-start"
    UPLOAD_MOUNT = "upload-mount"
    UPLOAD_CONTINUE = "upload-continue"
    UPLOAD_FINISH = "upload-finish"
    UPLOAD_STATUS = "upload-status"
    UPLOAD_CANCEL = "upload-cancel"
    REFERRERS = "referrers"
    REPOSITORY_RENAME = "repository-rename"  # GitLab: PATCH /gitlab/v1/repositories/<name>/
    UNRECOGNIZED = "unrecognized"


@dataclass(frozen=True, slots=True)
class Operation:
    """A classified request. ``required`` is what the token must grant, in registry order."""

    kind: Kind
    method: str
    repository: str = ""
    tag: str = ""
    digest: str = ""
    upload_id: str = ""
    mount_from: str = ""
    required: tuple[Access, ...] = ()

    @property
    def is_read(self) -> bool:
        return self.method in READ_METHODS


ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("base", re.compile(r"/v2/?")),
    ("catalog", re.compile(r"/v2/_catalog")),
    ("tags", re.compile(rf"/v2/(?P<name>{NAME})/tags/list")),
    ("manifest", re.compile(rf"/v2/(?P<name>{NAME})/manifests/(?P<ref>{TAG}|{DIGEST})")),
    ("blob", re.compile(rf"/v2/(?P<name>{NAME})/blobs/(?P<ref>{DIGEST})")),
    ("upload", re.compile(rf"/v2/(?P<name>{NAME})/blobs/uploads/?")),
    ("chunk", re.compile(rf"/v2/(?P<name>{NAME})/blobs/uploads/(?P<ref>{UPLOAD_ID})")),
    ("referrers", re.compile(rf"/v2/(?P<name>{NAME})/referrers/(?P<ref>{DIGEST})")),
    ("gitlab-repository", re.compile(rf"/gitlab/v1/repositories/(?P<name>{NAME})/")),
)


def is_valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX_LENGTH and NAME_RE.fullmatch(name) is not None


def is_valid_tag(tag: str) -> bool:
    return TAG_RE.fullmatch(tag) is not None


def is_valid_digest(digest: str) -> bool:
    """OCI digest grammar, and the registered encodings for sha256/sha512; other algorithms are refused."""
    algorithm, _, encoded = digest.partition(":")
    pattern = REGISTERED_DIGESTS.get(algorithm)
    return pattern is not None and pattern.fullmatch(encoded) is not None


def classify_request(method: str, raw_uri: str) -> Operation:
    """The registry operation for a client's method and raw request URI (``$request_uri``)."""
    method = method.upper()
    path, _, query = raw_uri.partition("?")
    for route, pattern in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        name = match.groupdict().get("name") or ""
        if name and len(name) > NAME_MAX_LENGTH:
            break
        return _classify_route(route, method, name, match.groupdict().get("ref") or "", query)
    return Operation(Kind.UNRECOGNIZED, method)


def _classify_route(route: str, method: str, name: str, ref: str, query: str) -> Operation:
    if route == "base":
        return Operation(Kind.BASE, method) if method in READ_METHODS else Operation(Kind.UNRECOGNIZED, method)
    if route == "gitlab-repository":  # GitLab's API belongs to the primary; a PATCH renames (unless a dry run)
        renames = method == "PATCH" and not is_dry_run(query)
        return Operation(Kind.REPOSITORY_RENAME if renames else Kind.UNRECOGNIZED, method, name)
    if route == "catalog":
        catalog = Operation(Kind.CATALOG, method, required=(Access("registry", "catalog", "*"),))
        return _when(method in READ_METHODS, catalog)
    params = parse_qs(query, keep_blank_values=True)
    mount_from = _single(params, "from")
    if mount_from is None or (mount_from and not is_valid_name(mount_from)):
        return Operation(Kind.UNRECOGNIZED, method)
    required = required_access(method, name, mount_from)
    kind = _kind_for(route, method, ref, params, mount_from)
    if kind is None:
        return Operation(Kind.UNRECOGNIZED, method)
    tag, digest, upload_id = "", "", ""
    if route == "chunk":
        upload_id = ref
    elif route == "manifest" and ":" not in ref:
        tag = ref
    elif kind is Kind.UPLOAD_MOUNT:
        digest = _single(params, "mount") or ""
    else:
        digest = ref
    return Operation(kind, method, name, tag, digest, upload_id, mount_from, required)


def _kind_for(route: str, method: str, ref: str, params: dict[str, list[str]], mount_from: str) -> Kind | None:
    if ":" in ref and not is_valid_digest(ref):
        return None
    if route == "manifest" and method in READ_METHODS:
        return Kind.MANIFEST_BY_DIGEST if ":" in ref else Kind.MANIFEST_BY_TAG
    if route == "upload" and method == "POST":
        mount = _single(params, "mount")
        if mount and mount_from:
            return Kind.UPLOAD_MOUNT if is_valid_digest(mount) else None
        return Kind.UPLOAD_START
    return KINDS.get((route, method))


KINDS: dict[tuple[str, str], Kind] = {
    ("tags", "GET"): Kind.TAGS_LIST,
    ("tags", "HEAD"): Kind.TAGS_LIST,
    ("manifest", "PUT"): Kind.MANIFEST_PUT,
    ("manifest", "DELETE"): Kind.MANIFEST_DELETE,
    ("blob", "GET"): Kind.BLOB,
    ("blob", "HEAD"): Kind.BLOB,
    ("blob", "DELETE"): Kind.BLOB_DELETE,
    ("chunk", "PATCH"): Kind.UPLOAD_CONTINUE,
    ("chunk", "PUT"): Kind.UPLOAD_FINISH,
    ("chunk", "GET"): Kind.UPLOAD_STATUS,
    ("chunk", "HEAD"): Kind.UPLOAD_STATUS,
    ("chunk", "DELETE"): Kind.UPLOAD_CANCEL,
    ("referrers", "GET"): Kind.REFERRERS,
    ("referrers", "HEAD"): Kind.REFERRERS,
}


def required_access(method: str, repository: str, mount_from: str = "") -> tuple[Access, ...]:
    """``appendAccessRecords`` of registry 2.8, plus pull on ``from`` whenever it is given."""
    actions: tuple[str, ...]
    if method in READ_METHODS:
        actions = ("pull",)
    elif method in WRITE_METHODS:
        actions = ("pull", "push")
    elif method == "DELETE":
        actions = ("delete",)
    else:
        actions = ()
    required: tuple[Access, ...] = tuple(Access("repository", repository, action) for action in actions)
    if mount_from:
        required += (Access("repository", mount_from, "pull"),)
    return required


GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool


def is_dry_run(query: str) -> bool:
    """A ``dry_run`` GitLab's registry certainly reads as true. Go reads the first value and
    ``ParseBool`` accepts only these spellings; every value must be one of them, so a rename is
    never taken for a dry run (the other way round costs one extra invalidation)."""
    values = parse_qs(query, keep_blank_values=True).get("dry_run", [])
    return bool(values) and all(value in GO_TRUE for value in values)


def _single(params: dict[str, list[str]], key: str) -> str | None:
    """The one value of ``key`` ('' when absent), or None when it is repeated (ambiguous)."""
    values = params.get(key, [])
    if len(values) > 1:
        return None
    return values[0] if values else ""


def _when(condition: bool, operation: Operation) -> Operation:
    return operation if condition else Operation(Kind.UNRECOGNIZED, operation.method)
