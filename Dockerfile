# syntax=docker/dockerfile:1
# metatt-server image. CPU by default; `--build-arg VARIANT=cuda` makes the GPU
# image (the torch wheel carries the CUDA runtime; the host needs the NVIDIA
# driver and container toolkit).
#   docker build -t metatt:cpu .
#   docker build --build-arg VARIANT=cuda -t metatt:cuda .
#   scripts/container_smoke.sh    # podman: build the CPU image, smoke it (README "Container")
ARG BASE=debian:bookworm-slim
ARG VARIANT=cpu

FROM ${BASE} AS build
WORKDIR /opt/metatt
COPY scripts/ scripts/
COPY requirements.txt ./
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-pip sudo \
    && rm -rf /var/lib/apt/lists/*
COPY CMakeLists.txt ./
COPY cmake/ cmake/
COPY proto/ proto/
COPY base/ base/
COPY adapters/ adapters/
COPY server/ server/
COPY client/ client/
COPY bench/ bench/
COPY tests/ tests/
# Behind a TLS-intercepting proxy pip needs the proxy's CA: mount a bundle
# holding it and name it, e.g. podman build --volume
# /etc/ssl/certs/ca-certificates.crt:/etc/ssl/build-ca.crt:ro --build-arg
# PIP_CERT=/etc/ssl/build-ca.crt (scripts/container_smoke.sh does). Unset: pip's default.
ARG PIP_CERT
# Only the three binaries the runtime stage ships (the tests and benchmarks
# would double the compile time); Release: no debug info in the image.
RUN METATT_BUILD_TARGETS="metatt-server metattctl metatt-http" BUILD_TYPE=Release \
    ./scripts/setup.sh && rm -rf build/CMakeFiles

FROM ${BASE} AS runtime-base
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      libgrpc++1.51 libprotobuf32 libsqlite3-0 libpq5 libabsl20220623 libprometheus-cpp-pull1.0 \
      libprometheus-cpp-core1.0 libcpp-httplib0.11 libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home metatt && mkdir /data && chown metatt /data
WORKDIR /opt/metatt
# Binaries keep their RPATH into .venv/.../torch/lib and nvidia/*/lib.
COPY --from=build /opt/metatt/.venv/lib/python3.11/site-packages/torch/lib .venv/lib/python3.11/site-packages/torch/lib
COPY --from=build /opt/metatt/.venv/lib/python3.11/site-packages/nvidia .venv/lib/python3.11/site-packages/nvidia
COPY --from=build /opt/metatt/models models
COPY --from=build /opt/metatt/build/server/metatt-server /opt/metatt/build/client/metattctl \
     /opt/metatt/build/server/http/metatt-http /usr/local/bin/
ENV METATT_MODEL_DIR=/opt/metatt/models/all-MiniLM-L6-v2
USER metatt
VOLUME ["/data"]
# gRPC, metrics, and the OpenAI-compatible gateway (metatt-http, started beside
# the server: see README "From the OpenAI SDK").
EXPOSE 50051 9090 8080
# Secrets (README "Security"): scripts/make_secrets.sh DIR makes them, mount
# DIR at /etc/metatt/secrets (compose and deploy/k8s do). The server refuses
# to listen beyond loopback without TLS and tokens, and /metrics beyond
# loopback without a password, so the image does not start without them.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["metattctl", "--server=localhost:50051", "--tls_ca=/etc/metatt/secrets/ca.pem", "--timeout=4", "health"]
ENTRYPOINT ["metatt-server", "--data_dir=/data"]
CMD ["--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9090", "--device=auto", \
     "--tls_cert=/etc/metatt/secrets/server.pem", "--tls_key=/etc/metatt/secrets/server.key", \
     "--auth_tokens=/etc/metatt/secrets/tokens.json", \
     "--metrics_password_file=/etc/metatt/secrets/metrics-password"]

FROM runtime-base AS runtime-cpu
ENV METATT_DEVICE_HINT=cpu

FROM runtime-base AS runtime-cuda
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The final image: runtime-cpu (default) or runtime-cuda.
FROM runtime-${VARIANT}
