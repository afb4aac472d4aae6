#!/bin/sh
# The DaemonSet's vpp container: render startup.conf from the configured profile, run VPP.
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
exec vpp -c "$conf"
