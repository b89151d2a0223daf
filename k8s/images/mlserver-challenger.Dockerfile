# syntax=docker/dockerfile:1
# The challenger served by MLServer instead of TorchServe (k8s/components/mlserver-challenger):
# MLServer's XGBoost runtime over the challenger archive's own model file, with the
# archive's version hash as the model version. MLServer and its pins
# (constraints-mlserver.txt) get a virtualenv of their own, as in the tests. Built from
# the repository root after `make models`:
#   docker build -f k8s/images/mlserver-challenger.Dockerfile \
#     --build-arg CHALLENGER_VERSION=$(.venv/bin/python -m torchserve.archive version .run/models/challenger.mar) \
#     -t mlserver-challenger:$(.venv/bin/python -m torchserve.archive version .run/models/challenger.mar | cut -c1-12) .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0000000000000000000000000000000000000000000000000000000000000000

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/venv && python -m venv /opt/mlserver
COPY pyproject.toml constraints.txt constraints-mlserver.txt README.md ./
COPY core core
COPY server server
COPY fallback fallback
COPY feature_cache feature_cache
COPY torchserve torchserve
COPY proto proto
COPY client client
RUN /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -c constraints.txt ./client . \
 && /opt/mlserver/bin/pip install --no-cache-dir --only-binary=:all: -r constraints-mlserver.txt
ARG CHALLENGER_VERSION
COPY .run/models/challenger.mar /tmp/challenger.mar
# The model repository (model.json + model-settings.json), from the archive named.
RUN test -n "${CHALLENGER_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /tmp/challenger.mar)" = "${CHALLENGER_VERSION}" \
 && /opt/venv/bin/python -m torchserve.mlserver /tmp/challenger.mar /opt/models

FROM ${PYTHON_IMAGE}
ARG CHALLENGER_VERSION
RUN useradd --system --uid 10003 --no-create-home --shell /usr/sbin/nologin mlserver
COPY --from=build /opt/mlserver /opt/mlserver
COPY --from=build /opt/models /opt/models
LABEL org.opencontainers.image.title="mlserver-challenger" \
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
