# syntax=docker/dockerfile:1
# The decision server, and the feature-cache consumer from the same image
# (command: feature-cache). Built from the repository root:
#   docker build -f k8s/images/decision-server.Dockerfile -t decision-server:$(git rev-parse --short HEAD) .
# The base is pinned by digest: replace the placeholder with the digest your registry
# mirrors (docker buildx imagetools inspect python:3.11-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0000000000000000000000000000000000000000000000000000000000000000

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY core core
COPY server server
COPY fallback fallback
COPY feature_cache feature_cache
COPY quality quality
COPY torchserve torchserve
COPY proto proto
COPY client client
# Wheels only (grpcio, uvloop, hiredis, orjson ship them): no compiler in either stage.
RUN /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -c constraints.txt ./client .

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin decision \
 && install -d -o decision -g decision /var/lib/decision
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DECISION_SERVER__HOST=0.0.0.0 \
    DECISION_ADMIN__HOST=0.0.0.0 \
    DECISION_TELEMETRY__METRICS_HOST=0.0.0.0 \
    DECISION_AUDIT__JOURNAL_DIR=/var/lib/decision/journal
WORKDIR /var/lib/decision
USER 10001
# DecisionService (+ health, reflection), AdminService, metrics of workers 0 and 1.
EXPOSE 50051 50052 9464 9465
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s --retries=3 \
  CMD ["decision-probe", "127.0.0.1:50051"]
ENTRYPOINT ["decision-server"]
