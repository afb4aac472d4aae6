#!/bin/sh
# The DaemonSet's agent container: keep this node in the mesh (`vppmesh up --watch`).
#
# The node's private key is made once, on the node's disk (hostPath /var/lib/vppmesh), and
# its public key is printed here: publish it in the mesh file (the ConfigMap). The process
# id goes to /run/vppmesh/agent.pid, where the host's vppmesh-cni wrapper finds this
# container (the pod runs with hostPID, so it is the host's id).
set -eu
key=/var/lib/vppmesh/private.key
mesh="${VPPMESH_MESH:-/etc/vppmesh/config/mesh.yaml}"
node="${NODE_NAME:?NODE_NAME must be set (downward API: spec.nodeName)}"
mkdir -p /var/lib/vppmesh /run/vppmesh /var/log/vppmesh
if [ ! -s "$key" ]; then
  echo "new node key; public key of $node: $(vppmesh keygen --key "$key")"
else
  echo "public key of $node: $(vppmesh pubkey --key "$key")"
fi
while [ ! -S /run/vpp/api.sock ]; do
  echo "waiting for VPP's API socket /run/vpp/api.sock"
  sleep 2
done
echo $$ > /run/vppmesh/agent.pid
# HTTPS for the metrics when a kubernetes.io/tls Secret (tls.crt, tls.key; e.g. from
# cert-manager) is mounted there; with its ca.crt, only scrapers holding a certificate
# from that CA are served.
set --
tls="${VPPMESH_METRICS_TLS_DIR:-/etc/vppmesh/metrics-tls}"
if [ -s "$tls/tls.crt" ]; then
  set -- --metrics-tls-cert "$tls/tls.crt" --metrics-tls-key "$tls/tls.key"
  if [ -s "$tls/ca.crt" ]; then
    set -- "$@" --metrics-client-ca "$tls/ca.crt"
  fi
fi
# --cni-state-dir: pods come back by themselves after a VPP restart (their CNI records);
# --metrics: Prometheus text format on the node's port 9477 (hostNetwork).
exec vppmesh up --watch --mesh "$mesh" --node "$node" --key "$key" \
  --api-socket /run/vpp/api.sock --state-dir /var/lib/vppmesh \
  --cni-state-dir /var/lib/cni/vppmesh --metrics "${VPPMESH_METRICS:-:9477}" "$@"
