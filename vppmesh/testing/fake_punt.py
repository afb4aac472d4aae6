"""The punt paths of fake VPPs joined: the underlay between agents in unit tests.

A real VPP reads what its agent writes to VPP's punt socket (startup.conf `punt { socket }`:
a `punt_packetdesc_t` with a ROUTED action, then a whole IP packet, as
vppmesh/channel/transport.build_routed makes it), routes the packet to the node owning its
destination address, and that node's VPP punts it to the socket its agent registered for
the UDP port (punt_socket_register), as the descriptor, the 14-byte L2 header and the
packet (what transport.parse_punted reads). `PuntRelay` does the same for FakeVpps: it
binds a unix datagram socket at each fake VPP's `punt_socket` path and, on `pump()`,
delivers every packet written there to the registered socket of the FakeVpp owning the
destination address (its `addresses`). Nothing is delivered that the destination's VPP
has no registration for, as with VPP. `punt()` writes any bytes straight to an agent's
socket (hostile datagrams), framed as VPP frames them.

Routing follows the descriptor's sw_if_index as VPP's does (punt_node.c: the lookup is in
that interface's FIB): routed from an interface of the default table, a datagram reaches
the node owning the destination among its default-table addresses (the underlay);
routed from one of the mesh VRF (the gateway loopback: the channel's tunnel path), it
reaches the node owning the destination among its mesh-VRF addresses, and only while
the sender's VPP holds an outbound SA whose twin (SPI and key) the receiver's VPP holds
inbound: the pair's tunnel carries it, encrypted. `Relayed.path` says which.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vppmesh.channel import transport as t
from vppmesh.dataplane.state import SA_DIRECTION_BIT
from vppmesh.dataplane.vpp.punt import AF_IP4, AF_IP6
from vppmesh.host.underlay import NAT_T_PORT
from vppmesh.testing.fake_vpp import FakeVpp

ETHERNET = bytes(12) + b"\x08\x00"  # what VPP rewinds over before it punts (14 bytes)
UPLINK_SW_IF_INDEX = 1  # the receiving interface the descriptor names


def punted(packet: bytes, sw_if_index: int = UPLINK_SW_IF_INDEX) -> bytes:
    """What VPP writes to an agent's socket for one received IP packet."""
    return t.PACKETDESC.pack(sw_if_index, t.PUNT_L2) + ETHERNET + packet


@dataclass(frozen=True)
class Relayed:
    """One datagram the relay carried: from one node's VPP to another's agent."""

    sender: str
    receiver: str
    payload: bytes  # the channel datagram (UDP payload)
    frame: bytes  # exactly what the receiving agent read
    path: str = "underlay"  # or "tunnel": inside the pair's IPsec tunnel


def is_nat_keepalive(packet: bytes) -> bool:
    """Whether an IP packet an agent wrote is an RFC 3948 NAT keepalive (one byte, 0xFF,
    in UDP over IPv4 or IPv6 without options)."""
    header = 20 if packet[:1] and packet[0] >> 4 == 4 else 40
    return len(packet) == header + 8 + len(t.NAT_KEEPALIVE) and \
        packet.endswith(t.NAT_KEEPALIVE)


