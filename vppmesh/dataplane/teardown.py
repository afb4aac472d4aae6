"""down: remove every object vppmesh owns from VPP, and nothing else.

Ownership comes from VPP itself (reserved tunnel instances and SA ids, `vppmesh:` tags,
the mesh table's name), so `down` works even without the mesh file that created the
objects. In the mesh table only routes whose paths are all vppmesh's go (and, given the
mesh file, the drop route of the node's pod CIDR: a drop route does not say whose it is,
so without the file it goes only with the table vppmesh created), and the table
itself only when vppmesh created it (VPP keeps the name it was created with) and nothing
else is left in it: an operator's routes or a table of their own stay. Routes go first
and tunnels are taken down before their protection is removed, so no packet is ever sent
unencrypted while the mesh is dismantled.
"""

from __future__ import annotations

import ipaddress

from vppmesh.dataplane.state import TAG_PREFIX, is_owned_sa_id, is_owned_tunnel_instance
from vppmesh.dataplane.vpp import host_interfaces, interfaces, ipip, ipsec, routes
from vppmesh.dataplane.vpp.client import VppApi


def teardown(api: VppApi, table_id: int | None,
             extra_uplink_addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                                           ...] = (),
             drop_routes: tuple[ipaddress.IPv4Network, ...] = ()) -> list[str]:
    """Remove the mesh from VPP; returns a line per removed (or knowingly kept) object.

    `table_id` None (no mesh file): the mesh table is the one named routes.TABLE_NAME.
    `drop_routes`: the planned ones (DesiredState.drop_routes), known from the mesh file.
    """
    removed: list[str] = []
    ifaces = interfaces.dump_interfaces(api)
    tunnels = [t for t in ipip.dump_tunnels(api) if is_owned_tunnel_instance(t.instance)]
    sas = [s.spec.sa_id for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)]
    names = routes.dump_table_names(api)
    if table_id is None:
        table_id = next((t for t, n in names.items() if n == routes.TABLE_NAME), None)
    table_exists = table_id is not None and table_id in names
    drop_table = False

    if table_id is not None and table_exists:
        mesh_routes, drops = routes.dump_table(api, table_id)
        # Endpoint /32 routes go explicitly too: left for the table's deletion, VPP 26.06
        # keeps them in the table's forwarding trie, and a mesh table created again
        # with the same id then drops traffic to the node's own host and pods.
        owned = {t.sw_if_index for t in tunnels} | {
            i.sw_if_index for i in ifaces if i.tag.startswith(TAG_PREFIX)}
        ours = [p for p, paths in mesh_routes.items() if set(paths) <= owned]
        others = len(mesh_routes) - len(ours)
        ours += [p for p in drop_routes if p in drops]
        api.call_many([routes.route(table_id, p, [], False) for p in ours])
        removed += [f"route {p}" for p in ours]
        drop_table = names[table_id] == routes.TABLE_NAME and not others
        if not drop_table:
            why = (f"{others} route(s) in it are not vppmesh's" if others
                   else f"vppmesh did not create it (it is {names[table_id]!r})")
            removed.append(f"kept table {table_id}: {why}")
    api.call_many([interfaces.set_admin(t.sw_if_index, False, f"ipip{t.instance}")
                   for t in tunnels])
    protected = ipsec.dump_protections(api)
    api.call_many([ipsec.unprotect(t.sw_if_index, f"ipip{t.instance}")
                   for t in tunnels if t.sw_if_index in protected])
    api.call_many([ipip.del_tunnel(t.sw_if_index, f"ipip{t.instance}") for t in tunnels])
    removed += [f"tunnel ipip{t.instance}" for t in tunnels]
    api.call_many([ipsec.del_sa(s) for s in sas])
    removed += [f"sa {s:#x}" for s in sas]

    af_packet = {index: name for name, index in host_interfaces.dump_af_packet(api).items()}
    for iface in ifaces:
        if not iface.tag.startswith(TAG_PREFIX):
            continue
        api.call(interfaces.set_admin(iface.sw_if_index, False, iface.name))
        if iface.sw_if_index in af_packet:
            api.call(host_interfaces.delete_af_packet(af_packet[iface.sw_if_index]))
        elif iface.dev_type in host_interfaces.TAP_DEV_TYPES:
            api.call(host_interfaces.delete_tap(iface.sw_if_index))
        elif iface.dev_type == "Loopback":
            api.call(interfaces.delete_loopback(iface.sw_if_index, iface.name))
        removed.append(f"interface {iface.name} ({iface.tag})")
    if drop_table:
        api.call(routes.table(table_id, False))  # type: ignore[arg-type]
        removed.append(f"table {table_id}")

    if extra_uplink_addresses:
        holders = {}
        for iface in ifaces:
            if iface.tag.startswith(TAG_PREFIX) or iface.dev_type in ("IPIP", "local"):
                continue
            for addr in interfaces.dump_addresses(api, iface.sw_if_index):
                holders[addr] = iface.sw_if_index
        for addr in extra_uplink_addresses:
            if addr in holders:
                api.call(interfaces.address(holders[addr], addr, False))
                removed.append(f"address {addr}")
    return removed
