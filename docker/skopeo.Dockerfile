# skopeo for the compose file's "replicate" service (the stand-in for GitLab Geo's replication).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends skopeo ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["skopeo"]
