# syntax=docker/dockerfile:1
#
# AgentFlow: one image for every process (control plane, worker, migrations, token CLI).
#
#   docker build -t agentflow:local .
#   docker run --rm agentflow:local --help
#   docker run --rm -e AGENTFLOW_JWT_SECRET=... -e AGENTFLOW_DATABASE_URL=... \
#       -e AGENTFLOW_NATS_URL=... -p 127.0.0.1:8080:8080 agentflow:local control-plane
#
# No secret is baked in: AGENTFLOW_JWT_SECRET, AGENTFLOW_DATABASE_URL, ... come from the
# environment at run time (see docs/deploy.md). There is deliberately no HEALTHCHECK here:
# the same image runs the worker and the migration job, which serve no /healthz; the
# control plane's health check lives in docker-compose.yml and in the Helm chart's probes.

ARG PYTHON_VERSION=3.11

# --- build stage: install the package and its dependencies into a virtualenv -------------
FROM python:${PYTHON_VERSION}-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The build context is filtered by .dockerignore (no .venv, .git, caches, tests, .env).
COPY . .
# Every native dependency (asyncpg, orjson, cryptography, uvloop, httptools, ...) ships
# manylinux wheels for CPython 3.11, so no compiler is needed in this stage.
RUN pip install --no-cache-dir .

# --- runtime stage ------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="agentflow" \
      org.opencontainers.image.description="AgentFlow control plane, worker and CLI" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 agentflow \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/agentflow \
        --shell /usr/sbin/nologin agentflow

# Same base image and same path as the build stage, so the venv's interpreter symlinks
# and the console scripts' shebangs stay valid.
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/agentflow \
    AGENTFLOW_HOST=0.0.0.0 \
    AGENTFLOW_PORT=8080

USER 10001:10001
WORKDIR /home/agentflow

EXPOSE 8080

ENTRYPOINT ["agentflow"]
CMD ["control-plane"]
