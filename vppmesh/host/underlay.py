"""How two nodes reach each other: the underlay family, tunnel endpoints, ESP in UDP.

Both ends of a pair compute the same answer from the same two node records, with no
negotiation, so these are pure functions of the records (config.Node) and nothing else.
The mesh file's validation, plan(), verify and status all use them.

- Family: a node may hold IPv4 and IPv6 underlay addresses. A pair uses the family of
  both primaries when they agree and both have it, else the one family they share; with
  both shared and primaries disagreeing, IPv6. A pair sharing no family cannot exist
  (the mesh file is refused).
- Endpoints: tunnel i runs from the local node's i-th address of that family to the
  peer's i-th address, except around a node behind NAT (`nat.public` of that family):
  every tunnel towards it ends at its public address, which is what its packets carry as
  source once they are out of its NAT, and every tunnel from it starts at its first
  address of that family, the one its NAT forwards to. (Its tunnels still differ by the
  peer's addresses; started from several inside addresses, their flows would meet in
  the NAT on one public address and port and collide.)
- ESP in UDP: when either node of a pair asks for it (`udp_encap`, implied by `nat`),
  both directions of every tunnel of the pair carry ESP in UDP (RFC 3948), from port
  4500 to 4500, or to the port the peer's NAT forwards to its port 4500.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vppmesh.dataplane.overhead import max_overhead

if TYPE_CHECKING:
    from vppmesh.config import Node
    from vppmesh.dataplane.state import SaSpec

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# RFC 3948: the port VPP listens on for ESP in UDP (tunnel protection registers it).
NAT_T_PORT = 4500


@dataclass(frozen=True)
class PairPath:
    """How the local node sends to and hears from one peer."""

    family: int
    # (local source, peer destination) per tunnel index.
    endpoints: tuple[tuple[IPAddress, IPAddress], ...]
    udp_encap: bool
    # Destination port of our ESP-in-UDP packets: the peer's NAT's forwarded port.
    udp_dst_port: int
    # Per tunnel, where the peer's NAT maps that tunnel's flow, when an agent learned it
    # (secrecy.py: a NAT that changes the source port); empty: udp_dst_port for all.
    udp_dst_ports: tuple[int, ...] = ()

    @property
    def overhead(self) -> int:
        return max_overhead(ipv6_underlay=self.family == 6, udp_encap=self.udp_encap)

    def dst_port(self, tunnel: int) -> int:
        """Where tunnel `tunnel`'s ESP in UDP goes."""
        ports = self.udp_dst_ports
        return ports[tunnel] if tunnel < len(ports) else self.udp_dst_port

    def encapsulation(self, tunnel: int) -> tuple[bool, int | None]:
        """How our outbound SAs of `tunnel` must send: (ESP in UDP, destination port if so)."""
        return self.udp_encap, self.dst_port(tunnel) if self.udp_encap else None


def encapsulation(sa: SaSpec) -> tuple[bool, int | None]:
    """How an outbound SA sends, comparable with PairPath.encapsulation()."""
    return sa.udp_encap, sa.udp_dst_port if sa.udp_encap else None


def families(node: Node) -> frozenset[int]:
    return frozenset(a.version for a in node.underlay)


def addresses(node: Node, family: int) -> list[IPAddress]:
    """The node's own underlay addresses of one family, primary first."""
    return [a.ip for a in node.underlay if a.version == family]


def uses_udp(node: Node) -> bool:
    """Whether every SA towards and from this node is ESP in UDP."""
    return node.udp_encap or node.nat is not None


def pair_family(a: Node, b: Node) -> int | None:
    """The underlay family the pair uses (symmetric), None if they share none."""
    return choose_family(families(a), a.primary.version, families(b), b.primary.version)


def choose_family(fa: frozenset[int], pa: int, fb: frozenset[int], pb: int) -> int | None:
    shared = fa & fb
    if not shared:
        return None
    if pa == pb and pa in shared:
        return pa
    return max(shared)  # one shared family, or both with primaries disagreeing: IPv6


def behind_nat(node: Node, family: int) -> bool:
    """Whether the node's tunnels of this family cross its NAT."""
    return node.nat is not None and node.nat.public.version == family


def reach(node: Node, family: int, index: int) -> IPAddress:
    """The address others send tunnel `index` to: the NAT's public one if it has one."""
    if behind_nat(node, family):
        return node.nat.public  # type: ignore[union-attr]
    return addresses(node, family)[index]


def path(local: Node, peer: Node, count: int) -> PairPath:
    """Family, endpoints and encapsulation of the `count` tunnels from local to peer."""
    family = pair_family(local, peer)
    if family is None:  # the mesh validation refuses such a pair
        raise ValueError(f"nodes {local.name} and {peer.name} share no underlay family")
    own = addresses(local, family)
    if behind_nat(local, family):
        own = own[:1] * count
    endpoints = tuple((own[i], reach(peer, family, i)) for i in range(count))
    udp = uses_udp(local) or uses_udp(peer)
    port = peer.nat.port if peer.nat is not None else NAT_T_PORT
    return PairPath(family=family, endpoints=endpoints, udp_encap=udp, udp_dst_port=port)


Shape = tuple[frozenset[int], int, bool]  # families, the primary's, ESP in UDP


def shape(node: Node) -> Shape:
    """What pair_family and the overhead depend on: nodes of one shape behave alike."""
    return families(node), node.primary.version, uses_udp(node)


def shape_pairs(nodes: Iterable[Node], shapes: Iterable[Shape] | None = None,
                ) -> Iterator[tuple[Node, Node, int | None]]:
    """(a node, another node, the family their pair uses or None) once per pair of node
    shapes that occurs in the mesh: cheap on large meshes, since nodes of one shape pair
    alike. A shape pairs with itself only when two nodes have it. `shapes`: the nodes'
    shapes, when the caller has them already."""
    example: dict[Shape, Node] = {}
    count: dict[Shape, int] = {}
    nodes = list(nodes)
    for node, key in zip(nodes, shapes if shapes is not None else map(shape, nodes),
                         strict=True):
        example.setdefault(key, node)
        count[key] = count.get(key, 0) + 1
    shapes = list(example)
    for i, a in enumerate(shapes):
        for b in shapes[i:]:
            if a == b and count[a] < 2:
                continue
            yield example[a], example[b], choose_family(a[0], a[1], b[0], b[1])


def worst_overhead(nodes: Iterable[Node], shapes: Iterable[Shape] | None = None,
                   ) -> int | None:
    """The largest per-packet overhead of any pair of the mesh (None: no pair)."""
    worst = None
    for a, b, family in shape_pairs(nodes, shapes):
        if family is None:
            continue
        overhead = max_overhead(ipv6_underlay=family == 6,
                                udp_encap=uses_udp(a) or uses_udp(b))
        worst = overhead if worst is None else max(worst, overhead)
    return worst
