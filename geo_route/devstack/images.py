"""Small real OCI images built on disk without docker: an OCI image layout skopeo can push (``oci:DIR:TAG``).

Each image has ``layer_count`` gzip tar layers, an image config and an OCI manifest. Content is
pseudo-random (incompressible) but deterministic: the same arguments give the same digests. Layer 0
is the shared base (independent of ``variant``); the other layers and the config depend on
``variant``, so re-tagging with another variant ("a moved tag") gives a new manifest digest that
still shares the base blob, as real image updates do.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
FIXED_TIME = 1_700_000_000  # 2023-11-14T22:13:20Z: every tar entry and the config
FIXED_CREATED = "2023-11-14T22:13:20Z"


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class OciImage:
    """One tagged image in an OCI layout directory."""

    layout: Path
    tag: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def reference(self) -> str:
        """The skopeo source reference, ``oci:DIR:TAG``."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def blob_digests(self) -> tuple[str, ...]:
        return (self.config.digest, *(layer.digest for layer in self.layers))


def build_oci_image(
    layout: Path,
    tag: str = "latest",
    *,
    variant: str = "",
    layer_count: int = 2,
    layer_bytes: int = 16 * 1024,
    architecture: str = "amd64",
) -> OciImage:
    """Build an image into the OCI layout at ``layout`` (created if needed) and tag it ``tag`` there.

    Another call with the same layout adds or re-points a tag; blobs are shared between images.
    """
    if layer_count < 1:
        raise ValueError("an image needs at least one layer")
    start_layout(layout)
    layers, diff_ids = [], []
    for index in range(layer_count):
        seed = "base" if index == 0 else f"{variant}:{index}"
        tar = layer_tar(index, seed, layer_bytes)
        diff_ids.append(sha256_digest(tar))
        layers.append(write_blob(layout, LAYER_MEDIA_TYPE, gzip.compress(tar, compresslevel=6, mtime=0)))
    config = write_blob(layout, CONFIG_MEDIA_TYPE, canonical_json(image_config(variant, diff_ids, architecture)))
    manifest_body = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
        "annotations": {"org.opencontainers.image.created": FIXED_CREATED},
    }
    manifest = write_blob(layout, MANIFEST_MEDIA_TYPE, canonical_json(manifest_body))
    tag_manifest(layout, tag, manifest)
    return OciImage(layout, tag, manifest, config, tuple(layers))


@dataclass(frozen=True)
class OciIndex:
    """A tagged multi-platform image: an OCI image index whose children are ``OciImage``s (each also
    tagged ``TAG-ARCH`` in the layout)."""

    layout: Path
    tag: str
    index: Blob
    children: dict[str, OciImage]  # architecture -> image

    @property
    def digest(self) -> str:
        return self.index.digest

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def build_oci_index(
    layout: Path,
    tag: str = "latest",
    *,
    variant: str = "",
    architectures: tuple[str, ...] = ("amd64", "arm64"),
    layer_count: int = 2,
    layer_bytes: int = 16 * 1024,
) -> OciIndex:
    """An image index over one ``build_oci_image`` per architecture (linux), tagged ``tag`` in the
    layout. The children share the base layer; their other layers and configs differ by architecture."""
    children = {
        architecture: build_oci_image(
            layout,
            f"{tag}-{architecture}",
            variant=f"{variant}/{architecture}",
            layer_count=layer_count,
            layer_bytes=layer_bytes,
            architecture=architecture,
        )
        for architecture in architectures
    }
    entries = [
        {**child.manifest.descriptor(), "platform": {"architecture": architecture, "os": "linux"}}
        for architecture, child in children.items()
    ]
    body = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": entries}
    index = write_blob(layout, INDEX_MEDIA_TYPE, canonical_json(body))
    tag_manifest(layout, tag, index)
    return OciIndex(layout, tag, index, children)


def start_layout(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    marker = layout / "oci-layout"
    if not marker.exists():
        marker.write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))


def layer_tar(index: int, seed: str, payload_bytes: int) -> bytes:
    """A deterministic uncompressed tar with a text file and ``payload_bytes`` of pseudo-random data."""
    files = {
        f"geo-route/layer-{index}.txt": f"geo-route devstack layer {index} ({seed})\n".encode(),
        f"geo-route/layer-{index}.bin": hashlib.shake_256(seed.encode()).digest(payload_bytes),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), FIXED_TIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def image_config(variant: str, diff_ids: list[str], architecture: str = "amd64") -> dict[str, Any]:
    return {
        "created": FIXED_CREATED,
        "architecture": architecture,
        "os": "linux",
        "config": {"Labels": {"io.geo-route.devstack.variant": variant}, "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": FIXED_CREATED, "created_by": f"geo-route devstack layer {i}"} for i in range(len(diff_ids))
        ],
    }


def tag_manifest(layout: Path, tag: str, manifest: Blob) -> None:
    """Point ``tag`` at ``manifest`` in ``index.json``, replacing an older entry of that tag."""
    index_path = layout / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_bytes())
    kept = [entry for entry in index["manifests"] if entry.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag]
    kept.append({**manifest.descriptor(), "annotations": {REF_NAME_ANNOTATION: tag}})
    index["manifests"] = kept
    index_path.write_bytes(canonical_json(index))


def write_blob(layout: Path, media_type: str, data: bytes) -> Blob:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)
    return Blob(media_type, digest, len(data))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
