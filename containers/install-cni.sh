#!/bin/sh
# The DaemonSet's init container: install the CNI plugin on the node; with `uninstall`
# (containers/k8s/uninstall/), take all of vppmesh off the node again.
#
# /opt/cni/bin/vppmesh-cni is a small wrapper (cni-wrapper.sh) that runs the plugin inside
# the agent container, where Python, vppmesh and the mesh file are; host-local comes
# along if the node lacks it (and goes again on uninstall). The conflist, with this
# node's name, goes to /etc/cni/net.d. Files are written under a temporary name and
# renamed into place, so the runtime never sees half a file.
set -eu
share=/opt/vppmesh/share
bin_dir="${CNI_BIN_DIR:-/host/opt/cni/bin}"
conf_dir="${CNI_CONF_DIR:-/host/etc/cni/net.d}"
ours="$bin_dir/.vppmesh-host-local"  # host-local was installed here, not by the node

if [ "${1:-install}" = uninstall ]; then
  # The conflist first: the runtime stops choosing vppmesh before the plugin goes. Then
  # the NIC back to the host as it was (VPP is gone), and the host's pod egress rules.
  rm -f "$conf_dir/10-vppmesh.conflist" "$bin_dir/vppmesh-cni"
  if [ -e "$ours" ]; then
    rm -f "$bin_dir/host-local" "$ours"
  fi
  vppmesh uplink restore --state-dir /var/lib/vppmesh
  nft delete table ip vppmesh 2>/dev/null || true
  rm -f /run/vppmesh/agent.pid
  echo "removed vppmesh-cni and 10-vppmesh.conflist; the node's uplink is the host's again"
  exit 0
fi

node="${NODE_NAME:?NODE_NAME must be set (downward API: spec.nodeName)}"
mkdir -p "$bin_dir" "$conf_dir"
cp "$share/cni-wrapper.sh" "$bin_dir/.vppmesh-cni.tmp"
chmod 0755 "$bin_dir/.vppmesh-cni.tmp"
mv -f "$bin_dir/.vppmesh-cni.tmp" "$bin_dir/vppmesh-cni"
if [ ! -x "$bin_dir/host-local" ]; then
  cp /usr/lib/cni/host-local "$bin_dir/.host-local.tmp"
  mv -f "$bin_dir/.host-local.tmp" "$bin_dir/host-local"
  touch "$ours"
fi

sed "s/__NODE_NAME__/$node/" "$share/10-vppmesh.conflist" > "$conf_dir/.10-vppmesh.conflist.tmp"
mv -f "$conf_dir/.10-vppmesh.conflist.tmp" "$conf_dir/10-vppmesh.conflist"
echo "installed vppmesh-cni in $bin_dir and 10-vppmesh.conflist (node $node) in $conf_dir"
