"""reconcile(): make VPP hold exactly the desired state, touching only what vppmesh owns.

One dump per kind of object, a diff keyed by identifiers derived from the mesh, and
changes applied in dependency order: SAs before protection, protection before a tunnel
comes up, tunnels before routes; the reverse on removal. A tunnel is only ever admin-up
while it is protected, so pod traffic never leaves a node in clear, and a tunnel left
half-configured by a crash stays down until the next run finishes it.
"""

from __future__ import annotations

import gc
import ipaddress
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from vppmesh.dataplane.index import (
    DesiredIndex,
    PeerObjects,
    possible_sa_ids,
    possible_tunnel_instances,
    same_node_settings,
)
from vppmesh.dataplane.state import (
    GATEWAY_ADDRESS,
    GATEWAY_TAG,
    DesiredState,
    HostLinkSpec,
    RouteSpec,
    SaSpec,
    TunnelSpec,
    is_owned_sa_id,
    is_owned_tunnel_instance,
)
from vppmesh.dataplane.vpp import host_interfaces, interfaces, ipip, ipsec, routes
from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.dataplane.vpp.interfaces import Interface
from vppmesh.errors import UplinkMissingError, VppApiError, VppMeshError
from vppmesh.host import endpoints
from vppmesh.keying.ledger import KeyLedger

GATEWAY_LOOPBACK_MAC = "02:fe:00:00:00:00"
WHOLE_MESH_SHARE = 8  # a scoped diff of more than 1/8 of the peers compares everything


@dataclass
class Observed:
    """What VPP holds now, reduced to what reconcile() compares."""

    interfaces: dict[int, Interface]
    tunnels: dict[int, ipip.IpipTunnel]  # ours, by instance
    sas: dict[int, ipsec.SaState]  # ours, by SA id
    protections: dict[int, tuple[int, tuple[int, ...]]]
    unnumbered: dict[int, int]
    table_exists: bool
    routes: dict[ipaddress.IPv4Network, tuple[int, ...]]
    drop_routes: set[ipaddress.IPv4Network]  # VPP's own drop routes of a table included
    gateway: Interface | None
    host: Interface | None
    host_neighbors: dict[ipaddress.IPv4Address, str]
    uplink: Interface | None
    uplink_addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
    # The gateway loopback's addresses (read only when there is a gateway).
    gateway_addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(
        default_factory=list)

    def by_name(self, name: str) -> Interface | None:
        return next((i for i in self.interfaces.values() if i.name == name), None)


def observe(api: VppApi, desired: DesiredState,
            sas: Mapping[int, ipsec.SaState] | None = None) -> Observed:
    """Dump each kind of object once; the SAs only if the run has not (`sas`, by id)."""
    ifaces = {i.sw_if_index: i for i in interfaces.dump_interfaces(api)}
    tunnels = {t.instance: t for t in ipip.dump_tunnels(api)
               if is_owned_tunnel_instance(t.instance)}
    found = sas.values() if sas is not None else ipsec.dump_sas(api)
    sas = {s.spec.sa_id: s for s in found if is_owned_sa_id(s.spec.sa_id)}
    table_exists = desired.table_id in routes.dump_tables(api)
    gateway = next((i for i in ifaces.values() if i.tag == GATEWAY_TAG), None)
    host = None
    if desired.host is not None:
        host = next((i for i in ifaces.values() if i.tag == desired.host.tag), None)
        if host is None and desired.host.kind == "af_packet":
            # Created but not yet tagged when a previous run stopped: adopt it.
            host = ifaces.get(
                host_interfaces.dump_af_packet(api).get(desired.host.vpp_ifname, -1))
    table_routes, drop_routes = (routes.dump_table(api, desired.table_id) if table_exists
                                 else ({}, set()))
    primary = desired.uplink_addresses[0] if desired.uplink_addresses else None
    uplink, uplink_addresses = interfaces.find_uplink(api, desired.uplink, primary,
                                                      ifaces.values())
    return Observed(
        interfaces=ifaces,
        tunnels=tunnels,
        sas=sas,
        protections=ipsec.dump_protections(api),
        unnumbered=interfaces.dump_unnumbered(api),
        table_exists=table_exists,
        routes=table_routes,
        drop_routes=drop_routes,
        gateway=gateway,
        host=host,
        host_neighbors=(routes.dump_neighbors(api, host.sw_if_index) if host else {}),
        uplink=uplink,
        uplink_addresses=uplink_addresses,
        gateway_addresses=(interfaces.dump_addresses(api, gateway.sw_if_index)
                           if gateway is not None else []),
    )


