#!/bin/sh
# This node's entry for the mesh file: its name and public key (nothing secret). Run in
# every vppmesh-node pod at once with the loop in docs/kubernetes.md.
set -eu
echo "${NODE_NAME:?NODE_NAME must be set} $(vppmesh pubkey --key /var/lib/vppmesh/private.key)"
