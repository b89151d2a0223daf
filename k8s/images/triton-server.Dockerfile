# syntax=docker/dockerfile:1
# Triton Inference Server with the model archives baked in as Triton model repositories,
# one image for the three roles (k8s/components/triton: the primary sidecar, the
# secondary, the challenger; the container's argument names the model it serves). The
# tritonserver binary and its Python backend come from the nvidia-pytriton wheel
# (requirements-triton.txt, without its Python dependencies); the backend runs each
# archive's own scorer with this project's torch and xgboost (torchserve/triton.py).
# `make images` builds it after `make models` (k8s/podman.py), naming the archives'
# versions; BASE_IMAGE and the pip variables as in model-server.Dockerfile.
ARG BASE_IMAGE=localhost/decision-base:bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
RUN python -m venv /opt/venv
COPY k8s/images/model-server.lock requirements-triton.txt ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
      -r model-server.lock \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps --require-hashes \
      --target /opt/triton -r requirements-triton.txt
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
ARG CHAMPION_VERSION
ARG CHALLENGER_VERSION
COPY .run/models/champion.mar .run/models/challenger.mar /opt/models/
# The repositories (and their python-path.txt) are written by the venv the backend uses.
RUN test -n "${CHAMPION_VERSION}" && test -n "${CHALLENGER_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /opt/models/champion.mar)" = "${CHAMPION_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /opt/models/challenger.mar)" = "${CHALLENGER_VERSION}" \
 && /opt/venv/bin/python -m torchserve.triton repository /opt/repository \
      /opt/models/champion.mar /opt/models/challenger.mar

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION
ARG REVISION
ARG CHAMPION_VERSION
ARG CHALLENGER_VERSION
# The Python backend's stub links the shared libpython: the official python image has it,
# Debian's python3 does not (its package libpython3.11). grep reads all of ldconfig's
# output (no -q): an early exit would fail ldconfig with SIGPIPE under pipefail.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if ! ldconfig -p | grep 'libpython3\.11\.so\.1\.0' >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends "libpython3.11=3.11.*" \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --system --uid 10004 --no-create-home --shell /usr/sbin/nologin triton
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/triton /opt/triton
COPY --from=build /opt/repository /opt/repository
# The archives too: the decision pod's model-references init container copies them, and
# the server reports their versions (Triton numbers its own).
COPY --from=build /opt/models /opt/models
LABEL org.opencontainers.image.title="triton-server" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.licenses="MIT" \
      decision.models.champion.version="${CHAMPION_VERSION}" \
      decision.models.challenger.version="${CHALLENGER_VERSION}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 10004
# gRPC inference (Open Inference Protocol), HTTP (the v2 health endpoints), metrics: the
# model-server image's ports, so Services, network policies and monitors stay as they are.
EXPOSE 7070 8080 8082
HEALTHCHECK --interval=10s --timeout=2s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=1)"]
ENTRYPOINT ["python", "-m", "torchserve.triton", "serve", "/opt/repository", \
            "--triton-root", "/opt/triton/pytriton/tritonserver", "--work-dir", "/tmp"]
CMD ["champion"]
