# node-vm-agent: build with the Rust toolchain, run on a slim Debian.
# docker build -t node-vm-agent .
# docker run -d --network host --cap-add NET_ADMIN -v node_agent_data:/data node-vm-agent
# (add --device /dev/net/tun on hosts without the WireGuard kernel module)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
RUN cargo build --release --locked --bin node-vm-agent

FROM debian:bookworm-slim
COPY --from=build /src/target/release/node-vm-agent /usr/local/bin/node-vm-agent
ENV DATA_DIR=/data
VOLUME /data
EXPOSE 8000
ENTRYPOINT ["node-vm-agent"]
CMD ["serve"]
