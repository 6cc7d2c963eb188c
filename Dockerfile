# hegate's gateway: the core install (no torch, as `make serve`), the bundled models, a non-root user.
#   docker build -t hegate .
#   docker run --rm -p 8001:8001 -p 8002:8002 -p 8003:8003 hegate
# Settings: mount a TOML file and add `--config /etc/hegate/hegate.toml`, or set HEGATE_* variables
# (gateway/settings.py); deploy/k8s/ does both.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY models models
COPY kernels kernels
COPY bench bench
# Core dependencies only: the `train` extra (torch, opacus) is not installed.
RUN python -m venv /opt/hegate && /opt/hegate/bin/pip install . \
    && /opt/hegate/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin hegate
COPY --from=build /opt/hegate /opt/hegate
# numba caches compiled kernels beside their source, which this user cannot write: a cache of its own.
ENV PATH=/opt/hegate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
USER 10001:10001
EXPOSE 8001 8002 8003
# The gateway's own gRPC health service (grpc.health.v1 on 8001; health needs no API key). Start-up
# compiles every model's plans: allow two minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')).Check(h.HealthCheckRequest(), timeout=4).status; sys.exit(s != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["hegate", "serve", "--address", "0.0.0.0:8001"]
