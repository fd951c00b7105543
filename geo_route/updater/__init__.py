"""The index updater: notifications in, tag resolution at the primary, reconciliation.

Pure parts (``notifications``, ``reconcile_walk``'s planning) take no I/O; the rest talks to the
registries (``registry_client``, with tokens from ``pull_tokens``) and to the index through its
store. The HTTP side (``POST /events/*``) is in ``geo_route.web.updater``.
"""
