# Sourced by scripts/demo.sh and scripts/container-check.sh: their three-namespace sandbox.
#   CLIENT --(NET.1.0/24)-- NODE [ext0; BRIDGE] --(NET.2.0/24)-- VM
# The node is NET.1.1 and NET.2.1, the client NET.1.2, the vm NET.2.2; forwarding is on in
# the node. Every link is made inside the node namespace with its peer moved straight into
# the other one: nothing is created in the root namespace.

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# sandbox_up CLIENT NODE VM BRIDGE NET   (NET: the first two octets, e.g. 10.77)
sandbox_up() {
    local client=$1 node=$2 vm=$3 bridge=$4 net=$5 ns
    for ns in "$client" "$node" "$vm"; do
        ip netns add "$ns"
        in_ns "$ns" ip link set lo up
    done
    in_ns "$node" ip link add ext0 type veth peer name eth0 netns "$client"
    in_ns "$node" ip addr add "$net.1.1/24" dev ext0
    in_ns "$node" ip link set ext0 up
    in_ns "$client" ip addr add "$net.1.2/24" dev eth0
    in_ns "$client" ip link set eth0 up
    in_ns "$node" ip link add "$bridge" type bridge
    in_ns "$node" ip addr add "$net.2.1/24" dev "$bridge"
    in_ns "$node" ip link set "$bridge" up
    in_ns "$node" ip link add vmp0 type veth peer name eth0 netns "$vm"
    in_ns "$node" ip link set vmp0 master "$bridge" up
    in_ns "$vm" ip addr add "$net.2.2/24" dev eth0
    in_ns "$vm" ip link set eth0 up
    in_ns "$vm" ip route add default via "$net.2.1"
    in_ns "$node" ip route add default via "$net.1.2"
    in_ns "$node" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
}
