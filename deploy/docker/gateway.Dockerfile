# Gateway image: FastAPI + gRPC front doors. No torch, no model: requirements/api.txt only.
# Build from the repo root: docker build -f deploy/docker/gateway.Dockerfile -t latentd-gateway .
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements/common.txt requirements/api.txt requirements/
RUN pip install -r requirements/api.txt

COPY services/ services/
COPY proto/ proto/
COPY scripts/ scripts/

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin latentd \
    && chown -R latentd /app
USER 10001

# 8000 REST/SSE, 50051 gRPC, 9464 Prometheus metrics (not public).
EXPOSE 8000 50051 9464
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2).status != 200)"
CMD ["python", "-m", "services.api"]
