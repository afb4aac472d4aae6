"""Uplink takeover: VPP drives the host's NIC, and the host keeps its network through VPP.

The NIC goes to VPP; the host gets a link with the NIC's name, MAC, MTU, addresses and
routes (a tap v2 with GSO/GRO coalescing and one queue pair per worker where
/dev/vhost-net exists, else a veth pair whose VPP end VPP opens with af_packet). VPP
joins the NIC, the host link and a BVI loopback in one L2 bridge domain: the host's
frames cross VPP untouched (ARP, DHCP, IPv6 ND keep working as before), and VPP's own
underlay addresses live on the BVI. The host's address therefore stays the host's:
VPP's underlay addresses must be others (the mesh wants several per node anyway).
Sharing one address between host and VPP would need punting (`ip punt redirect` or
linux-cp, which needs a tap); that is not built.

Drivers: `af_packet` and `af_xdp` (VPP's af_xdp plugin; in generic XDP mode on any
netdev, a veth too) leave the NIC a Linux netdev, renamed `<name>-nic` so the host link
can take its name; VPP opens it at takeover, and while VPP is away the agent gives it
back to Linux. `avf` and `dpdk` take the NIC at VPP start from startup.conf (`devices:` /
`dpdk_devices:` in the profile; VPP 26.06's iavf is a native device driver in the
vpp-drivers package): VPP binds it to vfio-pci and Linux no longer sees it. Its Linux
configuration must therefore be saved before VPP starts (`vppmesh uplink take` while VPP
is not running only saves it); takeover then finds VPP's port by the name the profile
gave it (`--vpp-interface`). Such a NIC cannot go back to Linux while VPP is away (it
stays bound to vfio-pci): restore gives it back once it is bound to its kernel driver
again.

Before anything is touched the NIC's Linux configuration is saved as JSON in the state
directory; `vppmesh uplink restore` (also run by `down`) puts it back exactly, with or
without a running VPP. Whatever stops VPP, release_all gives an af_packet/af_xdp NIC back
at once, run by what outlives VPP: `vppmesh vpp-run` (vpprun.py) in a container, the
vpp.service drop-in on a host, and the agent. VPP gets the host's gateway routes (IPv4)
through the BVI, so it reaches peers beyond the uplink's subnets the way the host did.

What differs by driver is a `Driver` (base.py), one module each (af_packet.py, af_xdp.py,
avf.py, dpdk.py); DRIVERS maps the configured name to it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vppmesh.dataplane.vpp import host_interfaces, interfaces, l2, routes
from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.errors import ConfigError, HostError
from vppmesh.host import link as linux
from vppmesh.host import preflight
from vppmesh.host.uplink.af_packet import AfPacket
from vppmesh.host.uplink.af_xdp import AfXdp
from vppmesh.host.uplink.avf import Avf
from vppmesh.host.uplink.base import IFF_PROMISC, Driver, set_promisc
from vppmesh.host.uplink.dpdk import Dpdk

UplinkDriver = Literal["af_packet", "af_xdp", "avf", "dpdk"]
DRIVERS: dict[str, Driver] = {d.name: d for d in (AfPacket(), AfXdp(), Avf(), Dpdk())}
NIC_IN_VPP = tuple(n for n, d in DRIVERS.items() if d.nic_in_vpp)  # startup.conf's NICs
HostLinkKind = Literal["auto", "tap", "veth"]
BRIDGE_DOMAIN = 7171
TAG_NIC = "vppmesh-uplink:nic"
TAG_HOST = "vppmesh-uplink:host"
TAG_BVI = "vppmesh-uplink:bvi"
LOCK_FILE = "uplink.lock"  # in the state directory: see locked()
RTPROT_KERNEL = 2
RT_TABLE_LOCAL = 255
RT_TABLE_MAIN = 254
# IFA_F_NODAD | IFA_F_HOMEADDRESS | IFA_F_MANAGETEMPADDR | IFA_F_NOPREFIXROUTE
ADDRESS_FLAGS = 0x02 | 0x10 | 0x100 | 0x200
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class UplinkSpec(BaseModel):
    """Which NIC VPP takes, with which driver, and VPP's own addresses on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    interface: str = Field(min_length=1, max_length=15)
    driver: UplinkDriver = "af_packet"
    vpp_interface: str | None = Field(
        default=None, description="avf/dpdk: VPP's name of the port (startup.conf).")
    vpp_addresses: tuple[IPInterface, ...] = ()
    host_link: HostLinkKind = "auto"
    queues: int = Field(default=1, ge=1, le=64)


