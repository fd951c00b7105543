"""Request classification: a table of registry operations plus property tests on random input."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geo_route.access import Access
from geo_route.operations import (
    NAME_MAX_LENGTH,
    Kind,
    classify_request,
    is_valid_digest,
    is_valid_name,
    is_valid_tag,
)

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64
D512 = "sha512:" + "c" * 128


def pull(name: str) -> Access:
    return Access("repository", name, "pull")


def push(name: str) -> Access:
    return Access("repository", name, "push")


def delete(name: str) -> Access:
    return Access("repository", name, "delete")


CASES = [
    # method, uri, kind, repository, tag, digest, required
    ("GET", "/v2/", Kind.BASE, "", "", "", ()),
    ("HEAD", "/v2/", Kind.BASE, "", "", "", ()),
    ("GET", "/v2", Kind.BASE, "", "", "", ()),
    ("GET", "/v2/_catalog?n=100", Kind.CATALOG, "", "", "", (Access("registry", "catalog", "*"),)),
    ("GET", "/v2/group/app/tags/list", Kind.TAGS_LIST, "group/app", "", "", (pull("group/app"),)),
    ("GET", "/v2/group/app/tags/list?n=10&last=v1", Kind.TAGS_LIST, "group/app", "", "", (pull("group/app"),)),
    ("GET", "/v2/group/app/manifests/latest", Kind.MANIFEST_BY_TAG, "group/app", "latest", "", (pull("group/app"),)),
    ("HEAD", "/v2/a/b/c/manifests/v1.2_3-rc", Kind.MANIFEST_BY_TAG, "a/b/c", "v1.2_3-rc", "", (pull("a/b/c"),)),
    ("GET", f"/v2/app/manifests/{D1}", Kind.MANIFEST_BY_DIGEST, "app", "", D1, (pull("app"),)),
    ("GET", f"/v2/app/manifests/{D512}", Kind.MANIFEST_BY_DIGEST, "app", "", D512, (pull("app"),)),
    ("PUT", "/v2/app/manifests/latest", Kind.MANIFEST_PUT, "app", "latest", "", (pull("app"), push("app"))),
    ("PUT", f"/v2/app/manifests/{D1}", Kind.MANIFEST_PUT, "app", "", D1, (pull("app"), push("app"))),
    ("DELETE", f"/v2/app/manifests/{D1}", Kind.MANIFEST_DELETE, "app", "", D1, (delete("app"),)),
    ("DELETE", "/v2/app/manifests/latest", Kind.MANIFEST_DELETE, "app", "latest", "", (delete("app"),)),
    ("GET", f"/v2/group/app/blobs/{D1}", Kind.BLOB, "group/app", "", D1, (pull("group/app"),)),
    ("HEAD", f"/v2/group/app/blobs/{D1}", Kind.BLOB, "group/app", "", D1, (pull("group/app"),)),
    ("DELETE", f"/v2/app/blobs/{D1}", Kind.BLOB_DELETE, "app", "", D1, (delete("app"),)),
    ("POST", "/v2/app/blobs/uploads/", Kind.UPLOAD_START, "app", "", "", (pull("app"), push("app"))),
    ("POST", "/v2/app/blobs/uploads", Kind.UPLOAD_START, "app", "", "", (pull("app"), push("app"))),
    ("POST", f"/v2/app/blobs/uploads/?digest={D1}", Kind.UPLOAD_START, "app", "", "", (pull("app"), push("app"))),
    (
        "POST",
        f"/v2/app/blobs/uploads/?mount={D1}&from=other/img",
        Kind.UPLOAD_MOUNT,
        "app",
        "",
        D1,
        (pull("app"), push("app"), pull("other/img")),
    ),
    (
        "POST",
        "/v2/app/blobs/uploads/?from=other/img",
        Kind.UPLOAD_START,
        "app",
        "",
        "",
        (pull("app"), push("app"), pull("other/img")),
    ),
    (
        "PATCH",
        "/v2/app/blobs/uploads/0b7c-11ef?_state=abc%3D",
        Kind.UPLOAD_CONTINUE,
        "app",
        "",
        "",
        (pull("app"), push("app")),
    ),
    (
        "PUT",
        f"/v2/app/blobs/uploads/0b7c-11ef?_state=x&digest={D1}",
        Kind.UPLOAD_FINISH,
        "app",
        "",
        "",
        (pull("app"), push("app")),
    ),
    ("GET", "/v2/app/blobs/uploads/0b7c-11ef", Kind.UPLOAD_STATUS, "app", "", "", (pull("app"),)),
    ("DELETE", "/v2/app/blobs/uploads/0b7c-11ef", Kind.UPLOAD_CANCEL, "app", "", "", (delete("app"),)),
    ("GET", f"/v2/app/referrers/{D1}?artifactType=x", Kind.REFERRERS, "app", "", D1, (pull("app"),)),
    # Names that contain route words split the way the registry's router splits them.
    (
        "GET",
        f"/v2/a/blobs/uploads/manifests/{D1}",
        Kind.MANIFEST_BY_DIGEST,
        "a/blobs/uploads",
        "",
        D1,
        (pull("a/blobs/uploads"),),
    ),
    (
        "GET",
        "/v2/manifests/manifests/manifests",
        Kind.MANIFEST_BY_TAG,
        "manifests",
        "manifests",
        "",
        (pull("manifests"),),
    ),
    ("GET", "/v2/tags/tags/list", Kind.TAGS_LIST, "tags", "", "", (pull("tags"),)),
    ("GET", "/v2/a/tags/list/tags/list", Kind.TAGS_LIST, "a/tags/list", "", "", (pull("a/tags/list"),)),
]


@pytest.mark.parametrize(("method", "uri", "kind", "repository", "tag", "digest", "required"), CASES)
def test_classification_table(
    method: str, uri: str, kind: Kind, repository: str, tag: str, digest: str, required: tuple[Access, ...]
) -> None:
    operation = classify_request(method, uri)
    assert (operation.kind, operation.repository, operation.tag, operation.digest) == (kind, repository, tag, digest)
    assert operation.required == required


UNRECOGNIZED = [
    ("GET", "/"),
    ("GET", "/v1/_ping"),
    ("GET", "/v2/Upper/manifests/latest"),
    ("GET", "/v2/app/manifests/"),
    ("GET", "/v2/app/manifests/-leading-dash"),
    ("GET", "/v2/app/manifests/" + "t" * 129),
    ("GET", "/v2/app/blobs/latest"),
    ("GET", "/v2/app/blobs/sha256:short"),
    ("GET", "/v2/app/blobs/sha256:" + "A" * 64),
    ("GET", "/v2/app/blobs/md5:" + "a" * 32),
    ("GET", "/v2/app/manifests/sha384:" + "a" * 96),
    ("GET", "/v2/app//manifests/latest"),
    ("GET", "/v2/app/../secret/manifests/latest"),
    ("GET", "/v2/app%2Fother/manifests/latest"),
    ("GET", "/v2/app/manifests/latest/extra"),
    ("POST", "/v2/app/manifests/latest"),
    ("PATCH", f"/v2/app/blobs/{D1}"),
    ("PUT", f"/v2/app/blobs/{D1}"),
    ("POST", "/v2/"),
    ("DELETE", "/v2/_catalog"),
    ("OPTIONS", "/v2/app/manifests/latest"),
    ("GET", "/v2/app/tags/list/extra"),
    ("POST", f"/v2/app/blobs/uploads/?mount={D1}&from=BAD"),
    ("POST", "/v2/app/blobs/uploads/?mount=nonsense&from=other"),
    ("POST", f"/v2/app/blobs/uploads/?mount={D1}&from=a&from=b"),
    ("GET", "/v2/" + "/".join(["a" * 60] * 5) + "/manifests/latest"),
    ("", ""),
    ("GET", ""),
]


@pytest.mark.parametrize(("method", "uri"), UNRECOGNIZED)
def test_anything_else_is_unrecognized(method: str, uri: str) -> None:
    operation = classify_request(method, uri)
    assert operation.kind is Kind.UNRECOGNIZED
    assert operation.required == ()


def test_method_is_case_insensitive() -> None:
    assert classify_request("get", "/v2/app/manifests/latest").kind is Kind.MANIFEST_BY_TAG


@pytest.mark.parametrize("name", ["a", "a/b", "a.b_c__d---e/f0", "x" * NAME_MAX_LENGTH])
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name", ["", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "x" * (NAME_MAX_LENGTH + 1)]
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)


# ---- properties --------------------------------------------------------------------------------

component = st.from_regex(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", fullmatch=True).filter(lambda c: len(c) <= 30)
names = st.lists(component, min_size=1, max_size=4).map("/".join).filter(lambda n: len(n) <= NAME_MAX_LENGTH)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)
digests = st.one_of(
    st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: f"sha256:{h}"),
    st.text("0123456789abcdef", min_size=128, max_size=128).map(lambda h: f"sha512:{h}"),
)
methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "get", ""])
LOCAL_CANDIDATES = {Kind.BASE, Kind.BLOB, Kind.MANIFEST_BY_DIGEST, Kind.MANIFEST_BY_TAG}


@settings(max_examples=400)
@given(methods, st.text(alphabet=string.printable + "é%\x00", max_size=300))
def test_arbitrary_input_never_raises_and_is_consistent(method: str, uri: str) -> None:
    operation = classify_request(method, "/v2/" + uri if uri[:1] != "/" else uri)
    if operation.kind in LOCAL_CANDIDATES:
        assert operation.method in ("GET", "HEAD")
    if operation.kind not in (Kind.UNRECOGNIZED, Kind.BASE, Kind.CATALOG):
        assert is_valid_name(operation.repository)
        assert operation.required, "every repository operation needs some access"
    if operation.digest:
        assert is_valid_digest(operation.digest)
    if operation.tag:
        assert is_valid_tag(operation.tag)


@given(names, tags, st.sampled_from(["GET", "HEAD"]))
def test_manifest_by_tag_round_trips(name: str, tag: str, method: str) -> None:
    operation = classify_request(method, f"/v2/{name}/manifests/{tag}")
    assert (operation.kind, operation.repository, operation.tag) == (Kind.MANIFEST_BY_TAG, name, tag)
    assert operation.required == (pull(name),)


@given(names, digests, st.sampled_from(["GET", "HEAD"]))
def test_blob_and_manifest_by_digest_round_trip(name: str, digest: str, method: str) -> None:
    blob = classify_request(method, f"/v2/{name}/blobs/{digest}")
    manifest = classify_request(method, f"/v2/{name}/manifests/{digest}")
    assert (blob.kind, blob.repository, blob.digest) == (Kind.BLOB, name, digest)
    assert (manifest.kind, manifest.repository, manifest.digest) == (Kind.MANIFEST_BY_DIGEST, name, digest)


@given(
    names,
    st.sampled_from(["POST", "PUT", "PATCH", "DELETE"]),
    st.sampled_from(["manifests/v1", f"blobs/{D1}", "blobs/uploads/", "blobs/uploads/u-1", "tags/list"]),
)
def test_writes_are_never_local_candidates(name: str, method: str, suffix: str) -> None:
    operation = classify_request(method, f"/v2/{name}/{suffix}")
    assert operation.kind not in LOCAL_CANDIDATES
    if method in ("POST", "PUT", "PATCH") and operation.kind is not Kind.UNRECOGNIZED:
        assert push(name) in operation.required
    if method == "DELETE" and operation.kind is not Kind.UNRECOGNIZED:
        assert operation.required == (delete(name),)


@pytest.mark.parametrize(
    ("query", "renames"),
    [
        ("", True),
        ("dry_run=false", True),
        ("dry_run=true", False),
        ("dry_run=1", False),  # Go's strconv.ParseBool, as GitLab's registry reads it
        ("dry_run=True", False),
        ("dry_run=%74rue", False),
        # Go reads the first value: a later "true" must not hide a rename from the index
        ("dry_run=false&dry_run=true", True),
        ("dry_run=true&dry_run=false", True),  # a dry run to the registry: one invalidation too many
        ("dry_run=tRuE", True),  # ParseBool refuses it (no rename): an invalidation too many, never too few
        ("dry_run=", True),
    ],
)
def test_a_gitlab_rename_is_a_dry_run_only_when_the_registry_certainly_reads_one(query: str, renames: bool) -> None:
    """``PATCH /gitlab/v1/repositories/<path>/`` goes to the primary; unless it is certainly a dry
    run it is a rename, and the site takes the path's tags off the index first."""
    operation = classify_request("PATCH", f"/gitlab/v1/repositories/group/app/?{query}".rstrip("?"))
    assert operation.kind is (Kind.REPOSITORY_RENAME if renames else Kind.UNRECOGNIZED)
    assert operation.repository == "group/app"


@pytest.mark.parametrize(
    ("method", "uri"),
    [
        ("GET", "/gitlab/v1/"),
        ("GET", "/gitlab/v1/repositories/group/app/"),
        ("GET", "/gitlab/v1/repositories/group/app/tags/list/"),
        ("GET", "/gitlab/v1/repository-paths/group/repositories/list/"),
        ("PATCH", "/gitlab/v1/repositories/group/app"),  # no trailing slash: the registry's 404
        ("PUT", "/gitlab/v1/repositories/group/app/"),
    ],
)
def test_the_rest_of_gitlab_api_is_for_the_primary(method: str, uri: str) -> None:
    assert classify_request(method, uri).kind is Kind.UNRECOGNIZED
