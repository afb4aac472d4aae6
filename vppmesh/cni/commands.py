"""The commands of vppmesh-cni: ADD, CHECK, DEL, GC and STATUS on one node's VPP and Linux.

The package's __init__ is the entry point (environment, stdin, JSON out); this module
does the work, so that VERSION and configuration errors answer without loading VPP's API
or netlink. Pods attach through vppmesh/host/endpoints.py like every other endpoint.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from vppmesh.cni.ipam import effective_ipam, parse_ipam_result, run_ipam
from vppmesh.cni.models import (
    ERR_CHECK,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_IO,
    ERR_IPAM,
    ERR_LINUX,
    ERR_NOT_AVAILABLE,
    ERR_NOT_AVAILABLE_LIMITED,
    ERR_TRY_AGAIN,
    ERR_VPP,
    Attachment,
    CniEnv,
    CniError,
    NetConf,
    Result,
    ResultInterface,
    ResultIp,
    ResultRoute,
)
from vppmesh.cni.store import AttachmentStore, attachment_key
from vppmesh.config import load_mesh
from vppmesh.dataplane.state import GATEWAY_ADDRESS, GATEWAY_TAG, HostLinkSpec
from vppmesh.dataplane.vpp import system
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.errors import ConfigError, HostError, VppApiError, VppMeshError, VppUnavailableError
from vppmesh.host import endpoints
from vppmesh.host import link as linux

log = logging.getLogger("vppmesh.cni")
CLIENT_NAME = "vppmesh-cni"
# Pod MACs derive from the address: unique within any pod CIDR up to a /18.
POD_INDEX_MASK = 0x3FFF
# VPP's tap_create_v3 takes the namespace as a string of at most 63 bytes.
TAP_NETNS_MAX = 63


@dataclass(frozen=True)
class MeshView:
    """What the plugin needs to know of the mesh on this node."""

    table_id: int
    mtu: int
    node_number: int
    pod_cidr: ipaddress.IPv4Network | None
    host_address: ipaddress.IPv4Address | None
    offloads: bool


def mesh_view(conf: NetConf) -> MeshView:
    if conf.mesh is None:
        assert conf.mesh_table is not None and conf.mtu is not None  # the model ensures it
        return MeshView(conf.mesh_table, conf.mtu, conf.node_number, None, None, False)
    node_name = conf.node or socket.gethostname()
    try:
        mesh = load_mesh(conf.mesh)
        node = mesh.node(node_name)
    except ConfigError as exc:
        raise CniError(ERR_INVALID_CONFIG, f"invalid network configuration: mesh: {exc}",
                       "fix `mesh` (the mesh file) or `node` (this node's name in it)") from None
    mtu = mesh.pod_mtu()
    if conf.mtu is not None and conf.mtu > mtu:
        raise CniError(ERR_INVALID_CONFIG, f"invalid network configuration: mtu: {conf.mtu} is "
                       f"larger than the mesh's pod MTU {mtu}; lower it or leave it out")
    return MeshView(mesh.settings.mesh_table_id, conf.mtu or mtu, node.node_number,
                    node.pod_cidr, node.mesh_address, mesh.settings.gso)


def as_cni_error(exc: BaseException) -> CniError:
    """Map vppmesh's errors to the spec's codes; 11 means the runtime should retry."""
    if isinstance(exc, CniError):
        return exc
    if isinstance(exc, endpoints.NotInMeshError):
        return CniError(ERR_TRY_AGAIN, str(exc), "the node agent has not joined the mesh yet")
    if isinstance(exc, VppUnavailableError):
        return CniError(ERR_TRY_AGAIN, str(exc),
                        "VPP is not answering on apiSocket; retry when it is up")
    if isinstance(exc, VppApiError):
        return CniError(ERR_VPP, str(exc))
    if isinstance(exc, HostError | NetlinkError):
        return CniError(ERR_LINUX, f"Linux side: {exc}")
    if isinstance(exc, ConfigError):
        return CniError(ERR_INVALID_CONFIG, str(exc))
    if isinstance(exc, VppMeshError):
        return CniError(ERR_VPP, str(exc))
    if isinstance(exc, OSError):
        return CniError(ERR_IO, f"I/O error: {exc}")
    return CniError(ERR_VPP, f"unexpected {type(exc).__name__}: {exc}")


@contextmanager
def vpp(conf: NetConf) -> Iterator[VppClient]:
    with VppClient(conf.api_socket, name=CLIENT_NAME).connect() as client:
        yield client


def pod_names(container_id: str, ifname: str) -> tuple[str, str]:
    """(endpoint name, VPP's veth end) of one attachment: stable, short, unique."""
    key = attachment_key(container_id, ifname)
    return f"cni-{key[:16]}", f"vpmc{key[:11]}"


def spec_of(record: Attachment) -> HostLinkSpec:
    return endpoints.pod_spec(
        name=record.name, netns=record.netns, address=record.address,
        node_number=record.node_number, pod_index=record.pod_index,
        linux_ifname=record.ifname, kind=record.kind, queues=record.queues,
        offloads=record.offloads, vpp_ifname=record.vpp_ifname)


def resolve_kind(conf: NetConf, env: CniEnv) -> str:
    if conf.attachment == "af_packet":
        return "af_packet"
    if not linux.tap_supported():
        if conf.attachment == "tap":
            raise CniError(ERR_INVALID_CONFIG, "invalid network configuration: attachment: "
                           "tap needs /dev/vhost-net, which this host lacks; use auto or "
                           "af_packet")
        log.warning("no usable /dev/vhost-net: pod %s gets a veth attached with af_packet "
                    "instead of a tap v2", env.container_id[:12])
        return "af_packet"
    if len(env.netns) > TAP_NETNS_MAX:
        raise CniError(ERR_INVALID_ENV, f"CNI_NETNS is longer than {TAP_NETNS_MAX} bytes, "
                       "more than VPP's tap can take", "use attachment: af_packet")
    return "tap"


class Plugin:
    """One invocation: the validated configuration and environment."""

    def __init__(self, conf: NetConf, env: CniEnv, environ: dict[str, str]) -> None:
        self.conf = conf
        self.env = env
        self.environ = environ
        self.store = AttachmentStore(conf.state_dir)

    def ipam_section(self, view: MeshView | None) -> dict[str, Any]:
        ipam = self.conf.ipam.model_dump(mode="json") if self.conf.ipam else None
        return effective_ipam(ipam, view.pod_cidr if view else None)

    def ipam(self, command: str, view: MeshView | None, *, record: Attachment | None = None,
             container_id: str | None = None, ifname: str | None = None
             ) -> dict[str, Any] | None:
        """Run the IPAM delegate, with the section a record was made with if there is one."""
        environ = dict(self.environ)
        if container_id is not None:
            environ["CNI_CONTAINERID"] = container_id
        if ifname is not None:
            environ["CNI_IFNAME"] = ifname
        conf = self.conf.model_dump(by_alias=True, exclude_none=True, mode="json")
        conf["ipam"] = record.ipam if record is not None and record.ipam \
            else self.ipam_section(view)
        return run_ipam(command, conf, environ, self.env.path)

    # ---- ADD ----------------------------------------------------------------------
    def add(self) -> dict[str, Any]:
        view = mesh_view(self.conf)
        env = self.env
        with self.store.locked(), vpp(self.conf) as api:
            record = self.store.load(env.container_id, env.ifname)
            fresh = record is None
            if record is None:
                kind = resolve_kind(self.conf, env)
                queues = 1
                if kind == "tap":
                    queues = self.conf.queues or max(1, system.worker_count(api))
                ipam = parse_ipam_result(self.ipam("ADD", view) or {})
                try:
                    address = ipam.ipv4()
                    self.check_address(address, view)
                    name, vpp_ifname = pod_names(env.container_id, env.ifname)
                    record = Attachment(
                        network=self.conf.name, container_id=env.container_id,
                        ifname=env.ifname, netns=env.netns, name=name, address=address,
                        kind=kind, node_number=view.node_number,  # type: ignore[arg-type]
                        pod_index=int(address) & POD_INDEX_MASK, vpp_ifname=vpp_ifname,
                        mesh_table=view.table_id, mtu=view.mtu, queues=queues,
                        offloads=view.offloads, pod=pod_labels(env),
                        ipam=self.ipam_section(view))
                    self.store.save(record)
                except BaseException:
                    self.quietly(lambda: self.ipam("DEL", view))
                    raise
            try:
                endpoints.attach(api, spec_of(record), table_id=record.mesh_table,
                                 mtu=record.mtu, default_route=True)
            except BaseException:
                if fresh:  # undo all of it: nothing half-attached stays behind
                    self.quietly(lambda: endpoints.detach(api, spec_of(record),
                                                          record.mesh_table))
                    self.quietly(lambda: self.ipam("DEL", view))
                    self.store.remove(env.container_id, env.ifname)
                raise
        log.info("ADD %s %s: %s %s/32 in %s (MTU %d, table %d)", env.container_id[:12],
                 env.ifname, record.kind, record.address, env.netns, record.mtu,
                 record.mesh_table)
        return self.result(record).to_json()

    def check_address(self, address: ipaddress.IPv4Address, view: MeshView) -> None:
        if view.pod_cidr is not None and address not in view.pod_cidr:
            raise CniError(ERR_IPAM, f"IPAM gave {address}, outside this node's pod CIDR "
                           f"{view.pod_cidr}", "fix ipam.ranges or leave them out")
        if address == view.host_address:
            raise CniError(ERR_IPAM, f"IPAM gave {address}, the node's own mesh address",
                           "start ipam.ranges after it (rangeStart)")

    def result(self, record: Attachment) -> Result:
        version = self.conf.cni_version
        gateway = str(GATEWAY_ADDRESS.ip)
        spec = spec_of(record)
        pod_if = ResultInterface(name=record.ifname, mac=spec.linux_mac, sandbox=record.netns,
                                 mtu=record.mtu if version == "1.1.0" else None)
        interfaces = [pod_if]
        if record.kind == "af_packet":
            # The host's veth end, with its Linux MAC (not VPP's: host.vpp_end_mac).
            interfaces.append(ResultInterface(name=spec.vpp_ifname,
                                              mac=linux.vpp_end_mac(spec.vpp_mac)))
        return Result(
            cniVersion=version, interfaces=interfaces,
            ips=[ResultIp(address=f"{record.address}/32", gateway=gateway, interface=0,
                          version="4" if version == "0.4.0" else None)],
            routes=[ResultRoute(dst="0.0.0.0/0", gw=gateway)],
            dns=self.conf.dns or Result().dns,
        )

    # ---- CHECK --------------------------------------------------------------------
    def check(self) -> None:
        env = self.env
        record = self.store.load(env.container_id, env.ifname)
        if record is None:
            raise CniError(ERR_CHECK, f"no attachment of container {env.container_id} on "
                           f"{env.ifname} in network {self.conf.name}")
        problems = []
        if record.netns != env.netns:
            problems.append(f"attached in {record.netns}, not in CNI_NETNS {env.netns}")
        prev = (self.conf.prev_result or {}).get("ips", [])
        addresses = {str(ip.get("address", "")).split("/")[0] for ip in prev}
        if prev and str(record.address) not in addresses:
            problems.append(f"prevResult does not hold the pod's address {record.address}")
        spec = spec_of(record)
        with vpp(self.conf) as api:
            problems += endpoints.vpp_side_problems(api, spec, table_id=record.mesh_table,
                                                    mtu=record.mtu)
        problems += linux.linux_side_problems(spec, record.mtu, default_route=True)
        if problems:
            raise CniError(ERR_CHECK, f"the attachment of {env.container_id[:12]} "
                           f"({record.address}) is not as ADD made it", "; ".join(problems))
        self.ipam("CHECK", None if record.ipam else mesh_view(self.conf), record=record)

    # ---- DEL ----------------------------------------------------------------------
    def delete(self) -> None:
        env = self.env
        with self.store.locked():
            record = self.store.load(env.container_id, env.ifname)
            try:
                view = mesh_view(self.conf)
            except CniError:
                if record is None:
                    raise
                view = None  # the record has all DEL needs: the mesh file may be gone
            self.undo(record, env.container_id, env.ifname, view)
            self.ipam("DEL", view, record=record)
            self.store.remove(env.container_id, env.ifname)
        log.info("DEL %s %s: %s", env.container_id[:12], env.ifname,
                 f"removed {record.address}" if record else "no record (nothing or leftovers)")

    def undo(self, record: Attachment | None, container_id: str, ifname: str,
             view: MeshView | None) -> None:
        """Remove VPP and Linux state of one attachment; fine if none is there."""
        if record is not None:
            spec, table = spec_of(record), record.mesh_table
        else:  # lost record: find it in VPP by its tag
            assert view is not None  # delete() has a view whenever the record is lost
            name, vpp_ifname = pod_names(container_id, ifname)
            spec = endpoints.pod_spec(
                name=name, netns=self.env.netns or "", address=ipaddress.IPv4Address(0),
                node_number=view.node_number, pod_index=0, linux_ifname=ifname,
                vpp_ifname=vpp_ifname)
            table = view.table_id
        if not self.conf.api_socket.exists():
            # No VPP runs: it holds nothing of the pod; only the veth (or the pod's
            # persistent tap) can be left.
            log.warning("no VPP API socket at %s: removing the Linux side only",
                        self.conf.api_socket)
            if spec.kind == "tap":
                endpoints.remove_leftover_tap(spec)
            else:
                linux.remove_link(spec.vpp_ifname)
            return
        with vpp(self.conf) as api:
            if record is None:
                spec = endpoints.recover_spec(api, spec) or spec
            endpoints.detach(api, spec, table)

    # ---- GC (1.1) -----------------------------------------------------------------
    def gc(self) -> None:
        valid_list = (self.conf.model_extra or {}).get("cni.dev/valid-attachments") or []
        valid = {(str(a.get("containerID")), str(a.get("ifname")))
                 for a in valid_list if isinstance(a, dict)}
        with self.store.locked():
            for record in self.store.all():
                if record.network != self.conf.name or \
                        (record.container_id, record.ifname) in valid:
                    continue
                self.undo(record, record.container_id, record.ifname, None)
                self.ipam("DEL", None, record=record, container_id=record.container_id,
                          ifname=record.ifname)
                self.store.remove(record.container_id, record.ifname)
                log.info("GC %s %s: removed %s", record.container_id[:12], record.ifname,
                         record.address)

    # ---- STATUS (1.1) -------------------------------------------------------------
    def status(self) -> None:
        try:
            with vpp(self.conf) as api:
                if GATEWAY_TAG not in endpoints.find_tagged(api, GATEWAY_TAG):
                    raise CniError(ERR_NOT_AVAILABLE, "this node is not in the mesh yet",
                                   "`vppmesh up` has not run against this VPP")
        except VppUnavailableError as exc:
            raise CniError(ERR_NOT_AVAILABLE_LIMITED, f"VPP is not available: {exc}",
                           "pods on this node have no mesh connectivity") from None

    @staticmethod
    def quietly(action: Any) -> None:
        try:
            action()
        except Exception as exc:  # cleanup after a failure: report the first error only
            log.warning("cleanup step failed: %s", exc)


def pod_labels(env: CniEnv) -> dict[str, str]:
    args = env.cni_args()
    return {k: v for k, v in args.items()
            if k in ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID")}


