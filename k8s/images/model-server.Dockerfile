# syntax=docker/dockerfile:1
# TorchServe with the model archives baked in, one image for the three roles
# (primary sidecar, secondary, challenger: the container's argument). Built from the
# repository root after `make models`, naming the archives' version hashes (the sha256
# of each archive's content, as models.json, every answer and every audit record carry
# them); the build fails when an archive is not the version named:
#   docker build -f k8s/images/model-server.Dockerfile \
#     --build-arg CHAMPION_VERSION=$(.venv/bin/python -m torchserve.archive version .run/models/champion.mar) \
#     --build-arg CHALLENGER_VERSION=$(.venv/bin/python -m torchserve.archive version .run/models/challenger.mar) \
#     -t model-server:$(.venv/bin/python -m torchserve.archive version .run/models/champion.mar | cut -c1-12) .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0000000000000000000000000000000000000000000000000000000000000000

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY core core
COPY server server
COPY fallback fallback
COPY feature_cache feature_cache
COPY torchserve torchserve
COPY proto proto
COPY client client
# The constraints pin torch's CPU-only build (+cpu): pass the index that serves it
# (--build-arg PIP_EXTRA_INDEX_URL=...), or your registry's mirror of it.
ARG PIP_EXTRA_INDEX_URL
RUN /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -c constraints.txt ./client ".[model]"

FROM build AS models
ARG CHAMPION_VERSION
ARG CHALLENGER_VERSION
COPY .run/models/champion.mar .run/models/challenger.mar /opt/models/
RUN test -n "${CHAMPION_VERSION}" && test -n "${CHALLENGER_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /opt/models/champion.mar)" = "${CHAMPION_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /opt/models/challenger.mar)" = "${CHALLENGER_VERSION}"

FROM ${PYTHON_IMAGE}
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
