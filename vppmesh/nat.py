"""Peers behind NAT: the ports their NATs map their tunnels' ESP to, as a view.

The agents' channel learns those ports (secrecy.Secrecy.learn); the generation file
keeps them (`nat_ports`), so a one-shot `up` and a restarted agent send there too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from vppmesh.view import PeerView

if TYPE_CHECKING:
    from vppmesh.keying.epochs import GenerationState
    from vppmesh.view import LocalView


def saved_ports(view: LocalView, state: GenerationState) -> dict[int, tuple[int, ...]]:
    """Per peer behind NAT (node number), the ports its NAT maps its tunnels' ESP to as
    an agent learned them (the generation file's `nat_ports`): a one-shot `up` sends
    there too."""
    count = view.settings.tunnels_per_peer
    found = {}
    for peer in view.peers:
        pg = state.peers.get(peer.name)
        if peer.path.udp_encap and peer.node.nat is not None and pg is not None and \
                len(pg.nat_ports) == count:
            found[peer.node.node_number] = tuple(pg.nat_ports)
    return found


def ported_view(view: LocalView, ports: Mapping[int, tuple[int, ...]],
                known: dict[int, tuple[PeerView, tuple[int, ...], PeerView]] | None = None,
                ) -> LocalView:
    """`view` whose path to each peer in `ports` (node number -> port per tunnel) sends
    its ESP in UDP to those ports; `known` keeps the peer views made before (plan()
    caches on them)."""
    if not ports:
        return view
    known = known if known is not None else {}
    peers = []
    for peer in view.peers:
        number = peer.node.node_number
        wanted = ports.get(number)
        if wanted is None or not peer.path.udp_encap:
            peers.append(peer)
            continue
        made = known.get(number)
        if made is None or made[0] is not peer or made[1] != wanted:
            made = (peer, wanted, PeerView(node=peer.node, secret=peer.secret,
                                           path=replace(peer.path, udp_dst_ports=wanted)))
            known[number] = made
        peers.append(made[2])
    return replace(view, peers=tuple(peers),
                   by_name=MappingProxyType({p.name: p for p in peers}))
