# The CLIP pre-annotation backend (also the RQ worker image). CPU by default:
#
#   docker build -t clip-ls-backend .
#
# GPU variant: torch with CUDA instead of the CPU-only wheels, e.g.
#
#   docker build -t clip-ls-backend:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# (pick the CUDA index that matches your driver; see docker-compose.yml for giving the container the GPU).
# Weights: downloaded on first start into /models (MODEL_DIR, HF_HOME, TORCH_HOME below; a volume), or baked in:
#
#   docker build -t clip-ls-backend --build-arg PRELOAD_MODELS=1 .      # (PROFILE=cpu: --build-arg PROFILE=cpu)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# CPU-only torch/torchvision by default (~5x smaller than the CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/models \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch

WORKDIR /app

# Dependencies first (cached layer): torch/torchvision at the pinned versions from TORCH_INDEX_URL,
# then the rest from PyPI (the pins are then already satisfied; `==2.14.1` accepts `2.14.1+cpu`).
COPY requirements.txt ./
RUN grep -E '^(torch|torchvision)==' requirements.txt > /tmp/torch.txt \
 && pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt \
 && pip install -r requirements.txt \
 && rm /tmp/torch.txt

COPY backend ./backend

# Run unprivileged; /models is the volume for weights and learned state.
RUN useradd --uid 1001 --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /models \
 && chown app /models
USER app

# Optionally bake the default weights into the image (a fresh named volume mounted at /models gets a copy).
ARG PRELOAD_MODELS=0
ARG PROFILE=default
RUN if [ "$PRELOAD_MODELS" = "1" ]; then PROFILE="$PROFILE" python -m backend download; fi

EXPOSE 9090
# The first start may download the weights (~0.9 GB) before /health answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=4)"

# One process, models loaded once, requests on 8 threads behind waitress's I/O loop (slow or half-open client
# connections cost a socket, not a thread), no request timeout (a bulk predict may run long).
CMD ["python", "-m", "backend", "serve", "--host", "0.0.0.0", "--port", "9090", "--threads", "8"]
