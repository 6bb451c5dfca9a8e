# syntax=docker/dockerfile:1
# The GPU worker: TensorRT 10 on an NVIDIA GPU. The plan is not built here: plans are specific
# to the GPU model and TensorRT version, so gpu_entrypoint.py builds one at start-up (once per
# GPU, cached in a volume) and then runs the worker. Build from the repository root:
#   docker build -f docker/worker-gpu.Dockerfile -t stream-sentiment-worker:gpu .

# NGC 25.01: TensorRT 10.8, CUDA 12.8, Ubuntu 24.04 with Python 3.12 (the 24.xx images have
# Python 3.10, below the project's 3.11). Needs driver 570+, or an older data-center driver
# with CUDA forward compatibility.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3
FROM ${TENSORRT_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Ubuntu's Python is externally managed (PEP 668). A venv that sees the system site-packages
# keeps the TensorRT bindings the image ships, so '.[tensorrt]' does not download them again.
# python3-dev and gcc: the tokenizer's C fast path (stream_sentiment/batching/_wordpieces.c) is compiled at install.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAM_SENTIMENT_ENGINE__REPOSITORY=/app/engines \
    STREAM_SENTIMENT_ENGINE__BACKEND=tensorrt \
    PLAN_CACHE_DIR=/var/cache/stream-sentiment/plans

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream_sentiment ./stream_sentiment
# cuda-python is held to the image's CUDA major: 13.x bindings want a CUDA 13 driver.
RUN pip install '.[tensorrt]' 'cuda-python>=12,<13' \
    && python -P -c "import stream_sentiment.batching._wordpieces" && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home app \
    && mkdir -p /var/cache/stream-sentiment/plans /run/stream-sentiment \
    && chown -R app:app /var/cache/stream-sentiment /run/stream-sentiment
WORKDIR /app
# Owned by the worker's user: the entrypoint links each version's plans/ into the cache volume.
COPY --chown=app:app engines ./engines
COPY --chmod=755 docker/gpu_entrypoint.py /usr/local/bin/stream-sentiment-gpu-entrypoint
USER app
# Declared so a plain `docker run` also keeps plans outside the container's layer; compose
# mounts a named volume here, which a new volume initialises with this folder's ownership.
VOLUME ["/var/cache/stream-sentiment/plans"]
EXPOSE 8081
ENTRYPOINT ["stream-sentiment-gpu-entrypoint"]
CMD ["run"]
