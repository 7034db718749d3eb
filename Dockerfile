# node-vm-agent: build with the Rust toolchain, run on a slim Debian.
# docker build -t node-vm-agent .
# docker run -d --network host --cap-add NET_ADMIN -v node_agent_data:/data \
#     -v /var/run/libvirt:/var/run/libvirt node-vm-agent
# (add --device /dev/net/tun on hosts without the WireGuard kernel module). The agent
# reaches libvirtd only through its socket (or a remote LIBVIRT_URI): the storage pool's
# directory need not be mounted into the container.
FROM rust:1-bookworm AS build
WORKDIR /src
# libvirt's client library and pkg-config file, linked by the virt crate.
RUN apt-get update && apt-get install -y --no-install-recommends libvirt-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
RUN cargo build --release --locked --bin node-vm-agent

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libvirt0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/node-vm-agent /usr/local/bin/node-vm-agent
ENV DATA_DIR=/data
VOLUME /data
EXPOSE 8000
ENTRYPOINT ["node-vm-agent"]
CMD ["serve"]
