# syntax=docker/dockerfile:1
# polyrank: multi-stage build.
#   docker build -t polyrank .                                   # CUDA-capable torch wheel (large)
#   docker build -t polyrank --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#                                                                # CPU-only wheel: a much smaller image
#   docker run -p 8080:8080 -v polyrank-cache:/data/pool-cache polyrank
# The default model (MiniLM + committed poly head) and chitchat pool are baked in under
# /models and /data; mount your own over them (see README, "Docker").

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
RUN make build model && bash scripts/stage-runtime.sh /out

FROM debian:bookworm-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /app polyrank
WORKDIR /app
COPY --from=builder /out/lib/ /usr/local/lib/polyrank/
COPY --from=builder /out/polyrank /usr/local/bin/polyrank
COPY --from=builder /out/models/ /models/
COPY --from=builder /out/data/ /data/
COPY --from=builder /out/config/ /app/config/
RUN echo /usr/local/lib/polyrank > /etc/ld.so.conf.d/polyrank.conf && ldconfig \
 && mkdir -p /data/pool-cache && chown -R polyrank /data/pool-cache
ENV POLYRANK_MODEL_DIR=/models/default \
    POLYRANK_CANDIDATES=/data/chitchat-pool.jsonl \
    POLYRANK_CACHE_DIR=/data/pool-cache \
    POLYRANK_HOST=0.0.0.0 \
    POLYRANK_PORT=8080
USER 10001
EXPOSE 8080
VOLUME ["/data/pool-cache"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["curl", "-fsS", "http://127.0.0.1:8080/health/live"]
ENTRYPOINT ["/usr/local/bin/polyrank"]
CMD ["serve"]
