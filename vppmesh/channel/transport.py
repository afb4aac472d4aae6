"""The channel's datagrams through VPP's punt socket: in from, and out of, VPP's uplink.

Inbound, VPP writes every UDP packet for the channel's port that is addressed to one of
its own addresses to the agent's unix datagram socket, as `punt_packetdesc_t` (version
1: the receiving sw_if_index and an action, two host-order 32-bit words) followed by
the packet from its L2 header on (src/vnet/ip/punt_node.c rewinds over IP, UDP and an
Ethernet header's 14 bytes). Outbound, the agent writes a descriptor with the action
PUNT_IP4_ROUTED or PUNT_IP6_ROUTED and a whole IP packet to VPP's punt socket; VPP
looks the destination up in the FIB of the descriptor's interface and sends it as its
own (locally originated: no TTL decrement, no checksum offload, so this module fills
in the IP and UDP checksums). The source address is VPP's node address, whether or not
the host owns it.

Towards a peer whose pair runs ESP in UDP, the channel shares the ESP flow's ports
(4500 to the peer's 4500, or to the port its NAT maps): each datagram starts with RFC
3948's non-ESP marker (four zero bytes, where ESP has its SPI), which makes the peer's
VPP punt it to its agent instead of decrypting it (vppmesh/dataplane/vpp/punt.py). So the channel
crosses a NAT on exactly the mapping the ESP uses, and what the peer sees as its source
is where the ESP must go. On that flow the agent also sends RFC 3948 NAT keepalives
(one byte, 0xFF), which the peer's VPP drops and counts.

Everything a peer or an attacker controls is parsed without raising: a packet that is
not IPv4/IPv6 UDP is counted as malformed, one longer than any channel datagram as
oversized (the socket reads only a little more than that), and never reaches the
session.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vppmesh.channel.messages import MAX_DATAGRAM, Address, Drop
from vppmesh.host.underlay import NAT_T_PORT

PACKETDESC = struct.Struct("=Ii")  # sw_if_index, enum punt_action_e (host order, packed)
PUNT_L2, PUNT_IP4_ROUTED, PUNT_IP6_ROUTED = 0, 1, 2
L2_HEADER = 14  # what VPP rewinds over before writing (an Ethernet header on an uplink)
IPV4 = struct.Struct("!BBHHHBBH4s4s")
IPV6 = struct.Struct("!IHBB16s16s")
UDP = struct.Struct("!HHHH")
PROTO_UDP = 17
TTL = 64
NON_ESP_MARKER = bytes(4)  # RFC 3948: SPI 0 says "not ESP" on UDP 4500
NAT_KEEPALIVE = b"\xff"  # RFC 3948 section 2.3
# Read a little more than the largest channel datagram: anything longer is oversized,
# and the kernel's truncation flag says so without copying it.
READ_BYTES = (PACKETDESC.size + L2_HEADER + IPV6.size + UDP.size + len(NON_ESP_MARKER)
              + MAX_DATAGRAM + 1)
# Room for a burst of hostile datagrams while the agent is busy (SO_RCVBUFFORCE as root).
RECEIVE_BUFFER = 4 << 20
SO_RCVBUFFORCE = 33  # Linux's; Python's socket module does not name it


@dataclass(frozen=True)
class Punted:
    """One UDP datagram VPP received for the channel's port."""

    sw_if_index: int
    source: Address
    destination: Address
    payload: bytes


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp(source: Address, destination: Address, payload: bytes, pseudo: bytes) -> bytes:
    length = UDP.size + len(payload)
    header = UDP.pack(source[1], destination[1], length, 0)
    summed = checksum(pseudo + header + payload) or 0xFFFF  # 0 means "none" in IPv4
    return UDP.pack(source[1], destination[1], length, summed) + payload


