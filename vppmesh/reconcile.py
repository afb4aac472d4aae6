"""reconcile(): make VPP hold exactly the desired state, touching only what vppmesh owns.

One dump per kind of object, a diff keyed by identifiers derived from the mesh, and
changes applied in dependency order: SAs before protection, protection before a tunnel
comes up, tunnels before routes; the reverse on removal. A tunnel is only ever admin-up
while it is protected, so pod traffic never leaves a node in clear, and a tunnel left
half-configured by a crash stays down until the next run finishes it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from vppmesh import endpoints
from vppmesh.errors import ConfigError, VppMeshError
from vppmesh.ledger import KeyLedger
from vppmesh.state import (
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
from vppmesh.vpp import host_interfaces, interfaces, ipip, ipsec, routes
from vppmesh.vpp.client import Request, VppApi
from vppmesh.vpp.interfaces import Interface

GATEWAY_LOOPBACK_MAC = "02:fe:00:00:00:00"


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
    gateway: Interface | None
    host: Interface | None
    host_neighbors: dict[ipaddress.IPv4Address, str]
    uplink: Interface | None
    uplink_addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]

    def by_name(self, name: str) -> Interface | None:
        return next((i for i in self.interfaces.values() if i.name == name), None)


def find_uplink(ifaces: Iterable[Interface], addresses: dict[int, list[object]],
                wanted: str | None, primary: object) -> Interface | None:
    """The uplink by name, or else the interface that holds the primary address."""
    for iface in ifaces:
        if wanted is not None and iface.name == wanted:
            return iface
        if wanted is None and primary in addresses.get(iface.sw_if_index, []):
            return iface
    return None


def observe(api: VppApi, desired: DesiredState) -> Observed:
    """Dump each kind of object once."""
    ifaces = {i.sw_if_index: i for i in interfaces.dump_interfaces(api)}
    tunnels = {t.instance: t for t in ipip.dump_tunnels(api)
               if is_owned_tunnel_instance(t.instance)}
    sas = {s.spec.sa_id: s for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)}
    table_exists = desired.table_id in routes.dump_tables(api)
    gateway = next((i for i in ifaces.values() if i.tag == GATEWAY_TAG), None)
    host = None
    if desired.host is not None:
        host = next((i for i in ifaces.values() if i.tag == desired.host.tag), None)
        if host is None and desired.host.kind == "af_packet":
            # Created but not yet tagged when a previous run stopped: adopt it.
            host = ifaces.get(
                host_interfaces.dump_af_packet(api).get(desired.host.vpp_ifname, -1))
    uplink = None
    uplink_addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    primary = desired.uplink_addresses[0] if desired.uplink_addresses else None
    if desired.uplink is not None:
        uplink = next((i for i in ifaces.values() if i.name == desired.uplink), None)
    else:
        candidates = [i for i in ifaces.values()
                      if i.dev_type not in ("Loopback", "IPIP", "local")
                      and not i.tag.startswith("vppmesh:")]
        for iface in candidates:
            addrs = interfaces.dump_addresses(api, iface.sw_if_index)
            if primary in addrs:
                uplink, uplink_addresses = iface, addrs
                break
    if uplink is not None and not uplink_addresses:
        uplink_addresses = interfaces.dump_addresses(api, uplink.sw_if_index)
    return Observed(
        interfaces=ifaces,
        tunnels=tunnels,
        sas=sas,
        protections=ipsec.dump_protections(api),
        unnumbered=interfaces.dump_unnumbered(api),
        table_exists=table_exists,
        routes=routes.dump_routes(api, desired.table_id) if table_exists else {},
        gateway=gateway,
        host=host,
        host_neighbors=(routes.dump_neighbors(api, host.sw_if_index) if host else {}),
        uplink=uplink,
        uplink_addresses=uplink_addresses,
    )


class ReusedKeyError(VppMeshError):
    """Installing the plan would reuse an outbound key (and so repeat GCM nonces)."""


def empty_observed(desired: DesiredState) -> Observed:
    """A VPP holding nothing but its uplink: what `plan` compares with when VPP is down."""
    uplink = Interface(sw_if_index=1, name=desired.uplink or "uplink", tag="", admin_up=True,
                       link_up=True, mtu=9000, mac="", dev_type="")
    return Observed(interfaces={1: uplink}, tunnels={}, sas={}, protections={}, unnumbered={},
                    table_exists=False, routes={}, gateway=None, host=None, host_neighbors={},
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
    add_uplink_addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(
        default_factory=list)
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
    host_create: bool = False
    host_neighbor: bool = False

    def changes(self) -> list[Change]:
        out: list[Change] = []
        if self.create_table:
            out.append(Change("create", "table", "mesh VRF"))
        if self.create_gateway:
            out.append(Change("create", "gateway", str(GATEWAY_ADDRESS)))
        out += [Change("create", "address", f"{a} on uplink") for a in self.add_uplink_addresses]
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
        out += [Change("update", "route", f"{r.prefix} via {len(r.tunnels)} tunnel(s)")
                for r in self.set_routes]
        if self.host_create:
            out.append(Change("create", "host-link", "host attachment"))
        elif self.host_neighbor:
            out.append(Change("update", "host-link", "neighbor"))
        return out


def describe_sa(sa: SaSpec) -> str:
    return (f"{sa.sa_id:#x} {sa.direction} peer#{sa.peer_number} tunnel {sa.tunnel} "
            f"spi {sa.spi:#x}")


def diff(desired: DesiredState, observed: Observed) -> Diff:
    """Pure comparison; cost proportional to the number of objects, each looked up once."""
    d = Diff()
    d.create_table = not observed.table_exists
    gw = observed.gateway
    d.create_gateway = gw is None or not gw.admin_up
    if observed.uplink is not None:
        have = {a.ip for a in observed.uplink_addresses}
        d.add_uplink_addresses = [a for a in desired.uplink_addresses if a.ip not in have]

    wanted_sas = {s.sa_id: s for s in desired.sas}
    wanted_tunnels = {t.instance: t for t in desired.tunnels}
    gateway_index = gw.sw_if_index if gw is not None else None

    # Tunnels: gone, new, or present but not (fully) as wanted.
    for instance, seen in observed.tunnels.items():
        want = wanted_tunnels.get(instance)
        if want is None or (want.src, want.dst) != (seen.src, seen.dst):
            d.delete_tunnels.append(seen)
    replaced_ids = set()
    for sa_id, sa in wanted_sas.items():
        seen_sa = observed.sas.get(sa_id)
        if seen_sa is None:
            d.create_sas.append(sa)
        elif not sa.same_content(seen_sa.spec):
            d.replace_sas.append(sa)
            replaced_ids.add(sa_id)
        elif sa.worker is not None and seen_sa.thread_index != sa.worker + 1:
            d.bind_sas.append(sa)
    d.delete_sas = sorted(set(observed.sas) - set(wanted_sas))
    deleted = {t.instance for t in d.delete_tunnels}
    for instance, want in wanted_tunnels.items():
        seen = observed.tunnels.get(instance)
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
    index_to_instance = {t.sw_if_index: i for i, t in observed.tunnels.items()}
    wanted_routes = {r.prefix: r for r in desired.routes}
    recreated = {t.instance for t in d.create_tunnels}
    for prefix, paths in observed.routes.items():
        instances = [index_to_instance.get(p) for p in paths]
        ours = all(i is not None for i in instances)
        if ours and prefix not in wanted_routes:
            d.delete_routes.append(prefix)
    for prefix, route in wanted_routes.items():
        seen_paths = observed.routes.get(prefix)
        seen_instances = sorted(index_to_instance.get(p, -1) for p in seen_paths or ())
        if seen_paths is None or seen_instances != sorted(route.tunnels) or \
                recreated & set(route.tunnels):
            d.set_routes.append(route)

    host = desired.host
    if host is not None:
        seen_host = observed.host
        d.host_create = seen_host is None or not seen_host.admin_up or \
            seen_host.mtu != desired.mtu or \
            (gateway_index is not None and
             observed.unnumbered.get(seen_host.sw_if_index) != gateway_index)
        host_route = observed.routes.get(host.address.network)  # type: ignore[call-overload]
        d.host_neighbor = observed.host_neighbors.get(host.address.ip) != host.linux_mac or \
            seen_host is None or host_route != (seen_host.sw_if_index,)
    return d


class Applier:
    """Applies a Diff in dependency order, pipelining each independent phase."""

    def __init__(self, api: VppApi, desired: DesiredState, observed: Observed) -> None:
        self.api = api
        self.desired = desired
        self.observed = observed
        self.index: dict[int, int] = {i: t.sw_if_index for i, t in observed.tunnels.items()}
        self.gateway = observed.gateway.sw_if_index if observed.gateway else None

    def run(self, d: Diff) -> None:
        self._base(d)
        self._removals(d)
        self._sas(d)
        self._tunnels(d)
        self.api.call_many([ipsec.del_sa(s) for s in d.delete_sas])
        self._routes(d)
        if self.desired.host is not None and (d.host_create or d.host_neighbor):
            self._host(self.desired.host, d.host_create)

    def _base(self, d: Diff) -> None:
        desired = self.desired
        if d.create_table:
            self.api.call(routes.table(desired.table_id, True))
        if self.gateway is None:
            reply = self.api.call(interfaces.create_loopback(GATEWAY_LOOPBACK_MAC, "gateway"))
            self.gateway = reply.sw_if_index
            self.api.call(interfaces.set_tag(self.gateway, GATEWAY_TAG, "gateway"))
        if d.create_gateway:
            gw = self.gateway
            have = interfaces.dump_addresses(self.api, gw)
            batch = [] if GATEWAY_ADDRESS in have else [
                interfaces.set_table(gw, desired.table_id, "gateway"),
                interfaces.address(gw, GATEWAY_ADDRESS, True, "gateway address")]
            batch.append(interfaces.set_admin(gw, True, "gateway"))
            self.api.call_many(batch)
        if d.add_uplink_addresses and self.observed.uplink is not None:
            up = self.observed.uplink.sw_if_index
            self.api.call_many([interfaces.address(up, a, True) for a in d.add_uplink_addresses])

    def _removals(self, d: Diff) -> None:
        table = self.desired.table_id
        self.api.call_many([routes.route(table, p, [], False) for p in d.delete_routes])
        # Down first: a tunnel without protection must never carry traffic.
        down = [interfaces.set_admin(t.sw_if_index, False, f"ipip{t.instance}")
                for t in d.delete_tunnels]
        down += [interfaces.set_admin(self.index[i], False, f"ipip{i}")
                 for i in d.quiesce_tunnels]
        self.api.call_many(down)
        unprotect = [ipsec.unprotect(t.sw_if_index, f"ipip{t.instance}")
                     for t in d.delete_tunnels]
        replaced = {s.sa_id for s in d.replace_sas}
        unprotect += [ipsec.unprotect(self.index[t.instance], t.name)
                      for t in d.finish_tunnels
                      if t.instance in self.index and ({t.sa_out, *t.sa_in} & replaced)]
        self.api.call_many(unprotect)
        self.api.call_many([ipip.del_tunnel(t.sw_if_index, f"ipip{t.instance}")
                            for t in d.delete_tunnels])
        for t in d.delete_tunnels:
            self.index.pop(t.instance, None)
        # SAs being replaced go now (their tunnels are down and unprotected); stale SAs
        # only after the tunnels moved off them (VPP refuses to delete an SA in use).
        self.api.call_many([ipsec.del_sa(s) for s in sorted(replaced)])

    def _sas(self, d: Diff) -> None:
        new = [*d.create_sas, *d.replace_sas]
        self.api.call_many([ipsec.add_sa(s) for s in new])
        self.api.call_many([ipsec.bind_sa(s.sa_id, s.worker)
                            for s in (*new, *d.bind_sas) if s.worker is not None])

    def _tunnels(self, d: Diff) -> None:
        desired = self.desired
        replies = self.api.call_many([ipip.add_tunnel(t.instance, t.src, t.dst)
                                      for t in d.create_tunnels])
        for t, reply in zip(d.create_tunnels, replies, strict=True):
            self.index[t.instance] = reply.sw_if_index
        setup: list[Request] = []
        created = {t.instance for t in d.create_tunnels}
        for t in (*d.create_tunnels, *d.finish_tunnels):
            i = self.index[t.instance]
            if t.instance in created or self.observed.unnumbered.get(i) != self.gateway:
                # The table first: VPP refuses a new table once the interface has an
                # (unnumbered) address.
                setup += [interfaces.set_table(i, desired.table_id, t.name),
                          interfaces.set_unnumbered(i, self.gateway, True, t.name)]  # type: ignore[arg-type]
            setup.append(interfaces.set_mtu(i, desired.mtu, t.name))
            if desired.gso:
                setup.append(interfaces.gso_feature(i, True, t.name))
        self.api.call_many(setup)
        protect = [ipsec.protect(self.index[t.instance], t.sa_out, t.sa_in, t.name)
                   for t in (*d.create_tunnels, *d.finish_tunnels, *d.reprotect_tunnels)]
        self.api.call_many(protect)
        # Only now, protected, may a tunnel come up.
        self.api.call_many([interfaces.set_admin(self.index[t.instance], True, t.name)
                            for t in (*d.create_tunnels, *d.finish_tunnels)])

    def _routes(self, d: Diff) -> None:
        table = self.desired.table_id
        self.api.call_many([
            routes.route(table, r.prefix, [self.index[i] for i in r.tunnels], True)
            for r in d.set_routes
        ])

    def _host(self, host: HostLinkSpec, create: bool) -> None:
        seen = self.observed.host
        if create:
            endpoints.attach_vpp(self.api, host, table_id=self.desired.table_id,
                                 mtu=self.desired.mtu, gateway=self.gateway,  # type: ignore[arg-type]
                                 existing=seen)
        elif seen is not None:
            endpoints.set_neighbor(self.api, seen.sw_if_index, host, self.desired.table_id)


def reconcile(api: VppApi, desired: DesiredState, *, dry_run: bool = False,
              ledger: KeyLedger | None = None) -> list[Change]:
    """Bring VPP to `desired`; returns what was (or, with dry_run, would be) changed.

    With a ledger, no outbound key that was ever installed before is installed again;
    such a plan is refused as a whole, before anything is changed.
    """
    observed = observe(api, desired)
    if observed.uplink is None:
        where = (f"named {desired.uplink!r}" if desired.uplink
                 else f"holding the primary underlay address {desired.uplink_addresses[0]}")
        raise ConfigError(
            f"no VPP interface {where}: give VPP its uplink first (uplink takeover, or "
            "`set interface ip address`), or set `uplink:` for this node in the mesh file")
    d = diff(desired, observed)
    changes = d.changes()
    if dry_run or not changes:
        return changes
    if ledger is not None:
        outbound = [s for s in (*d.create_sas, *d.replace_sas) if s.direction == "out"]
        reused = ledger.reused(outbound)
        if reused:
            peers = sorted({f"#{s.peer_number}" for s in reused})
            raise ReusedKeyError(
                f"{len(reused)} outbound key(s) towards peer(s) {', '.join(peers)} were "
                "installed in VPP before (VPP restarted, or its SAs were removed); installing "
                "them again would repeat AES-GCM nonces. Nothing was changed. Move the mesh "
                "to a new key epoch (`vppmesh rekey`, or raise settings.key_epoch).")
        ledger.record(outbound)
    Applier(api, desired, observed).run(d)
    return changes
