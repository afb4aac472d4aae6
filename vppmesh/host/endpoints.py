"""Endpoints: the host and the pods of a node, each a link into the mesh VRF.

Every endpoint is an interface in VPP's mesh VRF, unnumbered to the gateway loopback,
with a static neighbor (its /32 route) for the Linux end; the Linux end carries the
endpoint's /32 and reaches VPP through the gateway. The host link, the testbed's pods
and CNI pods all attach this way.
"""

from __future__ import annotations

import ipaddress

from vppmesh.dataplane.state import GATEWAY_TAG, HostLinkSpec, node_mac
from vppmesh.dataplane.vpp import host_interfaces, interfaces, routes
from vppmesh.dataplane.vpp.client import VppApi
from vppmesh.dataplane.vpp.interfaces import Interface
from vppmesh.errors import VppMeshError
from vppmesh.host import link as linux

POD_TAG_PREFIX = "vppmesh:pod:"


class NotInMeshError(VppMeshError):
    """The node's VPP has no mesh yet (`vppmesh up` has not run): nothing to attach to."""


def attach_vpp(api: VppApi, spec: HostLinkSpec, *, table_id: int, mtu: int, gateway: int,
               existing: Interface | None) -> int:
    """Create (or finish) the VPP side of an endpoint; returns its sw_if_index."""
    if existing is None:
        if spec.kind == "af_packet":
            index = api.call(host_interfaces.create_af_packet(
                spec.vpp_ifname, spec.vpp_mac, spec.queues, spec.offloads)).sw_if_index
        else:
            # A persistent tap left by a VPP that died is taken over, with the addresses
            # and routes its Linux end still holds; otherwise the name must be free.
            leftover = spec.persist and linux.link_exists(spec.linux_ifname, spec.netns)
            index = api.call(host_interfaces.create_tap(
                spec.linux_ifname, spec.vpp_mac, spec.linux_mac, mtu, spec.queues,
                spec.netns, spec.tag, gso=spec.offloads, persist=spec.persist,
                attach=leftover)).sw_if_index
        # Also for taps, which were created with it: VPP 26.06 stores tap_create_v3's tag
        # without a terminating NUL (plugins/tap/tapv2_api.c:216-220,
        # vl_api_from_api_to_new_vec), and the interface dump then reads past it.
        api.call(interfaces.set_tag(index, spec.tag, spec.tag))
    else:
        index = existing.sw_if_index
    setup = []
    if existing is None and spec.kind == "tap":
        setup.append(host_interfaces.tap_rx_mode(index, spec.tag))
    # VPP refuses a new table once the interface has an (unnumbered) address: an
    # interface attached before keeps its table and gateway.
    if existing is None or interfaces.dump_unnumbered(api).get(index) != gateway:
        setup += [interfaces.set_table(index, table_id, spec.tag),
                  interfaces.set_unnumbered(index, gateway, True, spec.tag)]
    api.call_many([
        *setup,
        interfaces.set_mtu(index, mtu, spec.tag),
    ])
    # Up only once it is in the mesh VRF: a batch is sent whole, so this waits for it.
    api.call(interfaces.set_admin(index, True, spec.tag))
    set_neighbor(api, index, spec, table_id)
    return index


def set_neighbor(api: VppApi, index: int, spec: HostLinkSpec, table_id: int) -> None:
    """Static neighbor plus the endpoint's /32 route (and its vpp_routes) through it."""
    api.call_many([
        routes.neighbor(index, spec.address.ip, spec.linux_mac, True),
        *(routes.route(table_id, prefix, [index], True, nexthop=spec.address.ip)
          for prefix in (spec.address.network, *spec.vpp_routes)),
    ])


def find_tagged(api: VppApi, *tags: str) -> dict[str, Interface]:
    """The interfaces carrying these tags, from a single interface dump."""
    return {i.tag: i for i in interfaces.dump_interfaces(api) if i.tag in tags}


def attach(api: VppApi, spec: HostLinkSpec, *, table_id: int, mtu: int,
           default_route: bool = True) -> int:
    """Attach an endpoint end to end: Linux link, VPP interface, addresses and routes."""
    if spec.kind == "af_packet":
        linux.ensure_veth(spec.linux_ifname, spec.vpp_ifname, linux_mac=spec.linux_mac,
                          vpp_mac=spec.vpp_mac, mtu=mtu, linux_netns=spec.netns)
    found = find_tagged(api, GATEWAY_TAG, spec.tag)
    if GATEWAY_TAG not in found:
        raise NotInMeshError("this node is not in the mesh yet (no vppmesh gateway in VPP): run "
                           "`vppmesh up` first")
    index = attach_vpp(api, spec, table_id=table_id, mtu=mtu,
                       gateway=found[GATEWAY_TAG].sw_if_index, existing=found.get(spec.tag))
    linux.configure_linux_side(spec, mtu, default_route=default_route)
    return index


