# NGINX for a geo-route site: Debian's nginx with the two modules the rendered config loads
# (ndk + lua join repeated Accept headers for the auth subrequest; set-misc hashes the decision
# cache's key so no bearer token reaches the disk). The official nginx image has neither.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx libnginx-mod-http-lua libnginx-mod-http-set-misc lua-cjson \
    && rm -rf /var/lib/apt/lists/*
CMD ["nginx", "-g", "daemon off;"]
