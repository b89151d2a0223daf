# syntax=docker/dockerfile:1
# Triton Inference Server with the model archives baked in as Triton model repositories,
# one image for the three roles (k8s/components/triton: the primary sidecar, the
# secondary, the challenger; the container's argument names the model it serves). The
# tritonserver binary and its Python backend come from the nvidia-pytriton wheel
# (requirements-triton.txt, without its Python dependencies); the backend runs each
# archive's own scorer with this project's torch and xgboost (torchserve/triton.py).
# Built from the repository root after `make models`, naming the archives' versions:
#   docker build -f k8s/images/triton-server.Dockerfile \
#     --build-arg CHAMPION_VERSION=$(.venv/bin/python -m torchserve.archive version .run/models/champion.mar) \
#     --build-arg CHALLENGER_VERSION=$(.venv/bin/python -m torchserve.archive version .run/models/challenger.mar) \
#     -t triton-server:$(.venv/bin/python -m torchserve.archive version .run/models/champion.mar | cut -c1-12) .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0000000000000000000000000000000000000000000000000000000000000000

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt requirements-triton.txt README.md ./
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
RUN /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -c constraints.txt ./client ".[model]" \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps --require-hashes \
      --target /opt/triton -r requirements-triton.txt
ARG CHAMPION_VERSION
ARG CHALLENGER_VERSION
COPY .run/models/champion.mar .run/models/challenger.mar /opt/models/
# The repositories (and their python-path.txt) are written by the venv the backend uses.
RUN test -n "${CHAMPION_VERSION}" && test -n "${CHALLENGER_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /opt/models/champion.mar)" = "${CHAMPION_VERSION}" \
 && test "$(/opt/venv/bin/python -m torchserve.archive version /opt/models/challenger.mar)" = "${CHALLENGER_VERSION}" \
 && /opt/venv/bin/python -m torchserve.triton repository /opt/repository \
      /opt/models/champion.mar /opt/models/challenger.mar

FROM ${PYTHON_IMAGE}
ARG CHAMPION_VERSION
ARG CHALLENGER_VERSION
RUN useradd --system --uid 10004 --no-create-home --shell /usr/sbin/nologin triton
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/triton /opt/triton
COPY --from=build /opt/repository /opt/repository
# The archives too: the decision pod's model-references init container copies them, and
# the server reports their versions (Triton numbers its own).
COPY --from=build /opt/models /opt/models
LABEL org.opencontainers.image.title="triton-server" \
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
