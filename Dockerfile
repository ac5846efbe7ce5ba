# Multi-stage build of sessionlb. (Image registries are not reachable from
# the development machines, so this file is not built in CI; the binary is
# tested directly.)
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/sessionlb --create-home sessionlb
COPY --from=build /src/target/release/sessionlb /usr/local/bin/sessionlb
COPY conf/sessionlb.toml /etc/sessionlb/sessionlb.toml
USER sessionlb
EXPOSE 8787
ENTRYPOINT ["/usr/local/bin/sessionlb", "--config", "/etc/sessionlb/sessionlb.toml"]
CMD ["serve"]
