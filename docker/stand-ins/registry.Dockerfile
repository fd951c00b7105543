# Stand-in for registry:2.8.3 (script/compose-check only): Debian's docker-registry (Distribution
# 2.8) as /bin/registry with the official image's entrypoint (a config file argument means
# "registry serve FILE").
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends docker-registry \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/docker-registry /usr/local/bin/registry \
    && printf '#!/bin/sh\nset -e\ncase "$1" in\n  *.yaml|*.yml) set -- registry serve "$@" ;;\n  serve|garbage-collect|help|-*) set -- registry "$@" ;;\nesac\nexec "$@"\n' \
        > /entrypoint.sh \
    && chmod 755 /entrypoint.sh
VOLUME ["/var/lib/registry"]
EXPOSE 5000
ENTRYPOINT ["/entrypoint.sh"]
CMD ["/etc/docker/registry/config.yml"]
