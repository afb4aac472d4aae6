"""IPIP tunnels (the transport under ESP): create with a fixed instance, delete, dump."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.dataplane.vpp.interfaces import NO_INTERFACE, NOT_FOUND

# At encap, copy the inner DSCP and ECN (so QoS and congestion signals survive the tunnel)
# and set DF on the outer header (an encrypted packet is never fragmented on the way).
ENCAP_SET_DF = 0x2
ENCAP_COPY_DSCP = 0x4
ENCAP_COPY_ECN = 0x8
DECAP_COPY_ECN = 0x10
TUNNEL_FLAGS = ENCAP_SET_DF | ENCAP_COPY_DSCP | ENCAP_COPY_ECN | DECAP_COPY_ECN
TUNNEL_MODE_P2P = 0


@dataclass(frozen=True)
class IpipTunnel:
    sw_if_index: int
    instance: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    table_id: int


def add_tunnel(instance: int, src: object, dst: object, underlay_table: int = 0) -> Request:
    return Request("ipip_add_tunnel", {"tunnel": {
        "instance": instance, "src": str(src), "dst": str(dst), "table_id": underlay_table,
        "flags": TUNNEL_FLAGS, "mode": TUNNEL_MODE_P2P, "dscp": 0,
    }}, f"ipip{instance}")


def del_tunnel(sw_if_index: int, what: str = "") -> Request:
    return Request("ipip_del_tunnel", {"sw_if_index": sw_if_index}, what, tolerate=NOT_FOUND)


def dump_tunnels(api: VppApi) -> list[IpipTunnel]:
    return [
        IpipTunnel(
            sw_if_index=d.tunnel.sw_if_index, instance=d.tunnel.instance,
            src=ipaddress.ip_address(str(d.tunnel.src)),
            dst=ipaddress.ip_address(str(d.tunnel.dst)), table_id=d.tunnel.table_id,
        )
        for d in api.dump("ipip_tunnel_dump", sw_if_index=NO_INTERFACE)
    ]
