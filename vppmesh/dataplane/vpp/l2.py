"""L2 bridge domains: how the host's uplink traffic crosses VPP untouched."""

from __future__ import annotations

from vppmesh.dataplane.vpp.client import Request
from vppmesh.dataplane.vpp.interfaces import NOT_FOUND

PORT_NORMAL = 0
PORT_BVI = 1


def bridge_domain(bd_id: int, is_add: bool, tag: str = "") -> Request:
    """A learning, flooding bridge domain (no ARP termination: the host answers its own)."""
    return Request("bridge_domain_add_del_v2", {
        "bd_id": bd_id, "flood": True, "uu_flood": True, "forward": True, "learn": True,
        "arp_term": False, "arp_ufwd": False, "mac_age": 0, "bd_tag": tag, "is_add": is_add,
    }, f"bridge domain {bd_id}", tolerate=() if is_add else NOT_FOUND)


def bridge_port(sw_if_index: int, bd_id: int, *, bvi: bool = False, enable: bool = True,
                what: str = "") -> Request:
    return Request("sw_interface_set_l2_bridge", {
        "rx_sw_if_index": sw_if_index, "bd_id": bd_id,
        "port_type": PORT_BVI if bvi else PORT_NORMAL, "shg": 0, "enable": enable,
    }, what or f"bridge port {sw_if_index}", tolerate=() if enable else NOT_FOUND)
