"""Indexes over the desired state, so a change is found and diffed per peer.

Every object vppmesh owns belongs to exactly one peer, and its identifier says which:
tunnel instances and SA ids are derived from the peer's node number. That makes the
identifier itself the index into what VPP holds (the observed dicts are keyed by it), and
grouping the desired state by peer lets a reconcile compare only the peers that changed.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vppmesh.state import (
    SA_DIRECTION_BIT,
    TUNNEL_INSTANCE_BASE,
    DesiredState,
    RouteSpec,
    SaSpec,
    TunnelSpec,
    sa_id_for,
    split_tunnel_instance,
    tunnel_instance,
)

TUNNEL_SLOTS = 100  # tunnel instances reserved per peer (ipip1PPPPPTT)
TUNNEL_INDEX_SLOTS = 16  # SA ids keep 4 bits of tunnel index
EPOCH_SLOTS = 16  # and 4 bits of epoch


def sa_peer(sa_id: int) -> int:
    return (sa_id >> 8) & 0xFFFF


def tunnel_peer(instance: int) -> int:
    return split_tunnel_instance(instance)[0]


def possible_tunnel_instances(peer: int) -> Iterator[int]:
    """Every tunnel instance that can belong to `peer` (the identifier is the index)."""
    return (tunnel_instance(peer, t) for t in range(TUNNEL_SLOTS))


def possible_sa_ids(peer: int) -> Iterator[int]:
    """Every SA id that can belong to `peer`: both directions, every tunnel and epoch."""
    inbound = sa_id_for("in", peer, 0, 0)
    for epoch in range(EPOCH_SLOTS):
        for tunnel in range(TUNNEL_INDEX_SLOTS):
            sa_id = inbound | epoch << 24 | tunnel << 4
            yield sa_id
            yield sa_id | SA_DIRECTION_BIT


_fields = operator.attrgetter("__dict__")


def same_objects(left: list[Any], right: list[Any]) -> bool:
    """Equal lists of models of one type: their field values (keys included) are equal.

    Comparing the field dicts (in C, through map) is several times cheaper than
    pydantic's own __eq__ per model; identical objects cost next to nothing.
    """
    return left is right or (
        len(left) == len(right) and list(map(_fields, left)) == list(map(_fields, right)))


@dataclass
class PeerSlice:
    """Everything the desired state holds towards one peer."""

    sas: list[SaSpec] = field(default_factory=list)
    tunnels: list[TunnelSpec] = field(default_factory=list)
    routes: list[RouteSpec] = field(default_factory=list)

    def same_as(self, other: PeerSlice) -> bool:
        return same_objects(self.tunnels, other.tunnels) and \
            same_objects(self.routes, other.routes) and same_objects(self.sas, other.sas)


class DesiredIndex:
    """The desired state grouped by peer in one pass; keyed by identifier on demand."""

    def __init__(self, desired: DesiredState) -> None:
        self.desired = desired
        peers: dict[int, PeerSlice] = {}
        get = peers.get
        for sa in desired.sas:
            peer = (sa.sa_id >> 8) & 0xFFFF  # sa_peer(), inlined: this loop is the hot one
            found = get(peer)
            if found is None:
                found = peers[peer] = PeerSlice()
            found.sas.append(sa)
        for tunnel in desired.tunnels:
            peer = (tunnel.instance - TUNNEL_INSTANCE_BASE) // TUNNEL_SLOTS
            found = get(peer)
            if found is None:
                found = peers[peer] = PeerSlice()
            found.tunnels.append(tunnel)
        for route in desired.routes:
            for peer in {tunnel_peer(i) for i in route.tunnels} or {0}:
                found = get(peer)
                if found is None:
                    found = peers[peer] = PeerSlice()
                found.routes.append(route)
        self.peers = peers

    @functools.cached_property
    def sas(self) -> dict[int, SaSpec]:
        return {s.sa_id: s for s in self.desired.sas}

    @functools.cached_property
    def tunnels(self) -> dict[int, TunnelSpec]:
        return {t.instance: t for t in self.desired.tunnels}

    @functools.cached_property
    def routes(self) -> dict[ipaddress.IPv4Network, RouteSpec]:
        return {r.prefix: r for r in self.desired.routes}

    def changed_peers(self, before: DesiredIndex) -> set[int]:
        """Peers whose objects differ between `before` and this index."""
        changed = set(self.peers.keys() ^ before.peers.keys())
        for peer, now in self.peers.items():
            was = before.peers.get(peer)
            if was is not None and not now.same_as(was):
                changed.add(peer)
        return changed

    def route_prefixes(self, peers: Iterable[int]) -> set[ipaddress.IPv4Network]:
        return {r.prefix for p in peers if p in self.peers for r in self.peers[p].routes}


def same_node_settings(a: DesiredState, b: DesiredState) -> bool:
    """Equal in everything VPP holds except the per-peer objects (DesiredIndex's part).

    The host link's route list names every peer's pod CIDR, but only the Linux side uses
    it; reconcile() ignores it, so a peer joining does not count as a node-wide change.
    """
    per_peer = {"sas", "tunnels", "routes", "host"}
    if a.host is None or b.host is None:
        same_host = a.host is b.host
    else:
        same_host = a.host.model_copy(update={"routes": ()}) == \
            b.host.model_copy(update={"routes": ()})
    return same_host and all(getattr(a, name) == getattr(b, name)
                             for name in type(a).model_fields if name not in per_peer)
