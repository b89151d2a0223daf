# syntax=docker/dockerfile:1
# TorchServe with the model archives baked in, one image for the three roles
# (primary sidecar, secondary, challenger: the container's argument). `make images`
# builds it after `make models` (k8s/podman.py), naming the archives' version hashes (the
# sha256 of each archive's content, as models.json, every answer and every audit record
# carry them); the build fails when an archive is not the version named.
# BASE_IMAGE: locally the Debian base `make images` makes; a release, the official python
# image pinned by digest. The pip variables: the index and local wheels `make setup` uses;
# the lock pins torch's CPU-only build (+cpu): in a release, PyTorch's CPU index.
ARG BASE_IMAGE=localhost/decision-base:bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
RUN python -m venv /opt/venv
COPY k8s/images/model-server.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
      -r model-server.lock
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
    /opt/venv/bin/pip install --no-cache-dir --no-deps ./client ".[model]" \
 && /opt/venv/bin/pip check

FROM build AS models
ARG CHAMPION_VERSION
ARG CHALLENGER_VERSION
COPY .run/models/champion.mar .run/models/challenger.mar /opt/models/
RUN test -n "${CHAMPION_VERSION}" && test -n "${CHALLENGER_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /opt/models/champion.mar)" = "${CHAMPION_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /opt/models/challenger.mar)" = "${CHALLENGER_VERSION}"

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION
ARG REVISION
ARG CHAMPION_VERSION
ARG CHALLENGER_VERSION
# TorchServe's frontend is Java 17; the headless JRE only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless=17.* \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10002 --no-create-home --shell /usr/sbin/nologin model-server \
 && install -d -o model-server -g model-server /var/run/model-server
COPY --from=build /opt/venv /opt/venv
COPY --from=models /opt/models /opt/models
LABEL org.opencontainers.image.title="model-server" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.licenses="MIT" \
      decision.models.champion.version="${CHAMPION_VERSION}" \
      decision.models.challenger.version="${CHALLENGER_VERSION}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/run/model-server
USER 10002
# gRPC inference (native and Open Inference Protocol), REST inference (the probes), metrics.
EXPOSE 7070 8080 8082
# Healthy while the role's model answers a prediction request, as the Kubernetes probes
# ask: /ping stays "Healthy" while a lost worker is never started again.
HEALTHCHECK --interval=10s --timeout=2s --start-period=60s --retries=3 \
  CMD ["python", "-m", "torchserve.container", "--check-health"]
ENTRYPOINT ["python", "-m", "torchserve.container", "--run-dir", "/var/run/model-server"]
CMD ["primary"]
