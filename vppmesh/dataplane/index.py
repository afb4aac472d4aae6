"""Indexes over the desired state, so a change is found and diffed per peer.

Every object vppmesh owns belongs to exactly one peer, and its identifier says which:
tunnel instances and SA ids are derived from the peer's node number. That makes the
identifier itself the index into what VPP holds (the observed dicts are keyed by it), and
grouping the desired state by peer lets a reconcile compare only the peers that changed.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vppmesh.dataplane.state import (
    SA_DIRECTION_BIT,
    TUNNEL_SLOTS,
    DesiredState,
    RouteSpec,
    SaSpec,
    TunnelSpec,
    sa_id_for,
    sa_peer,
    split_tunnel_instance,
    tunnel_instance,
)

TUNNEL_INDEX_SLOTS = 16  # SA ids keep 4 bits of tunnel index
EPOCH_SLOTS = 16  # and 4 bits of epoch


def tunnel_peer(instance: int) -> int:
    return split_tunnel_instance(instance)[0]


def possible_tunnel_instances(peer: int) -> list[int]:
    """Every tunnel instance that can belong to `peer` (the identifier is the index)."""
    first = tunnel_instance(peer, 0)
    return [first + t for t in range(TUNNEL_SLOTS)]


# SA id bits other than the peer's: direction, epoch, tunnel index and whether the key
# was agreed, every combination.
_SA_ID_OFFSETS = tuple(
    sa_id_for("in", 0, tunnel, epoch, agreed) | direction
    for epoch in range(EPOCH_SLOTS) for tunnel in range(TUNNEL_INDEX_SLOTS)
    for direction in (0, SA_DIRECTION_BIT) for agreed in (False, True))


def possible_sa_ids(peer: int) -> list[int]:
    """Every SA id that can belong to `peer`: both directions, every tunnel and epoch,
    agreed keys or static."""
    base = sa_id_for("in", peer, 0, 0)
    return [base | offset for offset in _SA_ID_OFFSETS]


def _changed(now: dict[Any, Any], before: dict[Any, Any]) -> list[Any]:
    """Keys whose model differs (or exists on one side only), by field values.

    Comparing the models' field dicts is several times cheaper than pydantic's own
    __eq__; objects reused between two plans cost nothing at all.
    """
    changed = list(now.keys() ^ before.keys())
    get = before.get
    for key, model in now.items():
        old = get(key)
        if old is not None and old is not model and old.__dict__ != model.__dict__:
            changed.append(key)
    return changed


@dataclass(frozen=True)
class PeerObjects:
    """One peer's part of a desired state. plan() makes it once per peer and inputs and
    keeps it in the peer's view, so an unchanged peer's part is the very same object in
    the next plan."""

    sas: tuple[SaSpec, ...]
    tunnels: tuple[TunnelSpec, ...]
    route: RouteSpec

    def same(self, other: PeerObjects) -> bool:
        """Equal by field values (cheaper than pydantic's __eq__, see _changed)."""
        return self is other or (
            [s.__dict__ for s in self.sas] == [s.__dict__ for s in other.sas]
            and [t.__dict__ for t in self.tunnels] == [t.__dict__ for t in other.tunnels]
            and self.route.__dict__ == other.route.__dict__)


class DesiredIndex:
    """The desired state keyed by identifier, plus which peer owns each route.

    Building it is three dict comprehensions; comparing two indexes is one lookup and one
    field-dict comparison per object, and it says which peers changed. The objects of a
    peer are found again through the identifiers that can belong to it.

    Given plan()'s parts of the state by peer (`by_peer`), both are per peer instead:
    an unchanged peer's part is the same object, so comparing two plans costs one
    identity test per peer, and the per-object dicts are built only if a full compare
    asks for them.
    """

    def __init__(self, desired: DesiredState,
                 by_peer: Mapping[int, PeerObjects] | None = None) -> None:
        self.desired = desired
        self.by_peer = by_peer
        # Routes by the peer they lead to: ints hash in C, networks in Python.
        self.peer_routes: dict[int, list[RouteSpec]] = {}
        if by_peer is not None:
            self.peer_routes = {peer: [part.route] for peer, part in by_peer.items()}
            return
        for route in desired.routes:
            self.peer_routes.setdefault(route_peer(route), []).append(route)

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
        if self.by_peer is not None and before.by_peer is not None:
            now, was = self.by_peer, before.by_peer
            changed = set(now.keys() ^ was.keys())
            get = was.get
            for peer, part in now.items():
                old = get(peer)
                if old is not None and old is not part and not part.same(old):
                    changed.add(peer)
            return changed
        changed = {sa_peer(i) for i in _changed(self.sas, before.sas)}
        changed.update(tunnel_peer(i) for i in _changed(self.tunnels, before.tunnels))
        changed.update(self.peer_routes.keys() ^ before.peer_routes.keys())
        was = before.peer_routes
        for peer, routes in self.peer_routes.items():
            old = was.get(peer)
            if old is not None and old is not routes and \
                    [r.__dict__ for r in old] != [r.__dict__ for r in routes]:
                changed.add(peer)
        return changed

    def sas_of(self, peers: Iterable[int]) -> dict[int, SaSpec]:
        if self.by_peer is not None:
            return {s.sa_id: s for p in peers if p in self.by_peer for s in self.by_peer[p].sas}
        return {i: self.sas[i] for p in peers for i in possible_sa_ids(p) if i in self.sas}

    def tunnels_of(self, peers: Iterable[int]) -> dict[int, TunnelSpec]:
        if self.by_peer is not None:
            return {t.instance: t for p in peers if p in self.by_peer
                    for t in self.by_peer[p].tunnels}
        return {i: self.tunnels[i] for p in peers for i in possible_tunnel_instances(p)
                if i in self.tunnels}

    def routes_of(self, peers: Iterable[int]) -> dict[ipaddress.IPv4Network, RouteSpec]:
        return {r.prefix: r for p in peers for r in self.peer_routes.get(p, ())}


def route_peer(route: RouteSpec) -> int:
    """The peer a route leads to (all its paths are that peer's tunnels); 0 if none."""
    return tunnel_peer(route.tunnels[0]) if route.tunnels else 0


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
