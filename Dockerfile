# syntax=docker/dockerfile:1
# wavespeed-bridge container image.
#
#   docker build -t wavespeed-bridge:0.1.0 --build-arg VERSION=0.1.0 .
#   docker run --rm -e WAVESPEED_API_KEY=... \
#     -v "$PWD/config/bridge.yaml:/etc/wavespeed-bridge/bridge.yaml:ro" wavespeed-bridge:0.1.0
#
# The config is a mounted file (/etc/wavespeed-bridge/bridge.yaml; the image carries the
# documented default) plus BRIDGE_<SECTION>__<KEY> environment overrides; the API key comes
# from WAVESPEED_API_KEY or api.api_key_file. The Helm chart in helm/ mounts both.

# --- build: a virtualenv with the package and its runtime dependencies only --------------
FROM python:3.12.8-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge/ ./bridge/
# The runtime dependencies of pyproject.toml and the `fast` extra (orjson: README
# "Dependencies"), nothing else. pip compiles the bytecode here (the runtime root filesystem
# is read-only), then pip and setuptools leave the venv: nothing installs packages at run time.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[fast]" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# --- runtime ----------------------------------------------------------------------------
FROM python:3.12.8-slim-bookworm AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="wavespeed-bridge" \
      org.opencontainers.image.description="Kafka bridge for WaveSpeedAI predictions: task ids in, completion events out." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12.8-slim-bookworm"

# A fixed, unprivileged UID/GID that the Helm chart's securityContext names as well.
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin bridge

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    PYTHONHASHSEED=random

COPY --from=build /opt/venv /opt/venv
COPY config/bridge.yaml /etc/wavespeed-bridge/bridge.yaml

USER 10001:10001
WORKDIR /tmp
# Prometheus metrics, /healthz and /readyz (server.port).
EXPOSE 9464
# Exec form: the bridge is PID 1 and gets SIGTERM itself; it publishes and commits what is
# finished within shutdown_grace_s. No shell, no wrapper script.
ENTRYPOINT ["wavespeed-bridge"]
CMD ["run", "--config", "/etc/wavespeed-bridge/bridge.yaml"]