class ReusedKeyError(VppMeshError):
    """Installing the plan would reuse an outbound key (and so repeat GCM nonces)."""


def empty_observed(desired: DesiredState) -> Observed:
    """A VPP holding nothing but its uplink: what `plan` compares with when VPP is down."""
    uplink = Interface(sw_if_index=1, name=desired.uplink or "uplink", tag="", admin_up=True,
                       link_up=True, mtu=9000, mac="", dev_type="")
    return Observed(interfaces={1: uplink}, tunnels={}, sas={}, protections={}, unnumbered={},
                    table_exists=False, routes={}, drop_routes=set(), gateway=None, host=None,
                    host_neighbors={},
                    uplink=uplink, uplink_addresses=list(desired.uplink_addresses[:1]))


@dataclass
class Change:
    """One line of a plan: what happens to which object (never any key material)."""

    action: str  # create | delete | update
    kind: str
    target: str

    def __str__(self) -> str:
        sign = {"create": "+", "delete": "-", "update": "~"}[self.action]
        return f"{sign} {self.kind} {self.target}"


@dataclass
class Diff:
    """Everything that differs, grouped the way it must be applied."""

    create_table: bool = False
    create_gateway: bool = False
    gateway_channel_address: bool = False  # the channel's address missing on the gateway
    add_uplink_addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(
        default_factory=list)
    uplink_admin_up: bool = False  # an uplink named with `uplink:` may still be down
    delete_routes: list[ipaddress.IPv4Network] = field(default_factory=list)
    delete_tunnels: list[ipip.IpipTunnel] = field(default_factory=list)
    delete_sas: list[int] = field(default_factory=list)
    create_sas: list[SaSpec] = field(default_factory=list)
    replace_sas: list[SaSpec] = field(default_factory=list)
    bind_sas: list[SaSpec] = field(default_factory=list)
    create_tunnels: list[TunnelSpec] = field(default_factory=list)
    finish_tunnels: list[TunnelSpec] = field(default_factory=list)
    # Of finish_tunnels, those that must go down first (unprotected, or SAs replaced).
    quiesce_tunnels: list[int] = field(default_factory=list)
    reprotect_tunnels: list[TunnelSpec] = field(default_factory=list)
    set_routes: list[RouteSpec] = field(default_factory=list)
    set_drop_routes: list[ipaddress.IPv4Network] = field(default_factory=list)
    host_create: bool = False
    host_neighbor: bool = False

    def changes(self) -> list[Change]:
        out: list[Change] = []
        if self.create_table:
            out.append(Change("create", "table", "mesh VRF"))
        if self.create_gateway:
            out.append(Change("create", "gateway", str(GATEWAY_ADDRESS)))
        if self.gateway_channel_address:
            out.append(Change("create", "address", "channel's on gateway"))
        out += [Change("create", "address", f"{a} on uplink") for a in self.add_uplink_addresses]
        if self.uplink_admin_up:
            out.append(Change("update", "uplink", "admin up"))
        out += [Change("create", "route", f"{p} drop") for p in self.set_drop_routes]
        out += [Change("delete", "route", str(p)) for p in self.delete_routes]
        out += [Change("delete", "tunnel", f"ipip{t.instance} {t.src} -> {t.dst}")
                for t in self.delete_tunnels]
        out += [Change("delete", "sa", f"{s:#x}") for s in self.delete_sas]
        out += [Change("create", "sa", describe_sa(s)) for s in self.create_sas]
        out += [Change("update", "sa", describe_sa(s) + " (new key)") for s in self.replace_sas]
        out += [Change("update", "sa-worker", f"{s.sa_id:#x} -> worker {s.worker}")
                for s in self.bind_sas]
        out += [Change("create", "tunnel", f"{t.name} {t.src} -> {t.dst}")
                for t in self.create_tunnels]
        out += [Change("update", "tunnel", f"{t.name} (finish setup)")
                for t in self.finish_tunnels]
        out += [Change("update", "protection", f"{t.name} out={t.sa_out:#x}")
                for t in self.reprotect_tunnels]
        out += [Change("update", "route", f"{r.prefix} via {len(r.tunnels)} tunnel(s)"
                       if r.tunnels else f"{r.prefix} drop (no usable key)")
                for r in self.set_routes]
        if self.host_create:
            out.append(Change("create", "host-link", "host attachment"))
        elif self.host_neighbor:
            out.append(Change("update", "host-link", "neighbor"))
        return out


