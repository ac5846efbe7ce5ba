# Multi-stage build of sessionlb. (Image registries are not reachable from
# the development machines, so CI does not build this image; the binary is
# tested directly, and a test runs this file's HEALTHCHECK command against a
# real node and checks that the dependency layer stubs every Cargo target.)
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in a layer of their own that only Cargo.toml and
# Cargo.lock (and the patched crates in vendor/) invalidate: every target
# Cargo.toml names gets a stub.
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
RUN mkdir -p src/bin benches integration && touch src/lib.rs \
    && for f in src/main.rs src/bin/demo_backend.rs integration/main.rs benches/locks.rs benches/routing.rs benches/cluster.rs benches/ops.rs; do echo 'fn main() {}' > "$f"; done \
    && cargo build --release --locked --bins \
    && rm -rf src benches integration target/release/.fingerprint/sessionlb-* target/release/deps/*sessionlb*
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/sessionlb --create-home sessionlb \
    && install -d -o sessionlb -g sessionlb -m 0750 /run/sessionlb
COPY --from=build /src/target/release/sessionlb /usr/local/bin/sessionlb
# The example configuration; mount your own at /etc/sessionlb/sessionlb.toml
# (with metrics-address = "0.0.0.0:9787" for Prometheus outside the container)
# and the secure cookie key at /etc/sessionlb/secure-cookie-key (mode 0600,
# readable by uid sessionlb).
COPY conf/sessionlb.toml /etc/sessionlb/sessionlb.toml
USER sessionlb
EXPOSE 8787 9787
# Healthy while the node serves: unhealthy while its backend is down or it drains.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/sessionlb", "--config", "/etc/sessionlb/sessionlb.toml", "health"]
# SIGTERM drains for up to drain-timeout: give `docker stop` as long (--stop-timeout 330).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sessionlb", "--config", "/etc/sessionlb/sessionlb.toml"]
CMD ["serve"]
