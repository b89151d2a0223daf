# syntax=docker/dockerfile:1
# The decision server, and the feature-cache consumer and the labeler from the same image
# (command: feature-cache, decision-labeler). `make images` builds it with podman
# (k8s/podman.py gives every argument below); by hand, from the repository root:
#   podman build -f k8s/images/decision-server.Dockerfile --build-arg VERSION=... \
#     --build-arg REVISION=$(git rev-parse HEAD) -t decision-server .
# BASE_IMAGE: locally the Debian base `make images` makes (mmdebstrap, podman import); a
# release builds on the official python image pinned by digest (.github/workflows).
ARG BASE_IMAGE=localhost/decision-base:bookworm

FROM ${BASE_IMAGE} AS build
# The package index and local wheels `make setup` uses (pip's own variables; unset: PyPI).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
RUN python -m venv /opt/venv
# Every dependency checked against its sha256 (make lock); wheels only: no compiler.
COPY k8s/images/decision-server.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
      -r decision-server.lock
COPY pyproject.toml README.md LICENSE ./
COPY core core
COPY server server
COPY fallback fallback
COPY feature_cache feature_cache
COPY quality quality
COPY torchserve torchserve
COPY proto proto
COPY client client
# The build this is (decision_build_info; no .git here): setuptools-scm is told.
ARG VERSION
ARG REVISION
RUN test -n "${VERSION}" && test -n "${REVISION}" \
 && SETUPTOOLS_SCM_PRETEND_VERSION_FOR_DECISION_SERVICE="${VERSION}" \
    SETUPTOOLS_SCM_PRETEND_METADATA_FOR_DECISION_SERVICE="{node=\"g${REVISION}\"}" \
    /opt/venv/bin/pip install --no-cache-dir --no-deps ./client . \
 && /opt/venv/bin/pip check

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION
ARG REVISION
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin decision \
 && install -d -o decision -g decision /var/lib/decision
COPY --from=build /opt/venv /opt/venv
LABEL org.opencontainers.image.title="decision-server" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.licenses="MIT"
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
