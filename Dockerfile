# syntax=docker/dockerfile:1
# ca-service image: wheels built in one stage, installed into a slim runtime without build tools.
# Runs as a fixed non-root UID on a read-only root filesystem: the CA state lives in Kubernetes
# (storage.backend: kubernetes) or in the mounted /var/lib/ca-service volume, temp files in a mounted
# /tmp (deploy/kubernetes/base/deployment.yaml mounts both as emptyDirs).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ca_service ./ca_service
# Every dependency as a wheel (manylinux wheels: no compiler needed, none shipped).
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# Install exactly the builder's wheels (versions resolved there) through a bind mount, so no wheel
# ends up in a layer; then remove pip and setuptools: nothing installs anything at runtime.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
 && pip uninstall -y pip setuptools wheel \
 && rm -rf /root/.cache
# A fixed, non-root UID (the Deployment's runAsUser) so the state volume's 0700/0600 permissions hold
# across image upgrades. No home directory and no login shell: the daemon needs neither.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ca-service \
 && mkdir -p /var/lib/ca-service && chown 10001:10001 /var/lib/ca-service && chmod 0700 /var/lib/ca-service
USER 10001:10001
WORKDIR /var/lib/ca-service
# Bytecode was compiled at install time; a read-only root must not make Python try to write more.
ENV CA_SERVICE_DATA_DIR=/var/lib/ca-service \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/ca-service"]
# 15012 gRPC (SDS + Istio CA API), 15014 HTTP side-port (metrics, health, admin), 15443 SPIFFE bundle endpoint
EXPOSE 15012 15014 15443
# SIGTERM starts the graceful stop: /readyz turns 503, SDS streams end with OK, listeners drain.
# Exec form: the daemon is PID 1 and receives the signal itself (no shell in between).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ca-service"]
CMD ["serve"]
