"""The Linux side of a host or pod link: the veth (or tap), its address, routes, neighbor.

The Linux end gets the mesh address as a /32 and reaches VPP through the link-local
gateway 169.254.0.1, whose MAC is pinned as a permanent neighbor: no ARP is needed in
either direction, and the routes point at the link, so they vanish with it.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NUD_PERMANENT

from vppmesh.dataplane.state import GATEWAY_ADDRESS, HostLinkSpec
from vppmesh.errors import HostError

RTNH_F_ONLINK = 4
VHOST_NET = Path("/dev/vhost-net")


def tap_supported() -> bool:
    """VPP's tap v2 needs vhost-net; without it the host link falls back to af_packet."""
    return VHOST_NET.exists() and os.access(VHOST_NET, os.R_OK | os.W_OK)


@contextmanager
def netlink(netns: str | None) -> Iterator[Any]:
    ipr = NetNS(netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def vpp_end_mac(vpp_mac: str) -> str:
    """The Linux MAC of a veth's VPP end: not the MAC VPP uses on it.

    VPP's af_packet interface sees every frame the veth receives; if the Linux end had
    VPP's MAC too, Linux would take the same frames as addressed to itself and, with IP
    forwarding on (every Kubernetes node), route a second copy of each through its own
    table: pods' packets looped between VPP and the host until their TTL ran out. With
    another MAC, Linux drops them as meant for another host. All of vppmesh's MACs start
    with 02; these start with 06 (also locally administered and unicast)."""
    return "06" + vpp_mac[2:]


def ensure_veth(linux_ifname: str, vpp_ifname: str, *, linux_mac: str, vpp_mac: str,
                mtu: int, linux_netns: str | None = None) -> None:
    """A veth pair whose VPP end stays here and whose Linux end lives in `linux_netns`."""
    end_mac = vpp_end_mac(vpp_mac)
    with netlink(None) as ipr:
        if link_index(ipr, vpp_ifname) is None:
            # The Linux end is born under a temporary name: its final name (eth0 in a
            # pod) may well exist here already.
            temporary = linux_ifname if linux_netns is None else f"{vpp_ifname[:11]}-tmp"
            try:
                ipr.link("add", ifname=vpp_ifname, kind="veth", address=end_mac,
                         peer={"ifname": temporary, "address": linux_mac})
            except NetlinkError as exc:
                raise HostError(f"cannot create veth {vpp_ifname}/{linux_ifname}: {exc}") from None
            if linux_netns is not None:
                ipr.link("set", index=link_index(ipr, temporary), net_ns_fd=linux_netns)
                with netlink(linux_netns) as inner:
                    inner.link("set", index=link_index(inner, temporary), ifname=linux_ifname)
        vpp_index = link_index(ipr, vpp_ifname)
        # An existing end (made before this rule, or by hand) gets the MAC too.
        ipr.link("set", index=vpp_index, address=end_mac, mtu=mtu, state="up")


OFFLOAD_FEATURES = ("tso", "gso", "gro", "tx", "rx")


def netns_exec(netns: str | None) -> list[str]:
    """The command prefix that runs a program in `netns`: a name under /run/netns, or a
    path such as a CNI runtime's /proc/<pid>/ns/net (which `ip netns exec` cannot take)."""
    if not netns:
        return []
    if "/" in netns:
        return ["nsenter", f"--net={netns}", "--"]
    return ["ip", "netns", "exec", netns]


def set_offloads(ifname: str, netns: str | None, enable: bool) -> None:
    """Segmentation/checksum offloads of a veth end (ethtool; pyroute2 has no equivalent)."""
    if shutil.which("ethtool") is None:
        raise HostError("ethtool is needed to set veth offloads: apt-get install ethtool")
    args = [*netns_exec(netns), "ethtool", "-K", ifname]
    for feature in OFFLOAD_FEATURES:
        args += [feature, "on" if enable else "off"]
    # ethtool exits non-zero when a feature is fixed for the device; the rest still apply.
    subprocess.run(args, capture_output=True, check=False)


def configure_linux_side(spec: HostLinkSpec, mtu: int, *, default_route: bool = False) -> None:
    """Address, MTU, gateway neighbor and routes on the Linux end; stale routes removed."""
    gateway = str(GATEWAY_ADDRESS.ip)
    with netlink(spec.netns) as ipr:
        index = link_index(ipr, spec.linux_ifname)
        if index is None:
            raise HostError(f"interface {spec.linux_ifname} not found in "
                            f"{'netns ' + spec.netns if spec.netns else 'the host namespace'}")
        link = ipr.get_links(index)[0]
        if link.get_attr("IFLA_ADDRESS") != spec.linux_mac:
            # The end outlived its MAC: the node's number changed (it left the mesh and
            # joined again) and VPP's neighbor entry for it now says another MAC, so
            # every frame VPP sends it would be dropped as meant for another host.
            ipr.link("set", index=index, address=spec.linux_mac)
        ipr.link("set", index=index, mtu=mtu, state="up")
        if spec.kind == "af_packet":
            set_offloads(spec.linux_ifname, spec.netns, spec.offloads)
            set_offloads(spec.vpp_ifname, None, spec.offloads)
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
        if (str(spec.address.ip), 32) not in have:
            ipr.addr("add", index=index, address=str(spec.address.ip), prefixlen=32)
        ipr.neigh("replace", dst=gateway, lladdr=spec.vpp_mac, ifindex=index,
                  state=NUD_PERMANENT)
        wanted = [ipaddress.IPv4Network(n) for n in spec.routes]
        if default_route:
            wanted.append(ipaddress.IPv4Network("0.0.0.0/0"))
        for net in wanted:
            ipr.route("replace", dst=str(net), gateway=gateway, oif=index,
                      flags=RTNH_F_ONLINK, prefsrc=str(spec.address.ip))
        wanted_set = {str(n) for n in wanted}
        for route in ipr.get_routes(family=2, oif=index):
            dst = route.get_attr("RTA_DST")
            if dst is None or route.get_attr("RTA_GATEWAY") != gateway:
                continue
            if f"{dst}/{route['dst_len']}" not in wanted_set:
                ipr.route("del", dst=f"{dst}/{route['dst_len']}", oif=index)


def remove_link(ifname: str, netns: str | None = None) -> bool:
    """Delete a link (its veth peer and routes go with it); False if it was not there."""
    with netlink(netns) as ipr:
        index = link_index(ipr, ifname)
        if index is None:
            return False
        ipr.link("del", index=index)
        return True


def link_exists(ifname: str, netns: str | None = None) -> bool:
    with netlink(netns) as ipr:
        return link_index(ipr, ifname) is not None


def linux_side_problems(spec: HostLinkSpec, mtu: int, *, default_route: bool) -> list[str]:
    """What differs from configure_linux_side()'s result (empty when all is in place)."""
    where = f"netns {spec.netns}" if spec.netns else "the host namespace"
    if spec.netns and "/" in spec.netns and not Path(spec.netns).exists():
        return [f"{where} does not exist"]
    gateway = str(GATEWAY_ADDRESS.ip)
    problems = []
    with netlink(spec.netns) as ipr:
        index = link_index(ipr, spec.linux_ifname)
        if index is None:
            return [f"interface {spec.linux_ifname} is missing in {where}"]
        link = ipr.get_links(index)[0]
        if link.get_attr("IFLA_MTU") != mtu:
            problems.append(f"{spec.linux_ifname} has MTU {link.get_attr('IFLA_MTU')}, "
                            f"not {mtu}")
        if link.get_attr("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
            problems.append(f"{spec.linux_ifname} is not up")
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
        if (str(spec.address.ip), 32) not in have:
            problems.append(f"{spec.linux_ifname} lacks address {spec.address.ip}/32")
        neighbors = {n.get_attr("NDA_DST"): n.get_attr("NDA_LLADDR")
                     for n in ipr.get_neighbours(ifindex=index)}
        if neighbors.get(gateway) != spec.vpp_mac:
            problems.append(f"no permanent neighbor {gateway} -> {spec.vpp_mac}")
        routes = {(r.get_attr("RTA_DST") or "0.0.0.0", r["dst_len"], r.get_attr("RTA_GATEWAY"))
                  for r in ipr.get_routes(family=2, oif=index)}
        wanted = [(str(n.network_address), n.prefixlen) for n in spec.routes]
        if default_route:
            wanted.append(("0.0.0.0", 0))
        problems += [f"route {dst}/{length} via {gateway} is missing"
                     for dst, length in wanted if (dst, length, gateway) not in routes]
    return problems
