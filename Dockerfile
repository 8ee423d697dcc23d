# syntax=docker/dockerfile:1
#
# AgentFlow images: one Dockerfile, one build target per process.
#
#   docker build --target control-plane -t agentflow-control-plane:0.1.0 .
#   docker build --target worker        -t agentflow-worker:0.1.0 .
#
# control-plane  `agentflow control-plane` (default command), also `agentflow migrate` and
#                `agentflow token`. The base package only; add the llm extra with
#                --build-arg CONTROL_PLANE_EXTRAS=llm for litellm's token counts and prices
#                in budget estimates.
# worker         `agentflow worker` with the llm and mcp extras, plus bubblewrap and
#                util-linux (prlimit, setpriv) for the process sandbox of tools.
#
# A plain `docker build .` builds the control plane (the last stage).
#
# Both run as uid 10001 and contain no secret: AGENTFLOW_JWT_SECRET, AGENTFLOW_DATABASE_URL,
# provider keys, ... come from the environment at run time (docs/deploy.md). The process
# sandbox refuses to run while the worker is not root (docs/tools.md): running the worker
# image as root with the privileges bubblewrap needs is an explicit, documented opt-in
# (docs/deploy.md, "The process sandbox in containers").

# bookworm: the distribution the sandbox is tested on (bubblewrap 0.8, util-linux 2.38).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build stages: a virtualenv per target ------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies are installed from pyproject.toml alone, before the sources are copied, so
# editing code does not reinstall them. Every native dependency (asyncpg, orjson,
# cryptography, uvloop, ...) ships manylinux wheels for CPython 3.11: no compiler needed.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('/tmp/requirements-base.txt', 'w').write(chr(10).join(p['dependencies'])); \
[open(f'/tmp/requirements-{k}.txt', 'w').write(chr(10).join(v)) for k, v in p['optional-dependencies'].items()]"

FROM build AS build-control-plane
# Comma-separated extras of the control plane image: "" or "llm".
ARG CONTROL_PLANE_EXTRAS=""
RUN --mount=type=cache,target=/root/.cache/pip \
    set -e; reqs="-r /tmp/requirements-base.txt"; \
    for extra in $(echo "$CONTROL_PLANE_EXTRAS" | tr ',' ' '); do reqs="$reqs -r /tmp/requirements-$extra.txt"; done; \
    pip install $reqs
COPY libs libs
COPY services services
COPY migrations migrations
RUN pip install --no-cache-dir --no-deps . && agentflow --help >/dev/null

FROM build AS build-worker
ARG WORKER_EXTRAS="llm,mcp"
RUN --mount=type=cache,target=/root/.cache/pip \
    set -e; reqs="-r /tmp/requirements-base.txt"; \
    for extra in $(echo "$WORKER_EXTRAS" | tr ',' ' '); do reqs="$reqs -r /tmp/requirements-$extra.txt"; done; \
    pip install $reqs
COPY libs libs
COPY services services
COPY migrations migrations
RUN pip install --no-cache-dir --no-deps . && agentflow --help >/dev/null

# --- runtime base: the same base image and venv path as the build stages, so the venv's
# interpreter symlinks and console-script shebangs stay valid ------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 agentflow \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/agentflow \
        --shell /usr/sbin/nologin agentflow \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/agentflow /var/lib/agentflow/workspace

# XDG_CACHE_HOME under /tmp: with a read-only root filesystem (the Helm chart) /tmp is the
# only writable place, and libraries that cache (litellm's tokenizers) write there.
# litellm's price map and tokenizers come from the installed package, never fetched at run
# time (the processes set the same defaults; here they also cover `python -c` and shells).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/agentflow \
    XDG_CACHE_HOME=/tmp/.cache \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    HF_HUB_OFFLINE=1
WORKDIR /home/agentflow
ENTRYPOINT ["agentflow"]

# --- worker --------------------------------------------------------------------------------
FROM runtime AS worker

LABEL org.opencontainers.image.title="agentflow-worker" \
      org.opencontainers.image.description="AgentFlow JetStream worker (llm, mcp, process sandbox)"

# The build fails here, not at the first sandboxed tool call, if a binary the sandbox
# execs is missing.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap util-linux \
 && rm -rf /var/lib/apt/lists/* \
 && command -v bwrap && command -v prlimit && command -v setpriv

COPY --from=build-worker /opt/venv /opt/venv

# The workspace of storage agents: mount a volume shared by every worker (compose) or an
# emptyDir / ReadWriteMany claim (Helm) here.
ENV AGENTFLOW_WORKSPACE_DIR=/var/lib/agentflow/workspace

USER 10001:10001
# No HEALTHCHECK: the worker serves HTTP only when AGENTFLOW_WORKER_METRICS_PORT is set;
# docker-compose.yml and the Helm chart probe that endpoint.
CMD ["worker"]

# --- control plane (last: the default target) ---------------------------------------------
FROM runtime AS control-plane

LABEL org.opencontainers.image.title="agentflow-control-plane" \
      org.opencontainers.image.description="AgentFlow control plane, migrations and CLI"

COPY --from=build-control-plane /opt/venv /opt/venv

ENV AGENTFLOW_HOST=0.0.0.0 \
    AGENTFLOW_PORT=8080

USER 10001:10001
EXPOSE 8080

# The image has no curl; the standard library does the probe. /healthz answers as soon as
# the process serves (readiness, /readyz, also needs Postgres and NATS).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AGENTFLOW_PORT', '8080'), timeout=3)"]

CMD ["control-plane"]
