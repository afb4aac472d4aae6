#!/bin/sh
# The DaemonSet's agent container: keep this node in the mesh (`vppmesh up --watch`).
#
# The node's private key is made once, on the node's disk (hostPath /var/lib/vppmesh);
# `node-key.sh` prints the node's name and public key for the mesh file (the ConfigMap),
# for every node with one command (docs/kubernetes.md). The process id goes to
# /run/vppmesh/agent.pid, where the host's vppmesh-cni wrapper and the readiness check
# find this container (the pod runs with hostPID, so it is the host's id).
set -eu
key=/var/lib/vppmesh/private.key
mesh="${VPPMESH_MESH:-/etc/vppmesh/config/mesh.yaml}"
node="${NODE_NAME:?NODE_NAME must be set (downward API: spec.nodeName)}"
mkdir -p /var/lib/vppmesh /run/vppmesh /var/log/vppmesh
if [ ! -s "$key" ]; then
  vppmesh keygen --key "$key" >/dev/null
fi
echo "node $node: public key $(vppmesh pubkey --key "$key")"

# The node's uplink (ConfigMap uplink_interface, uplink_driver): VPP takes the NIC and the
# host keeps its network through VPP. `auto` is the interface of the IPv4 default route,
# or the one taken before (the host link keeps the NIC's name); `none` leaves the NIC
# alone (VPP's underlay is then the mesh file's `uplink`, e.g. an avf/dpdk port).
set --
uplink="${VPPMESH_UPLINK_INTERFACE:-auto}"
if [ "$uplink" = auto ]; then
  saved=$(ls /var/lib/vppmesh/uplink-*.json 2>/dev/null | head -n 1)
  if [ -n "$saved" ]; then
    uplink=$(basename "$saved" .json)
    uplink=${uplink#uplink-}
  else
    uplink=$(ip -4 route show default | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1)
  fi
  [ -n "$uplink" ] || { echo "uplink_interface auto: no IPv4 default route on this node; name the NIC in the ConfigMap" >&2; exit 1; }
fi
if [ "$uplink" != none ]; then
  set -- --take-uplink "$uplink" --uplink-driver "${VPPMESH_UPLINK_DRIVER:-af_packet}"
fi

# Pods reach their node, its Services, DNS and the outside through the host: VPP's mesh
# VRF sends what is not for the mesh to the host link (vppmesh0). The host forwards it,
# masquerades what it forwards from vppmesh0 (to the outside, and to Service backends
# in the mesh after kube-proxy's DNAT, so the replies come back through the host), and
# drops what would go straight back into VPP (a pod address no node owns).
echo 1 > /proc/sys/net/ipv4/ip_forward
nft -f - <<'NFT'
table ip vppmesh
delete table ip vppmesh
table ip vppmesh {
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "vppmesh0" oifname "vppmesh0" ct status dnat accept
    iifname "vppmesh0" oifname "vppmesh0" drop
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    iifname "vppmesh0" masquerade
  }
}
NFT

while [ ! -S /run/vpp/api.sock ]; do
  echo "waiting for VPP's API socket /run/vpp/api.sock"
  sleep 2
done
echo $$ > /run/vppmesh/agent.pid
# HTTPS for the metrics when a kubernetes.io/tls Secret (tls.crt, tls.key; e.g. from
# cert-manager) is mounted there; with its ca.crt, only scrapers holding a certificate
# from that CA are served.
tls="${VPPMESH_METRICS_TLS_DIR:-/etc/vppmesh/metrics-tls}"
if [ -s "$tls/tls.crt" ]; then
  set -- "$@" --metrics-tls-cert "$tls/tls.crt" --metrics-tls-key "$tls/tls.key"
  if [ -s "$tls/ca.crt" ]; then
    set -- "$@" --metrics-client-ca "$tls/ca.crt"
  fi
fi
# --cni-state-dir: pods come back by themselves after a VPP restart (their CNI records);
# --metrics: Prometheus text format on the node's port 9477 (hostNetwork).
exec vppmesh up --watch --mesh "$mesh" --node "$node" --key "$key" \
  --api-socket /run/vpp/api.sock --state-dir /var/lib/vppmesh \
  --cni-state-dir /var/lib/cni/vppmesh --metrics "${VPPMESH_METRICS:-:9477}" "$@"
