"""script/compose-check's pure parts: apt's mirrors, what compose builds, the access-log route checks.

The run itself (images, compose up, push and pull through the site) takes minutes and GBs of vfs
disk: it is run by hand (docker/README.md), not in the suite.
"""

from __future__ import annotations

from typing import Any

import pytest

from geo_route.devstack.base_images import DebianMirrors, compose_builds, find_debian_mirrors
from geo_route.devstack.compose_check import ComposeCheckError, count_routes, require_routes
from geo_route.errors import DevstackError

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""
OTHER_REPOSITORY = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""


def test_mirrors_from_deb822_sources() -> None:
    mirrors = find_debian_mirrors([OTHER_REPOSITORY, DEB822])
    assert mirrors == DebianMirrors("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")
    assert mirrors.sources_list().splitlines() == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_mirrors_from_one_line_sources_list() -> None:
    text = (
        "# a comment\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib\n"
    )
    assert find_debian_mirrors([text]) == DebianMirrors("http://mirror.example/debian")


def test_disabled_entries_and_no_debian_source_are_refused() -> None:
    disabled = DEB822.replace("Types: deb\n", "Types: deb\nEnabled: no\n")
    with pytest.raises(DevstackError, match="no Debian archive"):
        find_debian_mirrors([OTHER_REPOSITORY, disabled])


def test_one_build_per_dockerfile_tagged_with_every_service_image() -> None:
    root = {"context": "/src", "dockerfile": "docker/Dockerfile"}
    config: dict[str, Any] = {
        "name": "geo-route",
        "services": {
            "auth": {"build": root},
            "keys": {"build": root},
            "nginx": {"build": {"context": "/src/docker", "dockerfile": "nginx.Dockerfile"}, "image": "site/nginx"},
            "redis": {"image": "redis:7-bookworm"},
        },
    }
    builds = {(b.context, b.dockerfile): b.images for b in compose_builds(config)}
    assert builds == {
        ("/src", "docker/Dockerfile"): ("geo-route-auth", "geo-route-keys"),
        ("/src/docker", "nginx.Dockerfile"): ("site/nginx",),
    }


def line(method: str, uri: str, route: str) -> dict[str, Any]:
    return {"method": method, "uri": uri, "status": 200, "route": route, "bytes_sent": 10}


PULL = [
    line("GET", "/v2/", ""),
    line("HEAD", "/v2/a/manifests/1", "local"),
    line("GET", "/v2/a/blobs/sha256:1", "local"),
]


def test_a_pull_all_local_passes_and_counts_its_routes() -> None:
    require_routes("pull", PULL, "local")
    assert count_routes(PULL) == {"(none) 200": 1, "local": 2}


@pytest.mark.parametrize(
    "lines",
    [
        [*PULL, line("GET", "/v2/a/blobs/sha256:2", "auth-unavailable")],
        [*PULL, line("GET", "/v2/a/blobs/sha256:2", "primary")],
        [line("GET", "/v2/", "")],  # no manifest or blob read at all: nothing was checked
    ],
)
def test_a_pull_not_all_local_fails_naming_its_routes(lines: list[dict[str, Any]]) -> None:
    with pytest.raises(ComposeCheckError, match="expected every manifest and blob read local"):
        require_routes("pull", lines, "local")
