"""What a node's VPP and Linux side should hold (desired) or do hold (observed).

The same models describe both, so reconcile() is a plain comparison. Identifiers of the
objects vppmesh owns are derived from node numbers, tunnel indexes and epochs: they live
in reserved ranges, which is how reconcile() tells its own objects from an operator's
without any local bookkeeping, and they survive restarts of the agent and of VPP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, SecretBytes

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# IPIP interfaces are named ipip<instance>; ours are ipip1PPPPPTT (P = peer node number,
# T = tunnel index), e.g. ipip100000302 is tunnel 2 towards node 3.
TUNNEL_INSTANCE_BASE = 100_000_000
TUNNEL_INSTANCE_END = 200_000_000
TUNNEL_SLOTS = 100  # tunnel instances reserved per peer
# SA ids: 0b010D_EEEE_PPPP_PPPP_PPPP_PPPP_TTTT_000A (D direction, E epoch mod 16, A the
# key was agreed over the agents' channel). An agreed key gets its own id, so installing
# it beside the static key of the same generation is a new SA and a hitless protection
# update, never a replacement in place (which takes the tunnel down for a moment).
SA_ID_BASE = 0x4000_0000
SA_ID_MASK = 0xE000_0000
SA_DIRECTION_BIT = 1 << 28
SA_AGREED_BIT = 1
T = TypeVar("T")
TAG_PREFIX = "vppmesh:"
GATEWAY_TAG = TAG_PREFIX + "gateway"
HOST_TAG = TAG_PREFIX + "host"
# The address pods and the host use as their next hop into VPP; link-local, so it is the
# same on every node and never routed.
GATEWAY_ADDRESS = ipaddress.IPv4Interface("169.254.0.1/32")


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def tunnel_instance(peer_number: int, tunnel: int) -> int:
    return TUNNEL_INSTANCE_BASE + peer_number * TUNNEL_SLOTS + tunnel


def is_owned_tunnel_instance(instance: int) -> bool:
    return TUNNEL_INSTANCE_BASE <= instance < TUNNEL_INSTANCE_END


def split_tunnel_instance(instance: int) -> tuple[int, int]:
    """(peer node number, tunnel index) of one of our tunnel instances."""
    return divmod(instance - TUNNEL_INSTANCE_BASE, TUNNEL_SLOTS)


def sa_id_for(direction: Literal["in", "out"], peer_number: int, tunnel: int, epoch: int,
              agreed: bool = False) -> int:
    dir_bit = SA_DIRECTION_BIT if direction == "out" else 0
    return SA_ID_BASE | dir_bit | (epoch & 0xF) << 24 | peer_number << 8 | tunnel << 4 | (
        SA_AGREED_BIT if agreed else 0)


def find_sa(sas: Mapping[int, T], direction: Literal["in", "out"], peer_number: int,
            tunnel: int, epoch: int) -> T | None:
    """The SA of one direction, tunnel and generation in `sas` (by id): agreed or not."""
    plain = sa_id_for(direction, peer_number, tunnel, epoch)
    found = sas.get(plain | SA_AGREED_BIT)
    return found if found is not None else sas.get(plain)


def sa_peer(sa_id: int) -> int:
    """The peer node number one of our SA ids belongs to."""
    return (sa_id >> 8) & 0xFFFF


def is_owned_sa_id(sa_id: int) -> bool:
    return sa_id & SA_ID_MASK == SA_ID_BASE


class SaSpec(Frozen):
    """One ESP SA (AES-GCM-256, ESN, anti-replay), used by one tunnel in one direction."""

    sa_id: int
    spi: int
    key: SecretBytes
    salt: int
    anti_replay_window: int
    worker: int | None = None
    # ESP in UDP (RFC 3948), outbound SAs only: the ports of what we send. Inbound SAs
    # never carry it: tunnel protection takes UDP/4500 to ESP input whatever the SA says,
    # and an inbound SA left alone when a pair's encapsulation changes keeps its
    # anti-replay window.
    udp_encap: bool = False
    udp_src_port: int = 4500
    udp_dst_port: int = 4500

    @property
    def direction(self) -> Literal["in", "out"]:
        return "out" if self.sa_id & SA_DIRECTION_BIT else "in"

    @property
    def peer_number(self) -> int:
        return sa_peer(self.sa_id)

    @property
    def tunnel(self) -> int:
        return (self.sa_id >> 4) & 0xF

    @property
    def epoch_bits(self) -> int:
        return (self.sa_id >> 24) & 0xF

    def same_content(self, other: SaSpec) -> bool:
        """Equal in everything VPP stores, the key included (worker binding aside)."""
        return (
            self.spi == other.spi
            and self.key.get_secret_value() == other.key.get_secret_value()
            and self.salt == other.salt
            and self.anti_replay_window == other.anti_replay_window
            and self.udp_encap == other.udp_encap
            and (not self.udp_encap or (self.udp_src_port, self.udp_dst_port)
                 == (other.udp_src_port, other.udp_dst_port))
        )


class TunnelSpec(Frozen):
    """An IPIP tunnel from one local underlay address to one peer address, ESP-protected."""

    instance: int
    src: IPAddress
    dst: IPAddress
    sa_out: int
    sa_in: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"ipip{self.instance}"

    @property
    def peer_number(self) -> int:
        return split_tunnel_instance(self.instance)[0]

    @property
    def index(self) -> int:
        return split_tunnel_instance(self.instance)[1]


class RouteSpec(Frozen):
    """A peer's pod CIDR, spread (ECMP) over that peer's tunnels."""

    prefix: ipaddress.IPv4Network
    tunnels: tuple[int, ...]


class HostLinkSpec(Frozen):
    """How the host (or a pod) reaches VPP: a tap v2, or a veth attached with af_packet."""

    kind: Literal["tap", "af_packet"]
    tag: str
    linux_ifname: str
    vpp_ifname: str
    address: ipaddress.IPv4Interface
    linux_mac: str
    vpp_mac: str
    netns: str | None
    routes: tuple[ipaddress.IPv4Network, ...]
    queues: int = 1
    # Large segments (TSO/GSO) across the link; off, the kernel segments before VPP.
    offloads: bool = False
    # A tap whose Linux end outlives VPP (pods): a restarted VPP attaches to it again.
    persist: bool = False
    # Prefixes the mesh VRF sends to this endpoint's Linux side. The host link takes the
    # default route: pods reach their node, its Services, DNS and the outside through
    # the host, as under any CNI; the mesh's own prefixes stay more specific.
    vpp_routes: tuple[ipaddress.IPv4Network, ...] = ()


def node_mac(node_number: int, role: int) -> str:
    """A stable locally administered MAC, so links keep their MACs across restarts."""
    octets = [0x02, 0xFE, node_number >> 8, node_number & 0xFF, role >> 8, role & 0xFF]
    return ":".join(f"{o:02x}" for o in octets)


class DesiredState(Frozen):
    """Everything one node's VPP and Linux side hold for the mesh."""

    node: str
    table_id: int
    mtu: int
    gso: bool
    uplink: str | None
    uplink_addresses: tuple[IPInterface, ...]
    sas: tuple[SaSpec, ...]
    tunnels: tuple[TunnelSpec, ...]
    routes: tuple[RouteSpec, ...]
    host: HostLinkSpec | None
    # Prefixes the mesh VRF drops (the node's own pod CIDR: what no pod's /32 matches).
    drop_routes: tuple[ipaddress.IPv4Network, ...] = ()
    # The gateway's second address, the channel's inside the tunnels (Node.channel_address).
    channel_address: ipaddress.IPv4Interface | None = None
