# syntax=docker/dockerfile:1
# The challenger served by MLServer instead of TorchServe (k8s/components/mlserver-challenger):
# MLServer's XGBoost runtime over the challenger archive's own model file, with the
# archive's version hash as the model version. MLServer and its pins
# (k8s/images/mlserver.lock, from constraints-mlserver.txt) get a virtualenv of their own,
# as in the tests. `make images` builds it after `make models` (k8s/podman.py); BASE_IMAGE
# and the pip variables as in model-server.Dockerfile.
ARG BASE_IMAGE=localhost/decision-base:bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
RUN python -m venv /opt/venv && python -m venv /opt/mlserver
COPY k8s/images/decision-server.lock k8s/images/mlserver.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
      -r decision-server.lock \
 && /opt/mlserver/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
      -r mlserver.lock
COPY pyproject.toml README.md LICENSE ./
COPY core core
COPY server server
COPY fallback fallback
COPY feature_cache feature_cache
COPY torchserve torchserve
COPY proto proto
COPY client client
ARG VERSION
ARG REVISION
RUN test -n "${VERSION}" && test -n "${REVISION}" \
 && SETUPTOOLS_SCM_PRETEND_VERSION_FOR_DECISION_SERVICE="${VERSION}" \
    SETUPTOOLS_SCM_PRETEND_METADATA_FOR_DECISION_SERVICE="{node=\"g${REVISION}\"}" \
    /opt/venv/bin/pip install --no-cache-dir --no-deps ./client . \
 && /opt/venv/bin/pip check
ARG CHALLENGER_VERSION
COPY .run/models/challenger.mar /tmp/challenger.mar
# The model repository (model.json + model-settings.json), from the archive named.
RUN test -n "${CHALLENGER_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /tmp/challenger.mar)" = "${CHALLENGER_VERSION}" \
 && /opt/venv/bin/python -m torchserve.mlserver /tmp/challenger.mar /opt/models

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION
ARG REVISION
ARG CHALLENGER_VERSION
RUN useradd --system --uid 10003 --no-create-home --shell /usr/sbin/nologin mlserver
COPY --from=build /opt/mlserver /opt/mlserver
COPY --from=build /opt/models /opt/models
LABEL org.opencontainers.image.title="mlserver-challenger" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.licenses="MIT" \
      decision.models.challenger.version="${CHALLENGER_VERSION}"
# The model-server image's ports, so that the challenger's Service, network policy and
# ServiceMonitor stay as they are. No worker pool: inference in the server process.
ENV PATH=/opt/mlserver/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLSERVER_GRPC_PORT=7070 \
    MLSERVER_HTTP_PORT=8080 \
    MLSERVER_METRICS_PORT=8082 \
    MLSERVER_PARALLEL_WORKERS=0 \
    MLSERVER_METRICS_DIR=/tmp/mlserver-metrics
WORKDIR /tmp
USER 10003
EXPOSE 7070 8080 8082
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=1)"]
ENTRYPOINT ["mlserver", "start", "/opt/models"]
