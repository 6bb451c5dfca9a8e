# syntax=docker/dockerfile:1
# The CPU worker: ONNX Runtime INT8, no GPU. Also runs the other CLI commands (the compose
# producer replays the bundled sample posts with it). Build from the repository root:
#   docker build -f docker/worker-cpu.Dockerfile -t stream-sentiment-worker:cpu .

# The Python line the project is developed and tested on; the patch release is pinned so a
# rebuild gives the same interpreter.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler for the tokenizer's C fast path (stream_sentiment/batching/_wordpieces.c; the image has Python's
# headers), in this stage only: the runtime image gets the built module, not gcc.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what `pip install .` reads: a change to tests or docs does not invalidate this layer.
COPY pyproject.toml README.md ./
COPY stream_sentiment ./stream_sentiment
# The install skips the C module where it cannot compile it; an image must have it (-P: not the source tree's).
RUN pip install . && python -P -c "import stream_sentiment.batching._wordpieces"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAM_SENTIMENT_ENGINE__REPOSITORY=/app/engines
# A fixed, unprivileged uid: the worker needs no root, and volume ownership stays predictable.
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home app \
    && mkdir -p /run/stream-sentiment && chown app:app /run/stream-sentiment
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The committed engine versions (checksummed by their manifests); plans/ folders are left out
# by .dockerignore, as they are GPU-specific.
COPY --chown=app:app engines ./engines
USER app
# Admin HTTP: /healthz, /readyz, /metrics (open) and the token-guarded engine routes.
EXPOSE 8081
ENTRYPOINT ["stream-sentiment"]
CMD ["run"]
