# syntax=docker/dockerfile:1
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ca_service ./ca_service
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
# A fixed, non-root UID so the state volume's 0700/0600 permissions hold across image upgrades.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin ca-service \
 && mkdir -p /var/lib/ca-service && chown 10001:10001 /var/lib/ca-service && chmod 0700 /var/lib/ca-service
COPY --from=build /install /usr/local
USER 10001:10001
WORKDIR /home/ca-service
ENV CA_SERVICE_DATA_DIR=/var/lib/ca-service
VOLUME ["/var/lib/ca-service"]
# 15012 gRPC (SDS + Istio CA API), 15014 HTTP side-port (metrics, health, admin), 15443 SPIFFE bundle endpoint
EXPOSE 15012 15014 15443
ENTRYPOINT ["ca-service"]
CMD ["serve"]
