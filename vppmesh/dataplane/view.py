"""One node's view of the mesh: what this node derives from the mesh and its own keys.

Everything per node and per peer that plan(), the key generations (keying.observe_keys)
and the host link need is computed here once per mesh version, and nowhere else: the
local node is looked up once, each peer's underlay path and X25519 pair secret are
computed once, and every SA key comes from `LocalView.sa_key`. Building the view is also
where the inputs are refused (a node that is not in the mesh, a private key that does
not match this node's public_key), so a bad input stops `up` before it touches the host
or VPP.

The view is immutable. A long-running agent keeps it while the mesh is unchanged, and
builds the next one from it (`previous`): a peer whose record is unchanged keeps its
path and pair secret, so one peer joining a mesh of a thousand costs one X25519
exchange, not a thousand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vppmesh.config import Mesh, MeshSettings, Node
from vppmesh.errors import KeyFileError
from vppmesh.host.underlay import PairPath, Shape, path, shape
from vppmesh.keying.keys import NodeSecrets, SaKey, derive_sa_key, pair_secret


@dataclass(frozen=True)
class PeerView:
    """One peer as this node sees it: its record, how to reach it, the pair's secret."""

    node: Node
    path: PairPath
    secret: bytes = field(repr=False)  # the X25519 pair secret: never in a repr or a log
    # plan()'s objects for this peer by their inputs (plan.py): they depend only on the
    # fields above and those inputs, so they live as long as the peer's view.
    planned: dict[tuple[object, ...], Any] = field(default_factory=dict, repr=False,
                                                   compare=False)
    # The record's shape (underlay.shape), for the pod MTU of the next mesh version.
    shape: Shape = field(init=False, repr=False, compare=False)
    # The record's name, a plain attribute: a run of a 1000-peer agent asks it tens of
    # thousands of times.
    name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", shape(self.node))
        object.__setattr__(self, "name", self.node.name)


@dataclass(frozen=True)
class AgreedKeys:
    """One peer's SA keys that are not the static schedule's (generations agreed over
    the agents' channel: vppmesh/agent/secrecy.py), by (outbound, tunnel, generation).
    `revision` never repeats and changes whenever the keys do: plan() caches on it."""

    revision: int
    keys: Mapping[tuple[bool, int, int], SaKey] = field(repr=False)


@dataclass(frozen=True)
class LocalView:
    """The mesh as one node sees it, computed once per mesh version (see the module)."""

    mesh: Mesh
    node: Node  # this node
    pod_mtu: int
    peers: tuple[PeerView, ...]  # by node number
    secrets: NodeSecrets = field(repr=False)
    by_name: Mapping[str, PeerView] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def settings(self) -> MeshSettings:
        return self.mesh.settings

    def peer(self, name: str) -> PeerView:
        return self.by_name[name]

    def sa_key(self, peer: PeerView, *, outbound: bool, tunnel: int, epoch: int) -> SaKey:
        """The static schedule's key of one SA between this node and `peer` (outbound:
        this node sends), under the static PSK (NodeSecrets.static_psk)."""
        sender, receiver = (self.name, peer.name) if outbound else (peer.name, self.name)
        return derive_sa_key(peer.secret, self.secrets.static_psk, sender=sender,
                             receiver=receiver, tunnel=tunnel, epoch=epoch)


def build_view(mesh: Mesh, node: str | Node, secrets: NodeSecrets, *,
               previous: LocalView | None = None, key_file: Path | None = None,
               mesh_source: str | None = None) -> LocalView:
    """The view of `node` (a name, or the node already looked up in `mesh`); refuses an
    unknown node and a key that is not its key.

    `key_file` and `mesh_source` only name the inputs in the error. With `previous` (the
    view of an earlier mesh version), unchanged peers keep their path and pair secret.
    """
    # A name not in the mesh fails here, naming the nodes that are.
    local = mesh.node(node) if isinstance(node, str) else node
    name = local.name
    # During a key rotation the mesh file may name the previous key still (step 2 has
    # not reached this node's copy): the static schedule's pair secrets take that key,
    # the one the mesh's other copies name too until they move.
    own_key = secrets.key_for(local.public_key)
    if own_key is None:
        key = f"the private key in {key_file}" if key_file else "this node's private key"
        where = f" in {mesh_source}" if mesh_source else ""
        raise KeyFileError(
            f"{key} does not match the public_key of node {name}{where}; publish "
            "`vppmesh pubkey` output there (after `keygen --rotate`, before removing "
            "KEY.previous)")
    count = mesh.settings.tunnels_per_peer
    # A path depends on both records and the tunnel count, a pair secret on the two
    # public keys only (this node's private key is its public_key, checked above); the
    # peer's planned objects on both records, the settings and the PSK as well.
    known: Mapping[str, PeerView] = previous.by_name if previous is not None else {}
    same_local = previous is not None and previous.node == local and \
        previous.settings == mesh.settings and \
        previous.secrets.static_psk == secrets.static_psk
    same_key = previous is not None and previous.node.public_key == local.public_key
    peers = []
    for node in sorted(mesh.nodes, key=lambda n: n.node_number):
        if node.name == name:
            continue
        old = known.get(node.name)
        if old is not None and same_local and (old.node is node or old.node == node):
            peers.append(old)
            continue
        if old is not None and same_key and old.node.public_key == node.public_key:
            secret = old.secret
        else:
            secret = pair_secret(secrets, node.public_key_bytes, own_key)
        peers.append(PeerView(node=node, path=path(local, node, count), secret=secret))
    # The pod MTU from the peers' shapes, kept with their views: a mesh of a thousand
    # nodes would take every node's shape again for every version.
    pod_mtu = mesh.pod_mtu([shape(local), *(p.shape for p in peers)],
                           [local, *(p.node for p in peers)])
    return LocalView(mesh=mesh, node=local, pod_mtu=pod_mtu, peers=tuple(peers),
                     secrets=secrets, by_name=MappingProxyType({p.name: p for p in peers}))
