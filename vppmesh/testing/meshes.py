"""Meshes with real keys for tests: node k's key, addresses and pod CIDR follow from k."""

from __future__ import annotations

import hashlib
import ipaddress

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vppmesh.config import Mesh, MeshSettings, Node
from vppmesh.keying.keys import NodeSecrets, public_key_b64


def make_mesh(n: int, tunnels: int = 2, **settings: object) -> tuple[Mesh, dict[str, NodeSecrets]]:
    secrets: dict[str, NodeSecrets] = {}
    nodes = []
    for i in range(1, n + 1):
        key = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"node%d" % i).digest())
        name = f"node{i}"
        secrets[name] = NodeSecrets(private_key=key)
        base = int(ipaddress.IPv4Address("10.0.0.0")) + i * 16
        nodes.append(Node(
            name=name, node_number=i,
            underlay=[ipaddress.IPv4Interface(f"{ipaddress.IPv4Address(base + t + 1)}/12")
                      for t in range(tunnels)],
            pod_cidr=ipaddress.IPv4Network(f"10.{64 + i // 256}.{i % 256}.0/24"),
            public_key=public_key_b64(key),
        ))
    mesh = Mesh(settings=MeshSettings(tunnels_per_peer=tunnels, **settings),  # type: ignore[arg-type]
                nodes=nodes)
    return mesh, secrets