def describe_sa(sa: SaSpec) -> str:
    udp = f" esp-in-udp {sa.udp_src_port}->{sa.udp_dst_port}" if sa.udp_encap else ""
    return (f"{sa.sa_id:#x} {sa.direction} peer#{sa.peer_number} tunnel {sa.tunnel} "
            f"spi {sa.spi:#x}{udp}")


@dataclass
class Scope:
    """The objects one diff looks at: all of them, or those of some peers only."""

    sas: dict[int, SaSpec]
    tunnels: dict[int, TunnelSpec]
    routes: dict[ipaddress.IPv4Network, RouteSpec]
    seen_sas: dict[int, ipsec.SaState]
    seen_tunnels: dict[int, ipip.IpipTunnel]
    seen_routes: dict[ipaddress.IPv4Network, tuple[int, ...]]

    @classmethod
    def everything(cls, index: DesiredIndex, observed: Observed) -> Scope:
        return cls(index.sas, index.tunnels, index.routes, observed.sas, observed.tunnels,
                   seen_routes(observed, set(observed.routes) | set(index.routes)))

    @classmethod
    def of_peers(cls, peers: set[int], index: DesiredIndex, observed: Observed,
                 before: DesiredIndex | None = None) -> Scope:
        """Only `peers`' objects: found through their identifiers, O(peers), not O(mesh)."""
        sas = index.sas_of(peers)
        tunnels = index.tunnels_of(peers)
        routes = index.routes_of(peers)
        prefixes = set(routes)
        if before is not None:
            prefixes |= set(before.routes_of(peers))
        seen_sas = {i: observed.sas[i] for p in peers for i in possible_sa_ids(p)
                    if i in observed.sas}
        seen_tunnels = {i: observed.tunnels[i] for p in peers
                        for i in possible_tunnel_instances(p) if i in observed.tunnels}
        return cls(sas, tunnels, routes, seen_sas, seen_tunnels,
                   seen_routes(observed, prefixes))


def seen_routes(observed: Observed, prefixes: Iterable[ipaddress.IPv4Network],
                ) -> dict[ipaddress.IPv4Network, tuple[int, ...]]:
    """The routes VPP holds for `prefixes`: their paths, and () for a drop route (a peer
    that fails closed). VPP's own drop routes are never among the prefixes asked for."""
    found: dict[ipaddress.IPv4Network, tuple[int, ...]] = {}
    for prefix in prefixes:
        if prefix in observed.routes:
            found[prefix] = observed.routes[prefix]
        elif prefix in observed.drop_routes:
            found[prefix] = ()
    return found