class PuntRelay:
    """Fake VPPs, by node name, whose punt paths reach each other (see the module).

    `lose`: a test's filter; a datagram for which it returns True is not delivered.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.vpps: dict[str, FakeVpp] = {}
        self._sockets: dict[str, socket.socket] = {}
        self.relayed: list[Relayed] = []
        self.unrouted = 0  # no VPP owns the destination, or it has no registration
        self.no_tunnel = 0  # routed in the mesh VRF, but the pair's tunnel is not up
        self.refused = 0  # the agent's socket was gone or full
        self.nat_keepalives = 0  # RFC 3948 keepalives the receiving VPP dropped
        self.lose: Callable[[Relayed], bool] | None = None
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # VPP's end, sending
        self._out.setblocking(False)

    def attach(self, name: str, vpp: FakeVpp) -> FakeVpp:
        """`vpp` is node `name`'s VPP now (a first one, or one that restarted): its punt
        socket is configured and bound here."""
        path = self.directory / f"{name}-punt.sock"
        old = self._sockets.pop(name, None)
        if old is not None:
            old.close()
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        self._sockets[name] = sock
        vpp.punt_socket = str(path)
        self.vpps[name] = vpp
        return vpp

    def owner(self, address: str, table: int = 0) -> str | None:
        """The node whose VPP holds `address` on an interface of `table`."""
        ip = ipaddress.ip_address(address)
        for name, vpp in self.vpps.items():
            if any(ipaddress.ip_interface(a).ip == ip
                   for index, addresses in vpp.addresses.items()
                   if vpp.table_of.get(index, 0) == table for a in addresses):
                return name
        return None

    def tunnel_up(self, sender: str, receiver: str) -> bool:
        """The sender's VPP encrypts for the receiver's: an outbound SA of the one whose
        SPI and key an inbound SA of the other holds."""
        def held(vpp: FakeVpp, outbound: bool) -> set[tuple[int, bytes]]:
            return {(sa["entry"]["spi"], bytes(sa["entry"]["crypto_key"]["data"]))
                    for sa_id, sa in vpp.sas.items()
                    if bool(sa_id & SA_DIRECTION_BIT) == outbound}
        return bool(held(self.vpps[sender], True) & held(self.vpps[receiver], False))

    def agent_path(self, name: str, address: str, port: int) -> str | None:
        """Where node `name`'s VPP punts UDP `port` of `address`'s family (None: nowhere)."""
        af = AF_IP4 if ipaddress.ip_address(address).version == 4 else AF_IP6
        vpp = self.vpps[name]
        if port == NAT_T_PORT:  # the channel on the ESP flow: punted as SPI 0's exception
            return next(iter(vpp.punt_exceptions.values()), None)
        return vpp.punt_registrations.get((af, port))

    def pump(self) -> int:
        """Carry everything the agents wrote; returns how many datagrams arrived."""
        moved = 0
        for sender, sock in list(self._sockets.items()):
            while True:
                try:
                    written = sock.recv(65536)
                except BlockingIOError:
                    break
                sw_if_index, action = t.PACKETDESC.unpack_from(written)
                assert action in (t.PUNT_IP4_ROUTED, t.PUNT_IP6_ROUTED), action
                packet = written[t.PACKETDESC.size:]
                if is_nat_keepalive(packet):  # VPP drops it ("NAT Keepalive")
                    self.nat_keepalives += 1
                    continue
                frame = punted(packet)
                parsed = t.parse_punted(frame)
                assert isinstance(parsed, t.Punted), parsed  # the agent writes valid packets
                table = self.vpps[sender].table_of.get(sw_if_index, 0)
                receiver = self.owner(parsed.destination[0], table)
                path = None if receiver is None else self.agent_path(receiver,
                                                                     *parsed.destination)
                if receiver is None or path is None:
                    self.unrouted += 1
                    continue
                if table != 0 and not self.tunnel_up(sender, receiver):
                    self.no_tunnel += 1
                    continue
                relayed = Relayed(sender, receiver, parsed.payload, frame,
                                  "tunnel" if table != 0 else "underlay")
                self.relayed.append(relayed)
                if self.lose is not None and self.lose(relayed):
                    continue
                moved += self._deliver(path, frame)
        return moved

    def punt(self, name: str, frame: bytes) -> bool:
        """Write `frame` (already framed as VPP punts) to node `name`'s agent socket, as
        its VPP would; False when the socket is full (the agent must read first)."""
        vpp = self.vpps[name]
        path = next(iter(vpp.punt_registrations.values()))
        return bool(self._deliver(path, frame, count_refusal=False))

    def _deliver(self, path: str, frame: bytes, *, count_refusal: bool = True) -> int:
        try:
            self._out.sendto(frame, path)
        except (BlockingIOError, FileNotFoundError, ConnectionRefusedError):
            if count_refusal:
                self.refused += 1
            return 0
        return 1

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._out.close()