class SavedAddress(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: int
    address: str
    prefixlen: int
    scope: int = 0
    broadcast: str | None = None
    flags: int = 0  # the IFA_F_* flags an address can be created with (nodad, ...)


class SavedRoute(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: int
    dst: str | None  # None: the default route
    dst_len: int
    table: int
    gateway: str | None = None
    prefsrc: str | None = None
    priority: int | None = None
    proto: int
    scope: int
    type: int


class SavedUplink(BaseModel):
    """The NIC's Linux configuration before takeover, and what takeover made of it."""

    model_config = ConfigDict(extra="forbid")
    spec: UplinkSpec
    ifname: str
    mac: str
    mtu: int
    up: bool
    promisc: bool
    addresses: list[SavedAddress]
    routes: list[SavedRoute]
    nic_name: str  # the NIC's name while VPP has it
    host_link: Literal["tap", "veth"]
    # False: only saved (avf/dpdk before VPP starts, or after VPP went away); the takeover
    # is still to be made.
    taken: bool = True

    @property
    def gateway_routes(self) -> list[SavedRoute]:
        """The host's IPv4 routes through a gateway in its main table, which VPP gets."""
        return [r for r in self.routes if r.family == socket.AF_INET and r.gateway
                and r.table == RT_TABLE_MAIN]

    @property
    def veth_peer(self) -> str:
        return f"{self.ifname[:11]}-vpp"


def driver_for(spec: UplinkSpec) -> Driver:
    """The driver the spec names."""
    return DRIVERS[spec.driver]


def state_file(state_dir: Path, ifname: str) -> Path:
    return state_dir / f"uplink-{ifname}.json"


def nic_name(ifname: str) -> str:
    return f"{ifname[:11]}-nic"


def bvi_mac(mac: str) -> str:
    """VPP's own MAC on the bridge: locally administered, derived from the NIC's."""
    return "02:fe:ff:" + mac.split(":", 3)[3]


def host_vpp_mac(mac: str) -> str:
    """VPP's end of the host link."""
    return "02:fe:fe:" + mac.split(":", 3)[3]


def resolve_host_link(kind: HostLinkKind) -> Literal["tap", "veth"]:
    if kind == "auto":
        return "tap" if linux.tap_supported() else "veth"
    if kind == "tap" and not linux.tap_supported():
        raise ConfigError("--host-link tap needs /dev/vhost-net (modprobe vhost_net); this "
                          "host lacks it: use veth (af_packet) instead")
    return kind


# ---- Linux ----------------------------------------------------------------------------
def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def capture(ifname: str, spec: UplinkSpec, host_link: Literal["tap", "veth"]) -> SavedUplink:
    """The NIC's link, addresses and routes (every table but `local`)."""
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        if index is None:
            raise HostError(f"uplink {ifname!r} not found in this namespace; name the NIC "
                            "that carries the host's address"
                            f"{driver_for(spec).not_found_hint(ifname)}")
        link = ipr.get_links(index)[0]
        addresses = [
            SavedAddress(family=a["family"], address=a.get_attr("IFA_ADDRESS"),
                         prefixlen=a["prefixlen"], scope=a["scope"],
                         broadcast=a.get_attr("IFA_BROADCAST"),
                         flags=(a.get_attr("IFA_FLAGS") or a["flags"]) & ADDRESS_FLAGS)
            for a in ipr.get_addr(index=index)]
        routes: list[SavedRoute] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=family):
                table = r.get_attr("RTA_TABLE") or r["table"]
                if r.get_attr("RTA_OIF") != index or table == RT_TABLE_LOCAL:
                    continue
                routes.append(SavedRoute(
                    family=family, dst=r.get_attr("RTA_DST"), dst_len=r["dst_len"],
                    table=table, gateway=r.get_attr("RTA_GATEWAY"),
                    prefsrc=r.get_attr("RTA_PREFSRC"), priority=r.get_attr("RTA_PRIORITY"),
                    proto=r["proto"], scope=r["scope"], type=r["type"]))
    return SavedUplink(spec=spec, ifname=ifname, mac=link.get_attr("IFLA_ADDRESS"),
                       mtu=link.get_attr("IFLA_MTU"), up=bool(link["flags"] & 1),
                       promisc=bool(link["flags"] & IFF_PROMISC), addresses=addresses,
                       routes=routes, nic_name=nic_name(ifname), host_link=host_link)


def apply_addresses_and_routes(ipr: Any, index: int, saved: SavedUplink) -> None:
    """Put the saved addresses, then the saved (non-kernel) routes, on link `index`."""
    for a in saved.addresses:
        if a.family == socket.AF_INET6 and ipaddress.ip_address(a.address).is_link_local:
            continue  # the kernel makes it again from the MAC
        extra: dict[str, Any] = {"broadcast": a.broadcast} if a.broadcast else {}
        if a.flags:
            extra["flags"] = a.flags
        try:
            ipr.addr("add", index=index, address=a.address, prefixlen=a.prefixlen,
                     scope=a.scope, **extra)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST
                raise
    for r in saved.routes:
        if r.proto == RTPROT_KERNEL:
            continue  # made again by the addresses above
        args: dict[str, Any] = {"family": r.family, "dst_len": r.dst_len, "table": r.table,
                                "oif": index, "proto": r.proto, "scope": r.scope,
                                "type": r.type}
        if r.dst is not None:
            args["dst"] = r.dst
        for name in ("gateway", "prefsrc", "priority"):
            if getattr(r, name) is not None:
                args[name] = getattr(r, name)
        ipr.route("replace", **args)


# ---- VPP ------------------------------------------------------------------------------
def nic_request(saved: SavedUplink) -> Request | None:
    """The API call that gives VPP the NIC (None: startup.conf gave it at VPP start)."""
    return driver_for(saved.spec).request(saved)


def save(spec: UplinkSpec, state_dir: Path) -> SavedUplink:
    """Record the NIC's Linux configuration only (avf/dpdk, before VPP binds the NIC)."""
    driver_for(spec).check(spec)
    path = state_file(state_dir, spec.interface)
    if path.exists():
        return SavedUplink.model_validate_json(path.read_text())
    saved = capture(spec.interface, spec, resolve_host_link(spec.host_link))
    _check_addresses(saved)
    saved.taken = False
    state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(saved.model_dump_json(indent=2))
    return saved


def _check_addresses(saved: SavedUplink) -> None:
    """VPP's addresses on the bridge are none of the host's: neither on a Linux link of
    this namespace now nor among the NIC's saved ones (the host link gets those)."""
    held = {**preflight.host_addresses(),
            **{ipaddress.ip_address(a.address): saved.ifname for a in saved.addresses}}
    preflight.refuse_host_addresses(saved.spec.vpp_addresses, f"uplink {saved.ifname}", held)


def _check_mtu(saved: SavedUplink, underlay_mtu: int | None) -> None:
    """VPP's side of the bridge gets the NIC's MTU: the underlay must fit in it."""
    if underlay_mtu is not None:
        preflight.refuse_mtu_above(
            underlay_mtu, saved.mtu, f"the uplink NIC {saved.ifname}",
            f"raise the NIC's MTU (and the switch ports') before vppmesh takes it: `ip link "
            f"set {saved.ifname} mtu {underlay_mtu}`")


def take(api: VppApi, spec: UplinkSpec, state_dir: Path, *,
         underlay_mtu: int | None = None) -> SavedUplink:
    """Hand the NIC to VPP and give the host its network back; idempotent per NIC.

    Refused before anything is touched when VPP's addresses are the host's own or
    `underlay_mtu` (the mesh's settings.underlay_mtu) is above the NIC's MTU."""
    driver_for(spec).check(spec)
    path = state_file(state_dir, spec.interface)
    if path.exists():
        saved = SavedUplink.model_validate_json(path.read_text())
        if saved.taken:
            return saved
        # Saved before VPP started (avf, dpdk): this run's options name VPP's side.
        saved = saved.model_copy(update={"spec": spec})
    else:
        saved = capture(spec.interface, spec, resolve_host_link(spec.host_link))
        state_dir.mkdir(parents=True, exist_ok=True)
    _check_addresses(saved)
    _check_mtu(saved, underlay_mtu)
    path.write_text(saved.model_dump_json(indent=2))  # before anything is touched
    try:
        _take(api, saved)
    except BaseException:
        restore(api, state_dir, spec.interface)
        raise
    saved.taken = True
    path.write_text(saved.model_dump_json(indent=2))
    return saved


def _take(api: VppApi, saved: SavedUplink) -> None:
    driver = driver_for(saved.spec)
    with IPRoute() as ipr:
        index = _index(ipr, saved.ifname)
        if index is not None:
            driver.hand_over(ipr, index, saved)
    nic = driver.vpp_port(api, saved)
    # The host's link, named like the NIC.
    if saved.host_link == "tap":
        host = api.call(host_interfaces.create_tap(
            saved.ifname, host_vpp_mac(saved.mac), saved.mac,
            saved.mtu, saved.spec.queues, None, TAG_HOST)).sw_if_index
    else:
        linux.ensure_veth(saved.ifname, saved.veth_peer, linux_mac=saved.mac,
                          vpp_mac=host_vpp_mac(saved.mac),
                          mtu=saved.mtu)
        host = api.call(host_interfaces.create_af_packet(
            saved.veth_peer, host_vpp_mac(saved.mac),
            saved.spec.queues)).sw_if_index
    bvi = api.call(interfaces.create_loopback(bvi_mac(saved.mac), "uplink BVI")).sw_if_index
    batch = [interfaces.set_tag(nic, TAG_NIC), interfaces.set_tag(bvi, TAG_BVI),
             l2.bridge_domain(BRIDGE_DOMAIN, True, "vppmesh-uplink")]
    # Always tagged here: VPP 26.06 keeps tap_create_v3's tag without its NUL
    # (plugins/tap/tapv2_api.c:216-220), so a dump would read past its end.
    batch.append(interfaces.set_tag(host, TAG_HOST))
    for index, what in ((nic, "uplink NIC"), (host, "host link"), (bvi, "uplink BVI")):
        batch += [interfaces.set_mtu(index, saved.mtu, what),
                  l2.bridge_port(index, BRIDGE_DOMAIN, bvi=index == bvi, what=what)]
    if saved.host_link == "tap":
        batch.append(host_interfaces.tap_rx_mode(host, "host link"))
        # The host's large segments (tap GSO) cross the bridge as they are: the NIC's
        # output segments them (af_packet and most NICs take no large frame from VPP).
        batch.append(interfaces.gso_feature(nic, True, "uplink NIC"))
    batch += [interfaces.address(bvi, a, True) for a in saved.spec.vpp_addresses]
    batch += [interfaces.set_admin(i, True) for i in (nic, host, bvi)]
    api.call_many(batch)
    # The host's way to the rest of the underlay is VPP's too (peers beyond the subnet).
    api.call_many([routes.route(0, _prefix(r), [bvi], True,
                                nexthop=ipaddress.IPv4Address(str(r.gateway)))
                   for r in saved.gateway_routes])
    # Linux: the host link takes over the NIC's addresses and routes.
    with IPRoute() as ipr:
        index = _index(ipr, saved.ifname)
        if index is None:
            raise HostError(f"the host link {saved.ifname} did not appear")
        ipr.link("set", index=index, mtu=saved.mtu, state="up" if saved.up else "down")
        apply_addresses_and_routes(ipr, index, saved)


def _prefix(route: SavedRoute) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{route.dst or '0.0.0.0'}/{route.dst_len}")


def bvi_name(api: VppApi) -> str | None:
    """VPP's name of the uplink BVI (give it to `vppmesh up --uplink`)."""
    return next((i.name for i in interfaces.dump_interfaces(api) if i.tag == TAG_BVI), None)


def restore(api: VppApi | None, state_dir: Path, ifname: str) -> list[str]:
    """Undo the takeover of `ifname` from its saved JSON; VPP may be gone (api None)."""
    path = state_file(state_dir, ifname)
    if not path.exists():
        return []
    saved = SavedUplink.model_validate_json(path.read_text())
    driver = driver_for(saved.spec)
    done: list[str] = []
    if api is not None:
        found = {i.tag: i for i in interfaces.dump_interfaces(api)
                 if i.tag.startswith("vppmesh-uplink:")}
        batch: list[Request] = []
        for tag in (TAG_NIC, TAG_HOST, TAG_BVI):
            if tag in found:
                batch.append(l2.bridge_port(found[tag].sw_if_index, BRIDGE_DOMAIN,
                                            bvi=tag == TAG_BVI, enable=False))
        if saved.host_link == "tap" and TAG_NIC in found:
            # A NIC that stays in VPP (avf, dpdk) goes back to its own output path.
            batch.append(interfaces.gso_feature(found[TAG_NIC].sw_if_index, False,
                                                "uplink NIC"))
        api.call_many(batch)
        api.call(l2.bridge_domain(BRIDGE_DOMAIN, False))
        if TAG_BVI in found:
            api.call_many([routes.route(0, _prefix(r), [found[TAG_BVI].sw_if_index], False,
                                        nexthop=ipaddress.IPv4Address(str(r.gateway)))
                           for r in saved.gateway_routes])
            api.call(interfaces.delete_loopback(found[TAG_BVI].sw_if_index))
        if saved.host_link == "tap":
            host = found.get(TAG_HOST) or next(
                (i for i in interfaces.dump_interfaces(api) if i.name.startswith("tap")
                 and i.tag == TAG_HOST), None)
            if host is not None:
                api.call(host_interfaces.delete_tap(host.sw_if_index))
        # Only what VPP still has: a second restore (avf/dpdk: after the NIC came back to
        # Linux) finds VPP's side gone, and VPP refuses to delete a missing af_packet.
        opened = host_interfaces.dump_af_packet(api)
        if saved.host_link == "veth" and saved.veth_peer in opened:
            api.call(host_interfaces.delete_af_packet(saved.veth_peer))
        driver.delete_port(api, saved, found[TAG_NIC].sw_if_index if TAG_NIC in found
                           else None, opened)
        done.append("VPP: uplink bridge, BVI, host link and NIC interface")
    if saved.host_link == "veth" and linux.remove_link(saved.veth_peer):
        done.append(f"linux link {saved.ifname} (host veth)")
    with IPRoute() as ipr:
        index = _index(ipr, saved.nic_name)
        if index is not None:
            ipr.link("set", index=index, state="down")
            ipr.link("set", index=index, ifname=saved.ifname)
        index = _index(ipr, saved.ifname)
        if index is None:
            return done + driver.not_in_linux(saved, path)
        set_promisc(ipr, index, saved.promisc)
        ipr.link("set", index=index, mtu=saved.mtu, address=saved.mac)
        if saved.up:
            ipr.link("set", index=index, state="up")
        apply_addresses_and_routes(ipr, index, saved)
        done.append(f"linux link {saved.ifname}: name, MAC, MTU, addresses and routes")
    path.unlink()
    return done


def saved_uplinks(state_dir: Path) -> list[str]:
    """The NICs whose takeover is recorded in `state_dir`."""
    return sorted(json.loads(p.read_text())["ifname"]
                  for p in state_dir.glob("uplink-*.json"))


def ensure(api: VppApi, spec: UplinkSpec, state_dir: Path, primary: IPInterface, *,
           underlay_mtu: int | None = None) -> str:
    """For `vppmesh up`: the NIC is VPP's (taking it if needed); returns the BVI's name.

    VPP's address on the uplink is the node's primary underlay address unless the spec
    names others. After a VPP restart the saved takeover no longer matches VPP: the NIC
    is given back first, then taken again.
    """
    if not spec.vpp_addresses:
        spec = spec.model_copy(update={"vpp_addresses": (primary,)})
    name = bvi_name(api)
    path = state_file(state_dir, spec.interface)
    if path.exists() and name is None:
        driver_for(spec).vpp_restarted(SavedUplink.model_validate_json(path.read_text()), path,
                                       lambda: restore(None, state_dir, spec.interface))
    if name is None:
        take(api, spec, state_dir, underlay_mtu=underlay_mtu)
        name = bvi_name(api)
    if name is None:
        raise HostError(f"uplink takeover of {spec.interface}: no BVI in VPP afterwards")
    return name


@contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """One giver-back at a time. VPP's guard (`vppmesh vpp-run`, vpprun.py), the agent and
    `uplink restore` may all see the same VPP go (a rolling update stops VPP and the agent
    together): the second waits, then finds the NIC already back instead of renaming and
    readdressing it half-way through the first one's work."""
    with open(state_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def releasable(state_dir: Path) -> list[str]:
    """The saved NICs Linux can have back while VPP is away (af_packet, af_xdp)."""
    return [ifname for ifname in saved_uplinks(state_dir)
            if not driver_for(SavedUplink.model_validate_json(
                state_file(state_dir, ifname).read_text()).spec).nic_in_vpp]


def release_all(state_dir: Path) -> list[str]:
    """VPP is gone: give every NIC it had back to Linux, so the host stays online.

    An avf/dpdk NIC stays bound to vfio-pci: nothing can give it to Linux meanwhile;
    its takeover is made again when VPP is back.
    """
    if not state_dir.is_dir():
        return []
    done: list[str] = []
    with locked(state_dir):
        for ifname in saved_uplinks(state_dir):
            saved = SavedUplink.model_validate_json(state_file(state_dir, ifname).read_text())
            done += driver_for(saved.spec).vpp_gone(
                saved, partial(restore, None, state_dir, ifname))
    return done
