# Gateway image: FastAPI REST/SSE gateway and the gRPC front door (same image, two processes).
# No torch, no model: requirements/api.txt only. Build from the repo root:
#   docker build -f deploy/docker/gateway.Dockerfile -t latentd-gateway .

# Stage 1: generate the gRPC stubs (git-ignored; `make proto`), with grpcio-tools kept out of the image.
FROM python:3.11-slim AS proto
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install grpcio-tools==1.85.1
COPY proto/ proto/
COPY scripts/ scripts/
COPY services/__init__.py services/__init__.py
COPY services/common/__init__.py services/common/__init__.py
COPY services/common/grpc_gen/.gitignore services/common/grpc_gen/.gitignore
RUN python -m scripts.gen_proto

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements/common.txt requirements/api.txt requirements/
RUN pip install -r requirements/api.txt

# services/ carries the page at / (services/api/web/static/); requirements/api.txt the offline /docs assets
COPY services/ services/
COPY proto/ proto/
COPY --from=proto /src/services/common/grpc_gen/ services/common/grpc_gen/

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin latentd \
    && chown -R latentd /app
USER 10001

# 8000 REST/SSE, 50051 gRPC, 9464 gateway metrics, 9466 gRPC metrics (metrics ports not public).
EXPOSE 8000 50051 9464 9466
# As many REST server processes as the container may use CPUs (its cgroup quota, else its cpuset); set
# LATENTD_PROCESSES to a number to override. The parent serves their metrics, summed, on 9464.
ENV LATENTD_PROCESSES=0

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2).status != 200)"
CMD ["python", "-m", "services.api"]
