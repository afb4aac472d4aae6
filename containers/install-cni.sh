#!/bin/sh
# The DaemonSet's init container: install the CNI plugin on the node.
#
# /opt/cni/bin/vppmesh-cni is a small wrapper (cni-wrapper.sh) that runs the plugin inside
# the agent container, where Python, vppmesh and the mesh file are; host-local comes
# along if the node lacks it. The conflist, with this node's name, goes to
# /etc/cni/net.d. Files are written under a temporary name and renamed into place, so the
# runtime never sees half a file.
set -eu
share=/opt/vppmesh/share
bin_dir="${CNI_BIN_DIR:-/host/opt/cni/bin}"
conf_dir="${CNI_CONF_DIR:-/host/etc/cni/net.d}"
node="${NODE_NAME:?NODE_NAME must be set (downward API: spec.nodeName)}"
mkdir -p "$bin_dir" "$conf_dir"

cp "$share/cni-wrapper.sh" "$bin_dir/.vppmesh-cni.tmp"
chmod 0755 "$bin_dir/.vppmesh-cni.tmp"
mv -f "$bin_dir/.vppmesh-cni.tmp" "$bin_dir/vppmesh-cni"
if [ ! -x "$bin_dir/host-local" ]; then
  cp /usr/lib/cni/host-local "$bin_dir/.host-local.tmp"
  mv -f "$bin_dir/.host-local.tmp" "$bin_dir/host-local"
fi

sed "s/__NODE_NAME__/$node/" "$share/10-vppmesh.conflist" > "$conf_dir/.10-vppmesh.conflist.tmp"
mv -f "$conf_dir/.10-vppmesh.conflist.tmp" "$conf_dir/10-vppmesh.conflist"
echo "installed vppmesh-cni in $bin_dir and 10-vppmesh.conflist (node $node) in $conf_dir"