def diff(desired: DesiredState, observed: Observed, *, peers: set[int] | None = None,
         index: DesiredIndex | None = None, before: DesiredIndex | None = None) -> Diff:
    """Pure comparison, each object looked up once by its identifier.

    With `peers`, only those peers' objects are compared (the node-wide part, such as the
    table, gateway and host link, is taken as unchanged): the cost is that of the
    change, whatever the size of the mesh. `before` is the index of the previously
    applied state, whose routes may need removing.
    """
    index = index or DesiredIndex(desired)
    d = Diff()
    gw = observed.gateway
    gateway_index = gw.sw_if_index if gw is not None else None
    if peers is None:
        _diff_node(d, desired, observed, gateway_index)
    if peers is None or len(peers) * WHOLE_MESH_SHARE > len(index.peer_routes):
        # Finding many peers' objects through their identifiers costs more than one pass
        # over everything (a new key epoch changes every peer): then compare everything.
        scope = Scope.everything(index, observed)
    else:
        scope = Scope.of_peers(peers, index, observed, before)

    # Tunnels: gone, new, or present but not (fully) as wanted.
    for instance, seen in scope.seen_tunnels.items():
        want = scope.tunnels.get(instance)
        if want is None or (want.src, want.dst) != (seen.src, seen.dst):
            d.delete_tunnels.append(seen)
    replaced_ids = set()
    for sa_id, sa in scope.sas.items():
        seen_sa = scope.seen_sas.get(sa_id)
        if seen_sa is None:
            d.create_sas.append(sa)
        elif not sa.same_content(seen_sa.spec):
            d.replace_sas.append(sa)
            replaced_ids.add(sa_id)
        elif sa.worker is not None and seen_sa.thread_index != sa.worker + 1:
            d.bind_sas.append(sa)
    d.delete_sas = sorted(set(scope.seen_sas) - set(scope.sas))
    deleted = {t.instance for t in d.delete_tunnels}
    for instance, want in scope.tunnels.items():
        seen = scope.seen_tunnels.get(instance)
        if seen is None or instance in deleted:
            d.create_tunnels.append(want)
            continue
        iface = observed.interfaces.get(seen.sw_if_index)
        complete = (
            iface is not None and iface.admin_up and iface.mtu == desired.mtu
            and gateway_index is not None
            and observed.unnumbered.get(seen.sw_if_index) == gateway_index
        )
        protection = observed.protections.get(seen.sw_if_index)
        protected_as_wanted = protection is not None and protection[0] == want.sa_out and \
            sorted(protection[1]) == sorted(want.sa_in)
        uses_replaced = {want.sa_out, *want.sa_in} & replaced_ids
        if not complete or uses_replaced or protection is None:
            d.finish_tunnels.append(want)
            if uses_replaced or protection is None:
                d.quiesce_tunnels.append(instance)
        elif not protected_as_wanted:
            d.reprotect_tunnels.append(want)

    # Routes: compare path sets by tunnel instance (sw_if_indexes may change on recreate).
    index_to_instance = {t.sw_if_index: i for i, t in scope.seen_tunnels.items()}
    recreated = {t.instance for t in d.create_tunnels}
    for prefix, paths in scope.seen_routes.items():
        instances = [index_to_instance.get(p) for p in paths]
        ours = all(i is not None for i in instances)
        if ours and prefix not in scope.routes:
            d.delete_routes.append(prefix)
    for prefix, route in scope.routes.items():
        seen_paths = scope.seen_routes.get(prefix)
        seen_instances = sorted(index_to_instance.get(p, -1) for p in seen_paths or ())
        if seen_paths is None or seen_instances != sorted(route.tunnels) or \
                recreated & set(route.tunnels):
            d.set_routes.append(route)  # (no tunnels: a drop route)
    return d


def _diff_node(d: Diff, desired: DesiredState, observed: Observed,
               gateway_index: int | None) -> None:
    """The node-wide part: mesh table, its drop routes, gateway, uplink addresses, host
    link."""
    d.create_table = not observed.table_exists
    d.set_drop_routes = [p for p in desired.drop_routes if p not in observed.drop_routes]
    gw = observed.gateway
    d.create_gateway = gw is None or not gw.admin_up
    d.gateway_channel_address = desired.channel_address is not None and (
        gw is None or desired.channel_address not in observed.gateway_addresses)
    if observed.uplink is not None:
        have = {a.ip for a in observed.uplink_addresses}
        d.add_uplink_addresses = [a for a in desired.uplink_addresses if a.ip not in have]
        d.uplink_admin_up = not observed.uplink.admin_up
    host = desired.host
    if host is not None:
        seen_host = observed.host
        d.host_create = seen_host is None or not seen_host.admin_up or \
            seen_host.mtu != desired.mtu or \
            (gateway_index is not None and
             observed.unnumbered.get(seen_host.sw_if_index) != gateway_index)
        host_routes = {observed.routes.get(p)  # type: ignore[call-overload]
                       for p in (host.address.network, *host.vpp_routes)}
        d.host_neighbor = observed.host_neighbors.get(host.address.ip) != host.linux_mac or \
            seen_host is None or host_routes != {(seen_host.sw_if_index,)}


class TunnelIndexes:
    """A tunnel's sw_if_index by its instance, read from the observed tunnels, which the
    Applier keeps in step with VPP: no copy of all of them per run."""

    def __init__(self, tunnels: dict[int, ipip.IpipTunnel]) -> None:
        self.tunnels = tunnels

    def __getitem__(self, instance: int) -> int:
        return self.tunnels[instance].sw_if_index

    def __contains__(self, instance: int) -> bool:
        return instance in self.tunnels


