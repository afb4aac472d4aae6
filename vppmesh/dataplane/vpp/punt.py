"""VPP's punt socket: UDP packets for one local port go to a unix datagram socket.

This is how the agents' channel reaches the underlay from VPP's own addresses (the way
strongSwan's VPP integration carries IKE): VPP hands every UDP packet for the channel's
port, addressed to one of its addresses, to the agent's socket, and injects what the
agent writes to VPP's own punt socket (startup.conf `punt { socket ... }`) as if VPP
had originated it. One registration per address family.

ESP in UDP shares UDP 4500 with VPP's tunnel protection, which takes every packet for
that port (ipsec_tun_in.c). There, a packet whose first four bytes are zero (RFC 3948's
non-ESP marker: SPI 0) finds no tunnel and is punted with the exception reason
`ipsec4-spi-o-udp-0` / `ipsec6-spi-o-udp-0` (ipsec_punt.h); registering those reasons
gives the agent the channel's datagrams that cross a NAT on the ESP flow's own mapping.
A one-byte 0xFF datagram (an RFC 3948 NAT keepalive) is dropped by VPP before that,
counted as "NAT Keepalive".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vppmesh.dataplane.vpp.client import Request, VppApi

PUNT_TYPE_L4, PUNT_TYPE_EXCEPTION = 0, 2
IP_PROTO_UDP = 17
AF_IP4, AF_IP6 = 0, 1
# The packet descriptor version the agent speaks (VPP's PUNT_PACKETDESC_VERSION).
HEADER_VERSION = 1
# VPP's sockaddr_un path limit: the API's pathname is a string[108].
MAX_PATH = 107


def _l4(port: int, ipv6: bool) -> dict[str, Any]:
    return {"type": PUNT_TYPE_L4, "punt": {"l4": {
        "af": AF_IP6 if ipv6 else AF_IP4, "protocol": IP_PROTO_UDP, "port": port}}}


def _what(port: int, ipv6: bool) -> str:
    return f"punt socket for UDP port {port} ({'IPv6' if ipv6 else 'IPv4'})"


def register(port: int, ipv6: bool, client_path: Path) -> Request:
    """Send UDP packets for `port` to the unix datagram socket at `client_path`.

    The reply's `pathname` is VPP's own punt socket, where the agent writes packets
    for VPP to send. Registering again for the same port replaces the path.
    """
    if len(str(client_path).encode()) > MAX_PATH:
        raise ValueError(f"punt socket path {client_path} is longer than {MAX_PATH} bytes; "
                         "use a shorter runtime directory")
    return Request("punt_socket_register", {
        "header_version": HEADER_VERSION, "punt": _l4(port, ipv6),
        "pathname": str(client_path)}, _what(port, ipv6))


# VPP's names of the exception reasons for SPI 0 in UDP (src/vnet/ipsec/ipsec_punt.h).
SPI_UDP_0 = {False: "ipsec4-spi-o-udp-0", True: "ipsec6-spi-o-udp-0"}


def reason_ids(api: VppApi) -> dict[str, int]:
    """Every exception punt reason VPP knows, by name (ids are VPP's, per process)."""
    return {str(d.reason.name): int(d.reason.id)
            for d in api.dump("punt_reason_dump", reason={"id": 0, "name": ""})}


def register_exception(reason_id: int, name: str, client_path: Path) -> Request:
    """Send packets VPP punts with exception reason `reason_id` (named `name`) to the
    unix datagram socket at `client_path`, in the same format as a UDP port's."""
    return Request("punt_socket_register", {
        "header_version": HEADER_VERSION,
        "punt": {"type": PUNT_TYPE_EXCEPTION, "punt": {"exception": {"id": reason_id}}},
        "pathname": str(client_path)}, f"punt socket for exception {name}")


def deregister(port: int, ipv6: bool) -> Request:
    return Request("punt_socket_deregister", {"punt": _l4(port, ipv6)}, _what(port, ipv6))


@dataclass(frozen=True)
class Registration:
    port: int
    ipv6: bool
    path: str


def registrations(api: VppApi) -> list[Registration]:
    """The UDP ports VPP punts to a socket, and where."""
    found = []
    for d in api.dump("punt_socket_dump", type=PUNT_TYPE_L4):
        l4 = d.punt.punt.l4
        found.append(Registration(int(l4.port), int(l4.af) == AF_IP6, str(d.pathname)))
    return found