def detach(api: VppApi, spec: HostLinkSpec, table_id: int) -> bool:
    """Remove an endpoint from VPP and Linux; False if it was not attached."""
    found = find_tagged(api, spec.tag).get(spec.tag)
    if found is not None:
        api.call_many([
            routes.route(table_id, spec.address.network, [found.sw_if_index], False,
                         nexthop=spec.address.ip),
            routes.neighbor(found.sw_if_index, spec.address.ip, spec.linux_mac, False),
        ])
        api.call(interfaces.set_admin(found.sw_if_index, False, spec.tag))
        if spec.kind == "af_packet":
            api.call(host_interfaces.delete_af_packet(spec.vpp_ifname))
        else:
            api.call(host_interfaces.delete_tap(found.sw_if_index))
    if spec.kind == "af_packet":
        removed_link = linux.remove_link(spec.vpp_ifname)
    else:
        removed_link = remove_leftover_tap(spec)
    return found is not None or removed_link


def remove_leftover_tap(spec: HostLinkSpec) -> bool:
    """Delete the Linux end of a persistent tap whose VPP died (VPP's own delete of a
    tap removes it); False if there is none, or its namespace is gone already."""
    if spec.kind != "tap" or not spec.persist:
        return False
    if spec.netns is not None:
        from pathlib import Path

        if not Path(spec.netns if "/" in spec.netns else f"/run/netns/{spec.netns}").exists():
            return False
    return linux.remove_link(spec.linux_ifname, spec.netns)


def segmentation_offload(gso: bool, kind: str) -> bool:
    """Whether an endpoint of this kind carries large segments into VPP.

    Never af_packet: VPP 26.06's af_packet input flags an IPv4 GSO packet with the TCP
    checksum offload alone (plugins/af_packet/node.c, fill_cksum_offload), and the
    segmenter takes a missing IPv4-checksum flag to mean IPv6 (vnet/gso/gso.h,
    gso_fixup_segmented_buf): every segment keeps the inner IPv4 length of the whole
    packet and the peer drops it at esp4-decrypt-tun. Tap input sets both flags.
    """
    return gso and kind == "tap"


def pod_spec(*, name: str, netns: str, address: ipaddress.IPv4Address, node_number: int,
             pod_index: int, linux_ifname: str = "eth0", kind: str = "af_packet",
             queues: int = 1, offloads: bool = False,
             vpp_ifname: str | None = None) -> HostLinkSpec:
    """The endpoint of one pod; MACs are stable for the (node, pod index).

    `vpp_ifname` (the veth end VPP takes, at most 15 characters) defaults to vpm-<name>.
    """
    return HostLinkSpec(
        kind=kind,  # type: ignore[arg-type]
        tag=f"{POD_TAG_PREFIX}{name}",
        linux_ifname=linux_ifname,
        vpp_ifname=vpp_ifname or f"vpm-{name}"[:15],
        address=ipaddress.IPv4Interface(f"{address}/32"),
        linux_mac=node_mac(node_number, 0x200 + pod_index * 2),
        vpp_mac=node_mac(node_number, 0x201 + pod_index * 2),
        netns=netns,
        routes=(),
        queues=queues,
        offloads=segmentation_offload(offloads, kind),
        persist=kind == "tap",
    )


def vpp_side_problems(api: VppApi, spec: HostLinkSpec, *, table_id: int, mtu: int) -> list[str]:
    """What differs from attach_vpp()'s result in VPP (empty when all is in place)."""
    found = find_tagged(api, GATEWAY_TAG, spec.tag)
    if GATEWAY_TAG not in found:
        return ["VPP has no vppmesh gateway: the node is not in the mesh (`vppmesh up`)"]
    iface = found.get(spec.tag)
    if iface is None:
        return [f"VPP has no interface tagged {spec.tag}"]
    problems = []
    if not iface.admin_up:
        problems.append(f"{iface.name} is admin-down in VPP")
    if iface.mtu != mtu:
        problems.append(f"{iface.name} has MTU {iface.mtu} in VPP, not {mtu}")
    if interfaces.dump_unnumbered(api).get(iface.sw_if_index) != \
            found[GATEWAY_TAG].sw_if_index:
        problems.append(f"{iface.name} is not unnumbered to the gateway")
    if routes.dump_neighbors(api, iface.sw_if_index).get(spec.address.ip) != spec.linux_mac:
        problems.append(f"no static neighbor {spec.address.ip} -> {spec.linux_mac} in VPP")
    table_routes = routes.dump_routes(api, table_id) if table_id in routes.dump_tables(api) \
        else {}
    if table_routes.get(spec.address.network) != (iface.sw_if_index,):  # type: ignore[call-overload]
        problems.append(f"no route {spec.address.network} via {iface.name} in table {table_id}")
    return problems


def recover_spec(api: VppApi, spec: HostLinkSpec) -> HostLinkSpec | None:
    """The spec of an attachment found in VPP by its tag, with the address and MAC VPP
    holds: for undoing an attachment whose own record is lost. None if VPP has none."""
    iface = find_tagged(api, spec.tag).get(spec.tag)
    if iface is None:
        return None
    neighbors = routes.dump_neighbors(api, iface.sw_if_index)
    kind = host_interfaces.attachment_kind(iface.dev_type)
    update: dict[str, object] = {"kind": kind, "persist": kind == "tap"}
    if neighbors:
        ip, mac = next(iter(neighbors.items()))
        update |= {"address": ipaddress.IPv4Interface(f"{ip}/32"), "linux_mac": mac}
    return spec.model_copy(update=update)