class Applier:
    """Applies a Diff in dependency order, pipelining each independent phase.

    Each phase is one batch: all of its replies are in and checked before the next phase
    is sent, so the order that keeps the mesh closed (SAs, protection, admin-up, routes;
    the reverse on removal) holds exactly as if every message were sent alone. As it
    goes, it writes what it changed into `observed`: once `observed_exact`, the gateway
    and every per-peer object in it match VPP again (the node-wide rest is re-read by
    any run that changes it), and the next change can skip the dumps.
    """

    def __init__(self, api: VppApi, desired: DesiredState, observed: Observed) -> None:
        self.api = api
        self.desired = desired
        self.observed = observed
        self.index = TunnelIndexes(observed.tunnels)
        self.gateway = observed.gateway.sw_if_index if observed.gateway else None
        self.observed_exact = True

    def run(self, d: Diff) -> None:
        self.observed_exact = False  # until every phase went through
        self._base(d)
        self._removals(d)
        self._sas(d)
        self._tunnels(d)
        self.api.call_many([ipsec.del_sa(s) for s in d.delete_sas])
        for sa_id in d.delete_sas:
            self.observed.sas.pop(sa_id, None)
        self._routes(d)
        if self.desired.host is not None and (d.host_create or d.host_neighbor):
            self._host(self.desired.host, d.host_create)
        self.observed_exact = True

    def _set_admin(self, sw_if_index: int, up: bool) -> None:
        iface = self.observed.interfaces.get(sw_if_index)
        if iface is not None:
            self.observed.interfaces[sw_if_index] = replace(iface, admin_up=up, link_up=up)

    def _base(self, d: Diff) -> None:
        desired = self.desired
        observed = self.observed
        if d.create_table:
            self.api.call(routes.table(desired.table_id, True))
            observed.table_exists = True
        self.api.call_many([routes.drop_route(desired.table_id, p) for p in d.set_drop_routes])
        for prefix in d.set_drop_routes:
            observed.routes.pop(prefix, None)  # a route through interfaces it replaced
            observed.drop_routes.add(prefix)
        if self.gateway is None:
            reply = self.api.call(interfaces.create_loopback(GATEWAY_LOOPBACK_MAC, "gateway"))
            self.gateway = reply.sw_if_index
            self.api.call(interfaces.set_tag(self.gateway, GATEWAY_TAG, "gateway"))
        if d.create_gateway:
            gw = self.gateway
            have = interfaces.dump_addresses(self.api, gw)
            if GATEWAY_ADDRESS not in have:
                # One at a time: the address must not land in the default table.
                self.api.call(interfaces.set_table(gw, desired.table_id, "gateway"))
                self.api.call(interfaces.address(gw, GATEWAY_ADDRESS, True, "gateway address"))
            self.api.call(interfaces.set_admin(gw, True, "gateway"))
            observed.gateway = Interface(
                sw_if_index=gw, name=observed.gateway.name if observed.gateway else "",
                tag=GATEWAY_TAG, admin_up=True, link_up=True, mtu=0,
                mac=GATEWAY_LOOPBACK_MAC, dev_type="Loopback")
            observed.interfaces[gw] = observed.gateway
        if d.gateway_channel_address and self.desired.channel_address is not None:
            # In the mesh VRF (set above, with the gateway address): peers reach it
            # through the tunnels only, never from the underlay.
            channel = self.desired.channel_address
            self.api.call(interfaces.address(self.gateway, channel, True, "channel address"))
            observed.gateway_addresses.append(channel)
        if d.add_uplink_addresses and observed.uplink is not None:
            up = observed.uplink.sw_if_index
            self.api.call_many([interfaces.address(up, a, True) for a in d.add_uplink_addresses])
            observed.uplink_addresses += d.add_uplink_addresses
        if d.uplink_admin_up and observed.uplink is not None:
            self.api.call(interfaces.set_admin(observed.uplink.sw_if_index, True, "uplink"))
            observed.uplink = replace(observed.uplink, admin_up=True)

    def _removals(self, d: Diff) -> None:
        table = self.desired.table_id
        observed = self.observed
        self.api.call_many([routes.route(table, p, [], False) for p in d.delete_routes])
        for prefix in d.delete_routes:
            observed.routes.pop(prefix, None)
            observed.drop_routes.discard(prefix)
        # Down first: a tunnel without protection must never carry traffic.
        down = [interfaces.set_admin(t.sw_if_index, False, f"ipip{t.instance}")
                for t in d.delete_tunnels]
        down += [interfaces.set_admin(self.index[i], False, f"ipip{i}")
                 for i in d.quiesce_tunnels]
        self.api.call_many(down)
        for t in d.delete_tunnels:
            self._set_admin(t.sw_if_index, False)
        for i in d.quiesce_tunnels:
            self._set_admin(self.index[i], False)
        unprotect = [ipsec.unprotect(t.sw_if_index, f"ipip{t.instance}")
                     for t in d.delete_tunnels]
        replaced = {s.sa_id for s in d.replace_sas}
        unprotect_finished = [t for t in d.finish_tunnels if t.instance in self.index and
                              ({t.sa_out, *t.sa_in} & replaced)]
        unprotect += [ipsec.unprotect(self.index[t.instance], t.name)
                      for t in unprotect_finished]
        self.api.call_many(unprotect)
        for t in d.delete_tunnels:
            observed.protections.pop(t.sw_if_index, None)
        for spec in unprotect_finished:
            observed.protections.pop(self.index[spec.instance], None)
        self.api.call_many([ipip.del_tunnel(t.sw_if_index, f"ipip{t.instance}")
                            for t in d.delete_tunnels])
        for t in d.delete_tunnels:
            observed.tunnels.pop(t.instance, None)
            observed.interfaces.pop(t.sw_if_index, None)
            observed.unnumbered.pop(t.sw_if_index, None)
        # SAs being replaced go now (their tunnels are down and unprotected); stale SAs
        # only after the tunnels moved off them (VPP refuses to delete an SA in use).
        self.api.call_many([ipsec.del_sa(s) for s in sorted(replaced)])
        for sa_id in replaced:
            observed.sas.pop(sa_id, None)

    def _sas(self, d: Diff) -> None:
        new = [*d.create_sas, *d.replace_sas]
        replies = self.api.call_many([ipsec.add_sa(s) for s in new])
        for sa, reply in zip(new, replies, strict=True):
            self.observed.sas[sa.sa_id] = ipsec.installed_sa(sa, reply.stat_index)
        bound = [s for s in (*new, *d.bind_sas) if s.worker is not None]
        self.api.call_many([ipsec.bind_sa(s.sa_id, s.worker) for s in bound])  # type: ignore[arg-type]
        for sa in bound:
            seen = self.observed.sas[sa.sa_id]
            self.observed.sas[sa.sa_id] = replace(seen, thread_index=sa.worker + 1)  # type: ignore[operator]

    def _tunnels(self, d: Diff) -> None:
        desired = self.desired
        observed = self.observed
        replies = self.api.call_many([ipip.add_tunnel(t.instance, t.src, t.dst)
                                      for t in d.create_tunnels])
        for t, reply in zip(d.create_tunnels, replies, strict=True):
            observed.tunnels[t.instance] = ipip.IpipTunnel(
                sw_if_index=reply.sw_if_index, instance=t.instance, src=t.src, dst=t.dst,
                table_id=0)
            observed.interfaces[reply.sw_if_index] = Interface(
                sw_if_index=reply.sw_if_index, name=t.name, tag="", admin_up=False,
                link_up=False, mtu=0, mac="", dev_type="IPIP")
        setup: list[Request] = []
        created = {t.instance for t in d.create_tunnels}
        finishing = (*d.create_tunnels, *d.finish_tunnels)
        for t in finishing:
            i = self.index[t.instance]
            if t.instance in created or observed.unnumbered.get(i) != self.gateway:
                # The table first: VPP refuses a new table once the interface has an
                # (unnumbered) address.
                setup += [interfaces.set_table(i, desired.table_id, t.name),
                          interfaces.set_unnumbered(i, self.gateway, True, t.name)]  # type: ignore[arg-type]
            setup.append(interfaces.set_mtu(i, desired.mtu, t.name))
            if desired.gso:
                setup.append(interfaces.gso_feature(i, True, t.name))
        self.api.call_many(setup)
        for t in finishing:
            i = self.index[t.instance]
            observed.unnumbered[i] = self.gateway  # type: ignore[assignment]
            iface = observed.interfaces.get(i)
            if iface is not None:
                observed.interfaces[i] = replace(iface, mtu=desired.mtu)
        protecting = (*finishing, *d.reprotect_tunnels)
        self.api.call_many([ipsec.protect(self.index[t.instance], t.sa_out, t.sa_in, t.name)
                            for t in protecting])
        for t in protecting:
            observed.protections[self.index[t.instance]] = (t.sa_out, tuple(t.sa_in))
        # Only now, protected, may a tunnel come up.
        self.api.call_many([interfaces.set_admin(self.index[t.instance], True, t.name)
                            for t in finishing])
        for t in finishing:
            self._set_admin(self.index[t.instance], True)

    def _routes(self, d: Diff) -> None:
        table = self.desired.table_id
        self.api.call_many([
            routes.route(table, r.prefix, [self.index[i] for i in r.tunnels], True)
            if r.tunnels else routes.drop_route(table, r.prefix)
            for r in d.set_routes
        ])
        for r in d.set_routes:
            if r.tunnels:
                self.observed.routes[r.prefix] = tuple(sorted(self.index[i] for i in r.tunnels))
                self.observed.drop_routes.discard(r.prefix)
            else:
                self.observed.routes.pop(r.prefix, None)
                self.observed.drop_routes.add(r.prefix)

    def _host(self, host: HostLinkSpec, create: bool) -> None:
        seen = self.observed.host
        if create:
            endpoints.attach_vpp(self.api, host, table_id=self.desired.table_id,
                                 mtu=self.desired.mtu, gateway=self.gateway,  # type: ignore[arg-type]
                                 existing=seen)
        elif seen is not None:
            endpoints.set_neighbor(self.api, seen.sw_if_index, host, self.desired.table_id)


