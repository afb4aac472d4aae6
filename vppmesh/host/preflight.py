"""Checks made before vppmesh gives VPP an underlay address or takes the host's NIC.

VPP's underlay addresses must be VPP's own: on the uplink's wire VPP (its BVI, or the
interface it drives) and the host's Linux link sit side by side, so an address both hold
(the node's own InternalIP written as its underlay address, say) answers ARP and
neighbor discovery twice, and peers' packets land on whichever answered last. And VPP
sends underlay packets up to `settings.underlay_mtu`: above the uplink's MTU they are
dropped (or fragmented) on the first hop, which shows as pods whose large transfers hang.
Both are refused with what to change, before anything is touched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from pyroute2 import IPRoute

from vppmesh.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def host_addresses() -> dict[IPAddress, str]:
    """Every address on a Linux interface of this network namespace (the agent's), with
    the name of the interface holding it."""
    found: dict[IPAddress, str] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr():
            address = a.get_attr("IFA_ADDRESS")
            if address is None:
                continue
            found.setdefault(ipaddress.ip_address(address.split("%")[0]),
                             names.get(a["index"], f"ifindex {a['index']}"))
    return found


def refuse_host_addresses(vpp_addresses: Iterable[IPInterface], what: str,
                          host: Mapping[IPAddress, str] | None = None) -> None:
    """Refuse VPP underlay addresses that a Linux interface of this host holds too.

    `what` names where the address comes from (the mesh file's node, `--address`);
    `host` is {address: Linux interface} (default: this namespace's, host_addresses()).
    """
    held = host_addresses() if host is None else host
    for address in vpp_addresses:
        ifname = held.get(address.ip)
        if ifname is not None:
            raise ConfigError(
                f"{what}: underlay address {address.ip} is also the host's own, on Linux "
                f"interface {ifname}; VPP and the host would answer for it on the same "
                f"wire. Give VPP addresses of its own (free ones of {address.network}) as "
                f"its underlay addresses, and let the host keep {address.ip} on {ifname}")


def refuse_mtu_above(underlay_mtu: int, link_mtu: int, link: str, fix: str) -> None:
    """Refuse a settings.underlay_mtu above the MTU of the link the underlay leaves by
    (0: not known, nothing to compare)."""
    if 0 < link_mtu < underlay_mtu:
        raise ConfigError(
            f"settings.underlay_mtu={underlay_mtu} is above the MTU of {link} ({link_mtu}): "
            f"VPP's underlay packets would be dropped on the first hop. Lower "
            f"settings.underlay_mtu to {link_mtu} or less, or {fix}")
