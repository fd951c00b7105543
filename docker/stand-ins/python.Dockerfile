# Stand-in for python:3.11-slim-bookworm (script/compose-check only): Debian's Python 3.11 in a venv
# at /usr/local, where the official image has its python and pip (and where a wheel's data files
# land: /usr/local/share/geo-route/templates). pip trusts the certificates this machine trusts
# (the build context's ca-certificates/).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN update-ca-certificates && python3 -m venv /usr/local
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
CMD ["python3"]
