#!/bin/sh
# The DaemonSet's vpp container: render startup.conf from the configured profile, run VPP.
# small-node (the default) fits any node: 4K pages, no hugepages, main thread only.
set -eu
profile="${VPPMESH_PROFILE:-small-node}"
conf=/run/vppmesh/startup.conf
mkdir -p /run/vpp /run/vppmesh
vppmesh render-startup --profile "$profile" --runtime-dir /run/vpp --out "$conf"
exec vpp -c "$conf"
