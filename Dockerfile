# syntax=docker/dockerfile:1
#
# The notsure serving image: only the service's dependencies (no torch), the bundled models, a
# non-root user and a readiness HEALTHCHECK.
#
#   GPU (default; NVIDIA driver >= 580 for CUDA 13 on the host):
#     docker build -t notsure:gpu .
#   CPU (plain onnxruntime on Ubuntu, no CUDA libraries):
#     docker build --build-arg VARIANT=cpu -t notsure:cpu .
#
# Both variants share one Python (Ubuntu 24.04's 3.12), so the virtualenv built in the `build`
# stage runs unchanged on either runtime base.

# gpu or cpu: picks the runtime base image and the onnxruntime wheel.
ARG VARIANT=gpu
# The PyPI onnxruntime-gpu 1.31 wheels (the version in requirements/lock-service.txt) link
# CUDA 13 (libcublas.so.13, libcudart.so.13) and load cuDNN 9: the CUDA base must match the
# locked onnxruntime build; change both together.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG UBUNTU_IMAGE=ubuntu:24.04

FROM ${UBUNTU_IMAGE} AS build
ARG VARIANT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's python3 is the interpreter of both stages; its version is fixed by the base tag, and
# apt pins of Ubuntu package versions would break with every security update (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# Only what the service needs: training/ (torch) stays out of the image.
COPY pyproject.toml README.md ./
COPY requirements/lock-service.txt requirements/
COPY service/ service/
COPY notsure/ notsure/
# The exact versions of the service lock (what the tests ran against), then the project itself
# without resolving anything again. The lock pins onnxruntime-gpu (linux x86_64); the CPU
# variant swaps in the plain onnxruntime wheel of the same version: both install the same
# `onnxruntime` module, so they cannot coexist. The CUDA base above is chosen for the locked
# onnxruntime-gpu release. The import check runs isolated (-I) so it sees the installed
# packages, not /src.
RUN pip install --no-deps -r requirements/lock-service.txt \
    && pip install --no-deps . \
    && if [ "${VARIANT}" = cpu ]; then \
        ort="$(sed -n 's/^onnxruntime-gpu==\([^ ;]*\).*/\1/p' requirements/lock-service.txt)" \
        && pip uninstall -y onnxruntime-gpu && pip install --no-deps "onnxruntime==${ort}"; \
    fi \
    && python -I -c "import onnxruntime, service.main, notsure.cli; print(onnxruntime.get_available_providers())"

FROM ${CUDA_IMAGE} AS base-gpu
FROM ${UBUNTU_IMAGE} AS base-cpu

# The serving image (the last stage, so a plain `docker build` produces it). base-${VARIANT} is one
# of the two stages above; hadolint takes it for an untagged image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS serve
ARG VARIANT
LABEL org.opencontainers.image.title="notsure" \
      org.opencontainers.image.description="Image classifier service that answers NOT SURE when the J-score is below T" \
      org.opencontainers.image.licenses="MIT" \
      io.notsure.variant="${VARIANT}"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 notsure \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin notsure
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /usr/local/bin/notsure-healthcheck
# Bundled model repository, read-only for the service user (mount another one over
# NOTSURE_MODEL_REPOSITORY to serve different models without rebuilding).
COPY models/ /app/models/
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NOTSURE_HOST=0.0.0.0 \
    NOTSURE_PORT=8000 \
    NOTSURE_GRPC_PORT=8001 \
    NOTSURE_MODEL_REPOSITORY=/app/models \
    NOTSURE_DEVICE=auto
USER 10001:10001
# HTTP (native API, KServe V2 REST, /metrics) and KServe V2 gRPC, as Triton.
EXPOSE 8000 8001
# Ready = every model loaded (503 before). The start period covers loading on a cold GPU.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/notsure-healthcheck"]
CMD ["notsure", "serve"]
