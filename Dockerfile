# syntax=docker/dockerfile:1
# polyrank: multi-stage build.
#   docker build -t polyrank .                                   # CUDA-capable torch wheel (large)
#   docker build -t polyrank --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#                                                                # CPU-only wheel: a much smaller image
#   docker run -p 8080:8080 -v polyrank-store:/data/pool-store -v polyrank-cache:/data/pool-cache polyrank
# The default model (MiniLM + committed poly head) and chitchat pool are baked in under
# /models and /data, with the pool's encoded cache (ready at start); mount your own over them
# (see README, "Docker").
# The runtime stage alone, from a tree that scripts/stage-runtime.sh made outside Docker
# (scripts/container-check.sh does this with podman):
#   docker build --target runtime --build-context staged=STAGE_DIR -t polyrank .

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS builder
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian stable only ships security fixes within a release, so packages are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The venv first, so source edits do not reinstall torch.
COPY requirements.txt scripts/setup-venv.sh scripts/
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
      python3 -m venv .venv && .venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX_URL"; \
    fi \
 && cp scripts/requirements.txt requirements.txt \
 && bash scripts/setup-venv.sh
COPY . .
# --warm-cache encodes the default pool once, here, so that containers start ready.
RUN make build model && bash scripts/stage-runtime.sh /out --warm-cache

# What the runtime stage takes, as one tree; `--build-context staged=DIR` replaces it.
FROM scratch AS staged
COPY --from=builder /out/ /

FROM debian:bookworm-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /app polyrank
WORKDIR /app
COPY --from=staged /lib/ /usr/local/lib/polyrank/
COPY --from=staged /polyrank /usr/local/bin/polyrank
COPY --from=staged /models/ /models/
COPY --from=staged /data/ /data/
COPY --from=staged /config/ /app/config/
# The default pool's encoded cache, outside the cache volume so that no mount hides it: at
# start, `serve` copies it into an empty /data/pool-cache (see README, "Docker").
COPY --from=staged /share/ /usr/local/share/
RUN echo /usr/local/lib/polyrank > /etc/ld.so.conf.d/polyrank.conf && ldconfig \
 && mkdir -p /data/pool-cache /data/pool-store && chown -R polyrank /data/pool-cache /data/pool-store
# libgomp's threads sleep instead of spinning while they wait for each other: on shared CPUs
# (CPU limits, busy nodes) spinning threads stall each other. On 2 shared cores this roughly
# halved the start and cut /rank's p90 several-fold (README, "Docker").
# `-e OMP_WAIT_POLICY=active` restores spinning.
ENV OMP_WAIT_POLICY=passive
ENV POLYRANK_MODEL_DIR=/models/default \
    POLYRANK_CANDIDATES=/data/chitchat-pool.jsonl \
    POLYRANK_CACHE_DIR=/data/pool-cache \
    POLYRANK_STORE_DIR=/data/pool-store \
    POLYRANK_HOST=0.0.0.0 \
    POLYRANK_PORT=8080
USER 10001
EXPOSE 8080
# The live pool's store (writes through /candidates) and the encoded-pool cache.
VOLUME ["/data/pool-store", "/data/pool-cache"]
# The port follows POLYRANK_PORT, so an env-only port change keeps the check passing.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${POLYRANK_PORT:-8080}/health/live\""]
ENTRYPOINT ["/usr/local/bin/polyrank"]
CMD ["serve"]
