# syntax=docker/dockerfile:1
# memsync worker image: `faust -A app worker`, web/metrics/probes on WEB_PORT (6066).
#   docker build -t memsync:0.1.0 .
# Stage 1 builds wheels for every dependency (compilers live only here); stage 2 installs them into a
# slim image with no build tools and runs the source tree as a non-root user.

FROM python:3.11-slim AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
# Metadata first: the dependency layer is rebuilt only when setup.cfg/pyproject.toml change.
# (setup.cfg reads README.md as long_description.)
COPY setup.cfg pyproject.toml README.md ./
COPY app/ app/
COPY agents/ agents/
COPY tables/ tables/
COPY schemas/ schemas/
# Wheels of memsync's whole dependency closure; memsync's own wheel is dropped: the final image runs
# the source tree (settings.py finds schemas/ next to app/, which an installed wheel would not have).
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
 && rm -f /wheels/memsync-*.whl

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/srv/memsync \
    MEMSYNC_DATA_DIR=/var/lib/memsync
RUN groupadd --system --gid 10001 memsync \
 && useradd --system --uid 10001 --gid memsync --home-dir /srv/memsync --no-create-home \
      --shell /usr/sbin/nologin memsync \
 && mkdir -p /var/lib/memsync \
 && chown memsync:memsync /var/lib/memsync
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl
WORKDIR /srv/memsync
# Code owned by root and read-only to the worker; only MEMSYNC_DATA_DIR is writable.
COPY app/ app/
COPY agents/ agents/
COPY tables/ tables/
COPY schemas/ schemas/
USER 10001:10001
VOLUME ["/var/lib/memsync"]
EXPOSE 6066
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WEB_PORT', '6066'), timeout=4)"]
CMD ["faust", "-A", "app", "worker", "-l", "info"]
