# The waxserve dataflow image: Python 3.11, a JRE for PMML (pypmml on JPype), waxserve
# installed from a wheel, the models, and the init script of the Kubernetes pods.
#
#   docker build -t waxserve:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp --tmpfs /var/cache/bytewax \
#     -e WAXSERVE_BROKERS=broker:9092 waxserve:0.1.0 -w 2
#
# Arguments after the image name go to `python -m bytewax.run dataflows.serving:flow`.
# k8s/README.md has the build, push and deploy steps.

# Bookworm, not the default trixie: trixie has no openjdk-17 package.
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY dataflows/ dataflows/
COPY protos/ protos/
# The example catalog, models and data: package data of the wheel (pyproject.toml).
COPY models/ models/
# A wheel, so the runtime image installs waxserve non-editable and holds no source tree.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A headless JRE for pypmml (it loads the JVM in-process through JPype).
# DL3008 (pin apt versions) is ignored on purpose: Debian replaces a package version in the
# archive when a security update lands, so a pinned JRE version stops building within weeks.
# The base image tag pins the distribution; rebuild to pick up JRE security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root UID/GID: Kubernetes' runAsUser/fsGroup in k8s/base use the same numbers.
RUN groupadd --system --gid 10001 waxserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin waxserve

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl

WORKDIR /app
COPY models/ models/
# Only for waxctl, whose Helm chart runs these from the working directory (k8s/README.md).
COPY k8s/waxctl/entrypoint.sh k8s/waxctl/entrypoint-recovery.sh ./
# `waxserve publish NAME` reads the catalog in WAXSERVE_MODEL_DIR (/app/models, below), so
# that --by-reference locations fall inside the directory the dataflow accepts.
RUN mkdir -p /var/cache/bytewax /var/lib/waxserve/recovery \
    && chown 10001:10001 /var/cache/bytewax /var/lib/waxserve/recovery

# Bytewax writes its dataflow API cache here at start-up and fails if it cannot: on a
# read-only root file system, mount a writable volume here (k8s: an emptyDir).
ENV BYTEWAX_DATAFLOW_API_CACHE_PATH=/var/cache/bytewax \
    BYTEWAX_DATAFLOW_API_ENABLED=true \
    WAXSERVE_MODEL_DIR=/app/models

USER 10001:10001
# 3030: Bytewax's API and Prometheus metrics; 3040: queryable state (WAXSERVE_STATE_ADDR);
# 9999: the timely cluster port (k8s/base).
EXPOSE 3030 3040 9999
ENTRYPOINT ["python", "-m", "bytewax.run", "dataflows.serving:flow"]
