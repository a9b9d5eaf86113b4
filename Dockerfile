# syntax=docker/dockerfile:1
#
# wif-broker image. The first stage builds a virtual environment; the second
# copies only that venv onto a clean slim Python. At run time the image:
#   - runs as UID/GID 65532 (non-root, numeric so runAsNonRoot can verify it);
#   - writes nothing (pip compiles the venv's bytecode at build time and
#     PYTHONDONTWRITEBYTECODE=1), so a read-only root filesystem works;
#   - needs no shell, curl or wget (exec-form ENTRYPOINT and HEALTHCHECK).
#
#   docker build -t ghcr.io/example/wif-broker:0.1.0 .
#   docker run --rm ghcr.io/example/wif-broker:0.1.0 env --format k8s
#
# tests/test_packaging.py replays the build stage's RUN lines in a clean venv.

ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# Same path in both stages: the venv's console scripts have absolute shebangs.
RUN python -m venv /opt/wif-broker
COPY pyproject.toml README.md /src/
COPY broker /src/broker
# pip's cache lives in a BuildKit cache mount, never in a layer.
RUN --mount=type=cache,target=/root/.cache/pip /opt/wif-broker/bin/pip install /src

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="wif-broker" \
      org.opencontainers.image.description="GCE metadata server backed by Workload Identity Federation" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/wif-broker /opt/wif-broker
ENV PATH=/opt/wif-broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 8988: metadata server (listens on 127.0.0.1 unless --listen says otherwise,
# so it is reachable from containers sharing the network namespace: a pod, an
# awsvpc ECS task). 8989: /healthz, /readyz, /metrics (127.0.0.1 by default;
# the shipped manifests and task definitions set --admin-listen 0.0.0.0:8989).
EXPOSE 8988 8989
# Liveness only; readiness (first token minted) is /readyz, which the
# Kubernetes startupProbe uses. Proxies are bypassed on purpose.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/opt/wif-broker/bin/python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8989/healthz', timeout=2)"]
ENTRYPOINT ["wif-broker"]
CMD ["run"]
