"""The digest index: what is replicated at this site and what the primary's tags point to.

``model`` holds the redis-free contract (queries, views, updates, the store protocol);
``redis_store`` is the only module in geo-route that imports redis.
"""

from geo_route.index.model import (
    BlobPresence,
    IndexQuery,
    IndexStore,
    IndexUpdate,
    IndexView,
    LocalTag,
    ManifestPresence,
    PrimaryTag,
    QueryKind,
)

__all__ = [
    "BlobPresence",
    "IndexQuery",
    "IndexStore",
    "IndexUpdate",
    "IndexView",
    "LocalTag",
    "ManifestPresence",
    "PrimaryTag",
    "QueryKind",
]
