"""Interfaces: dump, admin state, MTU, FIB table binding, unnumbered, tags, addresses."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vppmesh.dataplane.state import TAG_PREFIX
from vppmesh.dataplane.vpp.client import Request, VppApi

ADMIN_UP = 1
LINK_UP = 2
NO_INTERFACE = 0xFFFFFFFF
# VPP's "No such entry" family of retvals: a delete of something already gone is fine.
NOT_FOUND = (-2, -3, -6, -60, -65)


@dataclass(frozen=True)
class Interface:
    sw_if_index: int
    name: str
    tag: str
    admin_up: bool
    link_up: bool
    mtu: int
    mac: str
    dev_type: str


def dump_interfaces(api: VppApi) -> list[Interface]:
    return [_interface(d) for d in api.dump("sw_interface_dump", sw_if_index=NO_INTERFACE)]


def dump_interface(api: VppApi, sw_if_index: int) -> Interface | None:
    """One interface as it is now (None: there is none with that index)."""
    found = api.dump("sw_interface_dump", sw_if_index=sw_if_index)
    return _interface(found[0]) if found else None


def _interface(d: Any) -> Interface:
    return Interface(
        sw_if_index=d.sw_if_index,
        name=d.interface_name,
        tag=d.tag,
        admin_up=bool(d.flags & ADMIN_UP),
        link_up=bool(d.flags & LINK_UP),
        mtu=d.mtu[0],
        mac=str(d.l2_address),
        dev_type=d.interface_dev_type,
    )


def set_admin(sw_if_index: int, up: bool, what: str = "") -> Request:
    return Request("sw_interface_set_flags",
                   {"sw_if_index": sw_if_index, "flags": ADMIN_UP if up else 0}, what)


def set_mtu(sw_if_index: int, mtu: int, what: str = "") -> Request:
    """Set the L3 MTU (IPv4/IPv6 follow it), so VPP never sends larger packets."""
    return Request("sw_interface_set_mtu", {"sw_if_index": sw_if_index, "mtu": [mtu, 0, 0, 0]},
                   what)


def set_table(sw_if_index: int, table_id: int, what: str = "") -> Request:
    return Request("sw_interface_set_table",
                   {"sw_if_index": sw_if_index, "is_ipv6": False, "vrf_id": table_id}, what)


def set_unnumbered(sw_if_index: int, borrow_from: int, is_add: bool = True,
                   what: str = "") -> Request:
    return Request("sw_interface_set_unnumbered",
                   {"sw_if_index": borrow_from, "unnumbered_sw_if_index": sw_if_index,
                    "is_add": is_add}, what)


# vl_api_rx_mode_t
RX_MODE_POLLING = 1
RX_MODE_INTERRUPT = 2
RX_MODE_ADAPTIVE = 3


def set_rx_mode(sw_if_index: int, mode: int, what: str = "") -> Request:
    """The receive mode of every queue of an interface.

    A queue in polling mode keeps its thread spinning even when nothing arrives (VPP's
    threads sleep only when none of their queues polls: vlib/unix/input.c). Adaptive
    polls only while packets keep coming and waits on the queue's interrupt otherwise.
    """
    return Request("sw_interface_set_rx_mode",
                   {"sw_if_index": sw_if_index, "queue_id_valid": False, "queue_id": 0,
                    "mode": mode}, what)


def set_tag(sw_if_index: int, tag: str, what: str = "") -> Request:
    return Request("sw_interface_tag_add_del",
                   {"is_add": True, "sw_if_index": sw_if_index, "tag": tag}, what)


def address(sw_if_index: int, prefix: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
            is_add: bool, what: str = "") -> Request:
    return Request("sw_interface_add_del_address",
                   {"sw_if_index": sw_if_index, "is_add": is_add, "del_all": False,
                    "prefix": str(prefix)}, what or str(prefix),
                   tolerate=() if is_add else NOT_FOUND)


def dump_addresses(api: VppApi, sw_if_index: int
                   ) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    found: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for is_ipv6 in (False, True):
        for d in api.dump("ip_address_dump", sw_if_index=sw_if_index, is_ipv6=is_ipv6):
            found.append(ipaddress.ip_interface(str(d.prefix)))
    return found


NOT_AN_UPLINK = ("Loopback", "IPIP", "local")


Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def find_uplink(api: VppApi, name: str | None, primary: object,
                ifaces: Iterable[Interface] | None = None) -> tuple[Interface | None,
                                                                    list[Address]]:
    """The underlay uplink and its addresses: the interface called `name`, or else the
    first interface vppmesh did not create that holds the primary address."""
    for iface in dump_interfaces(api) if ifaces is None else ifaces:
        if name is not None:
            if iface.name == name:
                return iface, dump_addresses(api, iface.sw_if_index)
        elif iface.dev_type not in NOT_AN_UPLINK and not iface.tag.startswith(TAG_PREFIX):
            addresses = dump_addresses(api, iface.sw_if_index)
            if primary in addresses:
                return iface, addresses
    return None, []


def dump_unnumbered(api: VppApi) -> dict[int, int]:
    """{unnumbered interface: interface it borrows its address from}."""
    return {d.sw_if_index: d.ip_sw_if_index
            for d in api.dump("ip_unnumbered_dump", sw_if_index=NO_INTERFACE)}


def create_loopback(mac: str, what: str = "") -> Request:
    return Request("create_loopback_instance",
                   {"mac_address": mac, "is_specified": False, "user_instance": 0}, what)


def delete_loopback(sw_if_index: int, what: str = "") -> Request:
    return Request("delete_loopback", {"sw_if_index": sw_if_index}, what, tolerate=NOT_FOUND)


def gso_feature(sw_if_index: int, enable: bool, what: str = "") -> Request:
    """Software GSO on an interface's output: segment before the tunnel encrypts."""
    return Request("feature_gso_enable_disable",
                   {"sw_if_index": sw_if_index, "enable_disable": enable}, what)
