"""The development stack: real registries, a development token service, skopeo, Redis on loopback.

For tests, the demo and local development only; the auth service never imports it. Modules:
``processes`` (ports, binaries, logs, stop by PID), ``redis_server``, ``keys`` (shared signing key),
``token_scopes``/``token_config``/``token_service`` (DEVELOPMENT stand-in for GitLab's /jwt/auth),
``registry`` (docker-registry 2.8), ``images`` (OCI layouts without docker), ``skopeo`` and ``replicate``;
``containers`` (a private containerd and dockerd, ``ctr`` and ``docker``) and ``libpod`` (podman and
buildah with private storage) for the real-client tests.
"""
