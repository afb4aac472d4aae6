#!/bin/sh
# The DaemonSet's vpp container: render startup.conf from the configured profile, run VPP.
set -eu
profile="${VPPMESH_PROFILE:-bare-metal-dpdk}"
conf=/run/vppmesh/startup.conf
mkdir -p /run/vpp /run/vppmesh
vppmesh render-startup --profile "$profile" --runtime-dir /run/vpp --out "$conf"
exec vpp -c "$conf"
