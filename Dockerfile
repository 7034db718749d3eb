# node-vm-agent: built with the Rust toolchain, run on a slim Debian with libvirt's client
# library.
#
#   docker build --build-arg NVA_COMMIT=$(git rev-parse --short=12 HEAD) \
#       [--build-arg LIBVIRT=yes] -t node-vm-agent .
#   docker run -d --name node-vm-agent --restart unless-stopped \
#       --network host --cap-add NET_ADMIN \
#       -v node_agent_data:/data \
#       -v /var/run/libvirt:/var/run/libvirt \
#       node-vm-agent
# (podman: the same flags; `podman build --network host` where RUN steps must not get a
# bridge.)
#
# What the container needs from the host:
# - net.ipv4.ip_forward=1 set on the host: /proc/sys is read-only in the container
#   (the agent refuses to start when forwarding is off and it cannot turn it on).
# - --network host: the agent writes the nftables port maps, the WireGuard interface and
#   the routes of the node's own network namespace, and serves the API (NODE_API_PORT,
#   8000) there. A container network of its own would map nothing on the node.
# - --cap-add NET_ADMIN: nftables, links and routes over netlink.
# - -v VOLUME:/data: the SQLite state, the WireGuard key, the generated API token
#   (DATA_DIR=/data). The port maps are rebuilt from it when the container restarts.
# - -v /var/run/libvirt:/var/run/libvirt: only for VMs, libvirtd's socket (or set a
#   remote LIBVIRT_URI), and an image built with --build-arg LIBVIRT=yes. The storage
#   pool's directory need not be mounted: images go through libvirt's API.
# - --device /dev/net/tun: only on hosts without the WireGuard kernel module (the agent
#   then runs WireGuard in user space).
# Settings come from the environment (API_TOKEN, VMS_BRIDGE, VM_SUBNET, EXTERNAL_IFACE,
# ...; see `node-vm-agent serve --help`). scripts/container-check.sh builds this file and
# runs the image in a network namespace; docs/container.md has its results.

FROM rust:1-bookworm AS build
# libvirt's pkg-config file and headers, which the virt crate's build script asks for.
RUN apt-get update && apt-get install -y --no-install-recommends libvirt-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies in a layer of their own: the manifest, the lock file and the build script
# with stub sources (the [[bench]] target's file must exist for cargo to read the
# manifest). This layer is rebuilt only when one of those three files changes.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/portmap.rs \
    && cargo build --release --locked --bin node-vm-agent \
    && rm src/main.rs src/lib.rs

COPY migrations migrations
COPY src src
# The commit --version and node_vm_agent_build_info report: there is no .git in the
# context, so build.rs takes it from here. Declared only now so that a new commit does not
# rebuild the dependency layer.
ARG NVA_COMMIT=
# touch: COPY keeps the files' times, which may be older than the stub build's output;
# cargo would then take the stub crate for up to date.
RUN touch src/main.rs src/lib.rs \
    && NVA_COMMIT="$NVA_COMMIT" cargo build --release --locked --bin node-vm-agent \
    && ./target/release/node-vm-agent --version

FROM debian:bookworm-slim
# libvirt's client library (libvirt0) is for VMs only, and with its dependencies it is
# 62 MB, more than slim Debian plus the agent (98.5 MB, within the 100 MB target): it is
# in the image only with --build-arg LIBVIRT=yes (160 MB). Without it the agent maps
# ports and joins the mesh as usual (libvirt.so.0 is loaded on first use only); a VM
# call fails with an error that names the missing library. No CA bundle either way:
# reqwest carries its own roots (webpki-roots).
ARG LIBVIRT=no
RUN if [ "$LIBVIRT" = yes ]; then \
        apt-get update && apt-get install -y --no-install-recommends libvirt0 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /src/target/release/node-vm-agent /usr/local/bin/node-vm-agent
ENV DATA_DIR=/data
VOLUME /data
EXPOSE 8000
ENTRYPOINT ["node-vm-agent"]
CMD ["serve"]
