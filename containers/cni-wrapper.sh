#!/bin/sh
# vppmesh-cni as the container runtime finds it in /opt/cni/bin on the node.
#
# The plugin itself (Python, with vppmesh and the mesh file) lives in the vppmesh agent
# container. This wrapper enters that container's mount namespace only: network, PID and
# UTS stay the host's, exactly as for any CNI plugin, and the CNI_* variables and stdin
# pass through unchanged. Without a running agent it answers the spec's error 11 (try
# again later), so the runtime retries instead of failing the pod for good.
pid_file="${VPPMESH_AGENT_PID_FILE:-/run/vppmesh/agent.pid}"
plugin="${VPPMESH_CNI_BIN:-/opt/vppmesh/bin/vppmesh-cni}"
versions='["0.4.0","1.0.0","1.1.0"]'

pid=$(cat "$pid_file" 2>/dev/null || true)
case "$pid" in
  ''|*[!0-9]*) pid="" ;;
esac
if [ -n "$pid" ] && [ -e "/proc/$pid/ns/mnt" ]; then
  exec nsenter --target "$pid" --mount -- "$plugin"
fi

version=$(sed -n 's/.*"cniVersion"[[:space:]]*:[[:space:]]*"\([0-9.]*\)".*/\1/p' | head -n 1)
version="${version:-1.1.0}"
if [ "${CNI_COMMAND:-}" = VERSION ]; then
  printf '{"cniVersion":"%s","supportedVersions":%s}\n' "$version" "$versions"
  exit 0
fi
printf '{"cniVersion":"%s","code":11,"msg":"the vppmesh agent is not running on this node (no live process in %s)","details":"try again when the vppmesh-node pod is running"}\n' \
  "$version" "$pid_file"
exit 1