def missing_uplink(desired: DesiredState) -> UplinkMissingError:
    where = (f"named {desired.uplink!r}" if desired.uplink
             else f"holding the primary underlay address {desired.uplink_addresses[0]}")
    return UplinkMissingError(
        f"no VPP interface {where}: give VPP its uplink first (uplink takeover, or "
        "`set interface ip address`), or set `uplink:` for this node in the mesh file")


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a reconcile allocates its objects.

    A reconcile creates and drops hundreds of thousands of small objects (decoded
    replies, specs); each collection would walk every live object of the process again,
    which measured as 40% of the CPU time of dumping a 1000-peer mesh. Reference
    counting still frees everything at once; cycles wait for the next collection.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Reconciler:
    """reconcile() for a long-running agent: remembers what VPP holds between runs.

    The first run, any run with `full=True` and any run after a node-wide setting changed
    dump VPP. Later runs compare the new desired state with the last applied one peer by
    peer and diff only the peers that changed against the remembered VPP state, so one
    peer joining or leaving costs that peer's messages and no dumps, whatever the size of
    the mesh. Another process may change VPP meanwhile (`vppmesh rekey`, an operator): a
    run from the remembered state that VPP refuses, or that the key ledger stops, dumps
    VPP and starts over once, and a periodic `full=True` run catches the rest.
    """

    def __init__(self, api: VppApi) -> None:
        self.api = api
        self._observed: Observed | None = None
        self._applied: DesiredIndex | None = None
        self.last_scope: set[int] | None = None  # peers the last run compared; None: all
        self.last_timings: dict[str, float] = {}  # seconds spent observing, diffing, applying
        # settings.async_crypto as last set in VPP (ipsec.set_async_mode; None: not yet).
        self.async_crypto: bool | None = None

    def uplink_for(self, desired: DesiredState) -> Interface | None:
        """The uplink as remembered, if the last applied state looked for the same one
        (None: look it up). Its index stays while the connection does (a VPP restart
        breaks it), so a long-running agent need not dump every interface to find it."""
        applied = self._applied
        if self._observed is None or applied is None or \
                applied.desired.uplink != desired.uplink or \
                applied.desired.uplink_addresses[:1] != desired.uplink_addresses[:1]:
            return None
        return self._observed.uplink

    def remembered_sas(self) -> Mapping[int, ipsec.SaState] | None:
        """Our SAs as VPP holds them after the last run (by id; their counts are the last
        dump's), or None when that is not known exactly: dump them."""
        if self._observed is None or self._applied is None:
            return None
        return self._observed.sas

    def forget(self) -> None:
        """Dump VPP again on the next run."""
        self._observed = None
        self._applied = None
        self.async_crypto = None

    def reconcile(self, desired: DesiredState, *, dry_run: bool = False,
                  ledger: KeyLedger | None = None, full: bool = False,
                  by_peer: Mapping[int, PeerObjects] | None = None,
                  sas: Mapping[int, ipsec.SaState] | None = None) -> list[Change]:
        """`by_peer`: plan_by_peer()'s parts of `desired`, so that two plans are compared
        peer by peer (index.DesiredIndex). `sas`: the run's own SA dump, used if this
        run dumps VPP (one SA dump per run)."""
        with gc_paused():
            try:
                return self._reconcile(desired, by_peer, dry_run=dry_run, ledger=ledger,
                                       full=full, sas=sas)
            except (VppApiError, ReusedKeyError):
                if full or self.last_scope is None:
                    raise
                # The remembered state was wrong: another process (`vppmesh rekey`, an
                # operator) changed VPP. Whatever this run applied is in VPP; dump it
                # and finish from what is really there.
                self.forget()
                return self._reconcile(desired, by_peer, dry_run=dry_run, ledger=ledger,
                                       full=True)

    def _reconcile(self, desired: DesiredState, by_peer: Mapping[int, PeerObjects] | None,
                   *, dry_run: bool, ledger: KeyLedger | None, full: bool,
                   sas: Mapping[int, ipsec.SaState] | None = None) -> list[Change]:
        clock = time.perf_counter
        started = clock()
        index = DesiredIndex(desired, by_peer)
        indexed_at = clock()
        before = self._applied
        observed = self._observed
        peers: set[int] | None = None
        if full or observed is None or before is None or \
                not same_node_settings(before.desired, desired):
            observed = observe(self.api, desired, sas)
            self._observed, self._applied = observed, None
        else:
            peers = index.changed_peers(before)
        self.last_scope = peers
        observed_at = clock()
        if observed.uplink is None:
            raise missing_uplink(desired)
        d = diff(desired, observed, peers=peers, index=index, before=before)
        changes = d.changes()
        diffed_at = clock()
        # "observe" is the dumps, or on an incremental run the peer-by-peer comparison.
        self.last_timings = {"index": indexed_at - started, "observe": observed_at - indexed_at,
                             "diff": diffed_at - observed_at, "apply": 0.0}
        if dry_run:
            return changes
        if not changes:
            self._applied = index
            return changes
        if ledger is not None:
            outbound = [s for s in (*d.create_sas, *d.replace_sas) if s.direction == "out"]
            reused = ledger.reused(outbound)
            if reused:
                peer_names = sorted({f"#{s.peer_number}" for s in reused})
                raise ReusedKeyError(
                    f"{len(reused)} outbound key(s) towards peer(s) {', '.join(peer_names)} "
                    "were installed in VPP before (VPP restarted, or its SAs were removed); "
                    "installing them again would repeat AES-GCM nonces. Nothing was changed. "
                    "Move the mesh to a new key epoch (`vppmesh rekey`, or raise "
                    "settings.key_epoch).")
            ledger.record(outbound)
        applier = Applier(self.api, desired, observed)
        try:
            applier.run(d)
        finally:
            if applier.observed_exact:
                self._applied = index
            else:
                self.forget()
            self.last_timings["apply"] = time.perf_counter() - diffed_at
        return changes


def reconcile(api: VppApi, desired: DesiredState, *, dry_run: bool = False,
              ledger: KeyLedger | None = None,
              sas: Mapping[int, ipsec.SaState] | None = None) -> list[Change]:
    """Bring VPP to `desired`; returns what was (or, with dry_run, would be) changed.

    Dumps each kind of object once, then changes only what differs. With a ledger, no
    outbound key that was ever installed before is installed again; such a plan is
    refused as a whole, before anything is changed.
    """
    return Reconciler(api).reconcile(desired, dry_run=dry_run, ledger=ledger, sas=sas)