def build_packet(source: Address, destination: Address, payload: bytes) -> bytes:
    """An IPv4 or IPv6 UDP packet with both checksums, as VPP will send it."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError(f"source {src} and destination {dst} are of different families")
    length = UDP.size + len(payload)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, PROTO_UDP, length)
        udp = _udp(source, destination, payload, pseudo)
        total = IPV4.size + len(udp)
        header = IPV4.pack(0x45, 0, total, 0, 0x4000, TTL, PROTO_UDP, 0, src.packed, dst.packed)
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return header + udp
    pseudo = src.packed + dst.packed + struct.pack("!IxxxB", length, PROTO_UDP)
    udp = _udp(source, destination, payload, pseudo)
    return IPV6.pack(6 << 28, len(udp), PROTO_UDP, TTL, src.packed, dst.packed) + udp


def build_routed(source: Address, destination: Address, payload: bytes,
                 sw_if_index: int = 0) -> bytes:
    """What the agent writes to VPP's punt socket to send `payload` from `source`.

    VPP routes it in the FIB of `sw_if_index` (0, local0, is in the default table).
    """
    packet = build_packet(source, destination, payload)
    action = PUNT_IP4_ROUTED if packet[0] >> 4 == 4 else PUNT_IP6_ROUTED
    return PACKETDESC.pack(sw_if_index, action) + packet


def parse_punted(data: bytes) -> Punted | Drop:
    """The UDP datagram in what VPP wrote to the agent's socket; never raises."""
    start = PACKETDESC.size + L2_HEADER
    if len(data) < start + 1:
        return Drop.TRUNCATED
    sw_if_index, _action = PACKETDESC.unpack_from(data)
    version = data[start] >> 4
    if version == 4:
        if len(data) < start + IPV4.size + UDP.size:
            return Drop.TRUNCATED
        ver_ihl, _, total, _, frag, _, proto, _, src, dst = IPV4.unpack_from(data, start)
        header = (ver_ihl & 0xF) * 4
        if header < IPV4.size or proto != PROTO_UDP or frag & 0x3FFF:
            return Drop.MALFORMED  # options are fine; fragments never carry the channel
        end = start + total
        udp_at = start + header
        source_ip, destination_ip = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    elif version == 6:
        if len(data) < start + IPV6.size + UDP.size:
            return Drop.TRUNCATED
        _, payload_length, next_header, _, src, dst = IPV6.unpack_from(data, start)
        if next_header != PROTO_UDP:
            return Drop.MALFORMED  # extension headers: not something the channel sends
        udp_at = start + IPV6.size
        end = udp_at + payload_length
        source_ip, destination_ip = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    else:
        return Drop.MALFORMED
    if end > len(data) or udp_at + UDP.size > end:
        return Drop.TRUNCATED
    sport, dport, udp_length, _ = UDP.unpack_from(data, udp_at)
    if udp_length < UDP.size or udp_at + udp_length > end:
        return Drop.MALFORMED
    payload = data[udp_at + UDP.size:udp_at + udp_length]
    if dport == NAT_T_PORT:  # on the ESP flow (punted as SPI 0): the marker, then ours
        if payload[:len(NON_ESP_MARKER)] != NON_ESP_MARKER:
            return Drop.MALFORMED
        payload = payload[len(NON_ESP_MARKER):]
    if len(payload) > MAX_DATAGRAM:
        return Drop.OVERSIZED
    return Punted(sw_if_index, (str(source_ip), sport), (str(destination_ip), dport), payload)


class PuntTransport:
    """The agent's end: a unix datagram socket VPP punts to, and VPP's socket to write to.

    `client_path` is where the agent binds (what punt_socket_register names);
    `vpp_path` is VPP's own punt socket (startup.conf `punt { socket }`, also in the
    registration's reply).
    """

    def __init__(self, client_path: Path, vpp_path: Path, *, sw_if_index: int = 0) -> None:
        self.client_path, self.vpp_path, self.sw_if_index = client_path, vpp_path, sw_if_index
        self.drops: Counter[Drop] = Counter()
        self.received = 0
        self.sent = 0
        self.send_errors = 0
        self.keepalives = 0
        client_path.unlink(missing_ok=True)  # a socket file left by an earlier agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            # VPP runs as root; nobody else writes to it. Created so (umask) rather than
            # only chmod-ed after bind: until the chmod the socket had the mode the
            # process's umask gave, writable by every local user under umask 0.
            previous = os.umask(0o177)
            try:
                sock.bind(str(client_path))
            finally:
                os.umask(previous)
            os.chmod(client_path, 0o600)
            try:  # past net.core.rmem_max, which root may do
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, limit: int = 256) -> list[Punted]:
        """Up to `limit` datagrams waiting now; what does not parse is counted here."""
        found: list[Punted] = []
        for _ in range(limit):
            try:
                data, _, flags, _ = self.sock.recvmsg(READ_BYTES)
            except BlockingIOError:
                break
            self.received += 1
            if flags & socket.MSG_TRUNC:
                self.drops[Drop.OVERSIZED] += 1
                continue
            parsed = parse_punted(data)
            if isinstance(parsed, Drop):
                self.drops[parsed] += 1
            else:
                found.append(parsed)
        return found

    def send(self, source: Address, destination: Address, payload: bytes,
             sw_if_index: int | None = None) -> None:
        """Have VPP send `payload` from `source` (its own address and the channel's port;
        from UDP 4500, behind the non-ESP marker), routed in the FIB of `sw_if_index`
        (None: the transport's, the underlay's; an interface of the mesh VRF sends it
        through the tunnels)."""
        if source[1] == NAT_T_PORT:
            payload = NON_ESP_MARKER + payload
        if self._write(source, destination, payload, sw_if_index):
            self.sent += 1

    def keepalive(self, source: Address, destination: Address) -> None:
        """An RFC 3948 NAT keepalive from `source` (VPP's address, UDP 4500)."""
        if self._write(source, destination, NAT_KEEPALIVE):
            self.keepalives += 1

    def _write(self, source: Address, destination: Address, payload: bytes,
               sw_if_index: int | None = None) -> bool:
        index = self.sw_if_index if sw_if_index is None else sw_if_index
        try:
            self.sock.sendto(build_routed(source, destination, payload, index),
                             str(self.vpp_path))
        except OSError:  # VPP gone (restarting) or its socket full: the channel retries
            self.send_errors += 1
            return False
        return True

    def close(self) -> None:
        self.sock.close()
        self.client_path.unlink(missing_ok=True)

    def __enter__(self) -> PuntTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
