#!/bin/sh
# The agent container's readiness: the agent process runs, VPP answers on its API, and
# this node is in the mesh (vppmesh-cni's STATUS: the mesh gateway is in VPP). A socket
# file alone proves nothing: a dead VPP's socket stays on the hostPath.
pid=$(cat "${VPPMESH_AGENT_PID_FILE:-/run/vppmesh/agent.pid}" 2>/dev/null || true)
case "$pid" in
  ''|*[!0-9]*) echo "no agent process id in /run/vppmesh/agent.pid"; exit 1 ;;
esac
if ! kill -0 "$pid" 2>/dev/null; then
  echo "the agent (process $pid) is not running"
  exit 1
fi
printf '{"cniVersion":"1.1.0","name":"vppmesh","type":"vppmesh-cni","apiSocket":"%s","mesh":"%s"}' \
  "${VPPMESH_API_SOCKET:-/run/vpp/api.sock}" "${VPPMESH_MESH:-/etc/vppmesh/config/mesh.yaml}" \
  | CNI_COMMAND=STATUS vppmesh-cni
