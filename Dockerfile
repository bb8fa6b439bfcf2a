# One image for the api, the worker and the one-shot migration.
#
# The worker needs a CUDA build of torch; the api never imports torch but shares the package, so the same
# image serves both. For a CPU-only image (a laptop, CI, an api-only host):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t magtune:cpu .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Empty: the newest build on that index; pin with --build-arg TORCH_VERSION=2.x.y.
ARG TORCH_VERSION=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAGTUNE_DATA_DIR=/data

# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch${TORCH_VERSION:+==${TORCH_VERSION}}"

WORKDIR /opt/magtune
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install .

# A non-root user owns the data directory; a named volume mounted there inherits this ownership.
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin magtune \
    && mkdir -p /data \
    && chown magtune:magtune /data
USER magtune
VOLUME ["/data"]
EXPOSE 8000

# The api's liveness; the compose file gives the worker a check of its own.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["magtune", "serve", "--host", "0.0.0.0", "--port", "8000"]
