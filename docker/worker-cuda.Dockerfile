# CUDA worker image for the cosyvoice engine. The model directory is mounted at run time
# (WORKER_MODEL_DIR); nothing is downloaded when the container starts.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY docker/requirements-worker-cuda.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

COPY pyproject.toml ./
COPY contract ./contract
COPY worker ./worker
# --no-deps: keep the base image's CUDA torch and skip the CPU-only Piper packages.
RUN pip install --no-deps . && useradd --system --uid 10001 tts
USER tts

ENV WORKER_HOST=0.0.0.0 WORKER_PORT=8000 WORKER_ENGINE=cosyvoice \
    WORKER_MODEL_DIR=/models/cosyvoice WORKER_DEVICE=cuda
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
CMD ["python", "-m", "worker"]
