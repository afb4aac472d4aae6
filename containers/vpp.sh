#!/bin/sh
# The DaemonSet's vpp container: render startup.conf from the configured profile, run VPP
# under `vppmesh vpp-run`, which gives the uplink NIC the agent took back to the host
# whenever VPP exits (a rolling update, an uninstall, a crash, an OOM kill): without it the
# node has no network while VPP is down, so it cannot pull the next pod's image nor reach
# the API server, and stays stranded. The saved NICs are in the node's state directory.
# small-node (the default) fits any node: 4K pages, no hugepages, main thread only.
# The profile is the ConfigMap's `vpp_profile` (a name: vpp-startup/ in the image), or,
# when the ConfigMap holds `vpp_profile.yaml` (mounted at VPPMESH_PROFILE_FILE), that
# profile: a PCI address, cores or hugepages change with the ConfigMap, not the image.
set -eu
profile="${VPPMESH_PROFILE:-small-node}"
if [ -n "${VPPMESH_PROFILE_FILE:-}" ] && [ -s "$VPPMESH_PROFILE_FILE" ]; then
  echo "VPP profile from the ConfigMap's vpp_profile.yaml (vpp_profile: $profile is not used)"
  profile="$VPPMESH_PROFILE_FILE"
fi
runtime="${VPPMESH_VPP_RUNTIME_DIR:-/run/vpp}"
conf="${VPPMESH_STARTUP_CONF:-/run/vppmesh/startup.conf}"
mkdir -p "$runtime" "$(dirname "$conf")"
vppmesh render-startup --profile "$profile" --runtime-dir "$runtime" --out "$conf"
exec vppmesh vpp-run --state-dir "${VPPMESH_STATE_DIR:-/var/lib/vppmesh}" -- vpp -c "$conf"
