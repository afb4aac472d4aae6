"""The mesh FIB table, ECMP routes over tunnels, and static neighbors."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.dataplane.vpp.interfaces import NO_INTERFACE, NOT_FOUND

PATH_NORMAL = 0
PATH_DROP = 2  # FIB_API_PATH_TYPE_DROP
NH_PROTO_IP4 = 0
NEIGHBOR_STATIC = 0x1
NEIGHBOR_NO_FIB_ENTRY = 0x2
EMPTY_LABEL = {"is_uniform": 0, "label": 0, "ttl": 0, "exp": 0}
NOT_FOUND_ROUTE = (*NOT_FOUND, -8)


# The name vppmesh gives the mesh table: VPP keeps it, so `down` knows the table is
# vppmesh's (a table someone else made first keeps its own name, `ipv4-VRF:<id>`).
TABLE_NAME = "vppmesh"


def table(table_id: int, is_add: bool, name: str = TABLE_NAME) -> Request:
    return Request("ip_table_add_del",
                   {"is_add": is_add, "table": {"table_id": table_id, "is_ip6": False,
                                                "name": name}},
                   f"table {table_id}", tolerate=() if is_add else NOT_FOUND)


def dump_tables(api: VppApi) -> set[int]:
    return set(dump_table_names(api))


def dump_table_names(api: VppApi) -> dict[int, str]:
    """{IPv4 table id: its name}."""
    return {d.table.table_id: str(d.table.name) for d in api.dump("ip_table_dump")
            if not d.table.is_ip6}


def _path(sw_if_index: int, nexthop: ipaddress.IPv4Address | None = None,
          path_type: int = PATH_NORMAL) -> dict[str, object]:
    return {"sw_if_index": sw_if_index, "table_id": 0, "weight": 1, "preference": 0,
            "type": path_type, "flags": 0, "proto": NH_PROTO_IP4,
            "nh": {"address": {"ip4": str(nexthop or "0.0.0.0")}},
            "n_labels": 0, "label_stack": [EMPTY_LABEL] * 16}


def route(table_id: int, prefix: ipaddress.IPv4Network, sw_if_indexes: Sequence[int],
          is_add: bool, nexthop: ipaddress.IPv4Address | None = None) -> Request:
    """Add or replace a route: its paths are exactly `sw_if_indexes`, equal cost. Removing
    a route (is_add False, no paths) removes it whatever its paths, a drop route's too."""
    return _route_request(table_id, prefix, [_path(i, nexthop) for i in sw_if_indexes],
                          is_add)


def drop_route(table_id: int, prefix: ipaddress.IPv4Network) -> Request:
    """Add (or turn into) a route whose one path drops what it matches, counted by VPP's
    ip4-drop node."""
    return _route_request(table_id, prefix, [_path(NO_INTERFACE, path_type=PATH_DROP)], True)


def _route_request(table_id: int, prefix: ipaddress.IPv4Network,
                   paths: list[dict[str, object]], is_add: bool) -> Request:
    return Request("ip_route_add_del", {
        "is_add": is_add, "is_multipath": False,
        "route": {"table_id": table_id, "prefix": str(prefix),
                  "n_paths": len(paths), "paths": paths},
    }, f"route {prefix} in table {table_id}", tolerate=() if is_add else NOT_FOUND_ROUTE)


Routes = dict[ipaddress.IPv4Network, tuple[int, ...]]


def dump_routes(api: VppApi, table_id: int) -> Routes:
    """{prefix: sorted sw_if_indexes of its paths} for the API-added routes of a table."""
    return dump_table(api, table_id)[0]


def dump_table(api: VppApi, table_id: int) -> tuple[Routes, set[ipaddress.IPv4Network]]:
    """A table's routes through interfaces (as dump_routes()) and the prefixes of its drop
    routes, VPP's own ones that every table has (0.0.0.0/32, multicast, broadcast) among
    them: only a drop route's prefix tells whose it is."""
    routes: Routes = {}
    drops: set[ipaddress.IPv4Network] = set()
    for d in api.dump("ip_route_dump", table={"table_id": table_id, "is_ip6": False}):
        prefix = ipaddress.ip_network(str(d.route.prefix))
        paths = tuple(sorted(p.sw_if_index for p in d.route.paths
                             if p.sw_if_index != NO_INTERFACE))
        if paths:
            routes[prefix] = paths  # type: ignore[index]
        elif d.route.paths and all(p.type == PATH_DROP for p in d.route.paths):
            drops.add(prefix)  # type: ignore[arg-type]
    return routes, drops


def neighbor(sw_if_index: int, ip: ipaddress.IPv4Address, mac: str, is_add: bool, *,
             fib_entry: bool = False) -> Request:
    """A static neighbor, by default without its own FIB entry (endpoint routes are added
    explicitly: VPP keeps a neighbor's /32 inactive on an unnumbered interface, which has
    no cover). On a numbered interface, `fib_entry` makes it a usable next hop at once."""
    flags = NEIGHBOR_STATIC | (0 if fib_entry else NEIGHBOR_NO_FIB_ENTRY)
    return Request("ip_neighbor_add_del", {"is_add": is_add, "neighbor": {
        "sw_if_index": sw_if_index, "flags": flags,
        "mac_address": mac,
        "ip_address": str(ip),
    }}, f"neighbor {ip}", tolerate=() if is_add else NOT_FOUND)


def dump_neighbors(api: VppApi, sw_if_index: int) -> dict[ipaddress.IPv4Address, str]:
    return {ipaddress.IPv4Address(str(d.neighbor.ip_address)): str(d.neighbor.mac_address)
            for d in api.dump("ip_neighbor_dump", sw_if_index=sw_if_index, af=0)}
