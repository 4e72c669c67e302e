# Worker image: Celery (threads pool) + the engine. torch from PyPI is the CUDA build with its
# NVIDIA libraries as wheels, so only the host's driver is needed (NVIDIA container toolkit).
# For a CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Build from the repo root: docker build -f deploy/docker/worker.Dockerfile -t latentd-worker .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1

WORKDIR /app
COPY requirements/common.txt requirements/worker.txt requirements/
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --extra-index-url "$TORCH_INDEX_URL" -r requirements/worker.txt; \
    else \
        pip install -r requirements/worker.txt; \
    fi

COPY services/ services/
COPY proto/ proto/
# The default model; mount another folder at /app/models to serve others.
COPY models/ models/

# /app/.cache/compile: torch.compile's caches (LATENTD_COMPILE_CACHE_DIR), a volume in docker-compose.yml
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin latentd \
    && mkdir -p /app/.cache/compile && chown -R latentd /app
USER 10001

# 9465 Prometheus metrics (not public).
EXPOSE 9465
# Fails when this container's Celery consumer has not consumed its heartbeat probe lately
# (alive-but-not-consuming after a Redis reconnect), so the runtime restarts it.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "services.worker.heartbeat", "--check"]
# The threads pool: task threads hand jobs to the one engine thread per model. The queues
# (latentd.<model>) come from LATENTD_WORKER_MODELS in services/worker/celery_app.py.
CMD ["sh", "-c", "exec celery -A services.worker.celery_app worker --pool threads --concurrency \"${LATENTD_WORKER_CONCURRENCY:-16}\" --without-gossip --without-mingle -l INFO"]
