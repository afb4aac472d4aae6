"""One node's agent: load the mesh, plan, reconcile VPP and Linux, report.

The CLI is a thin shell over these functions; the testbed and the benchmarks call them
too, so every path a user takes is the path the tests take.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from vppmesh import host as linux
from vppmesh import uplink as nic
from vppmesh.config import Mesh, load_mesh
from vppmesh.keys import NodeSecrets, load_secrets
from vppmesh.ledger import KeyLedger
from vppmesh.plan import HostOptions, plan
from vppmesh.reconcile import Change, reconcile
from vppmesh.state import DesiredState
from vppmesh.teardown import teardown
from vppmesh.uplink import UplinkSpec
from vppmesh.vpp import ipsec, system
from vppmesh.vpp.client import DEFAULT_API_SOCKET, VppApi, VppClient

HostLinkKind = Literal["auto", "tap", "af_packet", "none"]


@dataclass(frozen=True)
class NodeOptions:
    """Where this node finds its mesh, its keys and its VPP."""

    mesh_file: Path
    node: str
    private_key: Path
    api_socket: Path = DEFAULT_API_SOCKET
    host_link: HostLinkKind = "auto"
    uplink: str | None = None
    workers: int | None = None  # None: ask VPP
    state_dir: Path = Path("/var/lib/vppmesh")
    take_uplink: UplinkSpec | None = None  # hand this NIC to VPP first (uplink.py)

    @property
    def ledger(self) -> KeyLedger:
        return KeyLedger(self.state_dir / f"{self.node}.used-keys.json")


@dataclass
class UpResult:
    desired: DesiredState
    changes: list[Change]
    seconds: float
    host_link: str
    messages: int = 0
    notes: list[str] = field(default_factory=list)


def resolve_host_kind(kind: HostLinkKind) -> Literal["tap", "af_packet", "none"]:
    if kind == "auto":
        return "tap" if linux.tap_supported() else "af_packet"
    return kind


def load_inputs(options: NodeOptions, mesh: Mesh | None = None) -> tuple[Mesh, NodeSecrets]:
    """The mesh (from the mesh file unless given, e.g. from the datastore) and the keys."""
    mesh = mesh or load_mesh(options.mesh_file)
    mesh.node(options.node)  # fail early, naming the node, if it is not in the mesh
    return mesh, load_secrets(options.private_key, mesh.settings.psk_file)


def desired_state(options: NodeOptions, mesh: Mesh, secrets: NodeSecrets, workers: int,
                  epochs: tuple[int, ...] | None = None) -> DesiredState:
    local = mesh.node(options.node)
    if secrets.public_key_b64() != local.public_key:
        from vppmesh.errors import KeyFileError

        raise KeyFileError(
            f"the private key in {options.private_key} does not match the public_key of node "
            f"{options.node} in {options.mesh_file}; publish `vppmesh pubkey` output there")
    kind = resolve_host_kind(options.host_link)
    return plan(mesh, options.node, secrets, workers=workers,
                host=HostOptions(kind=kind, queues=max(1, workers)), epochs=epochs,
                uplink=options.uplink)


def apply(api: VppApi, desired: DesiredState, *, dry_run: bool = False,
          ledger: KeyLedger | None = None) -> list[Change]:
    """Reconcile VPP, with the Linux end of the host link prepared before and after."""
    host = desired.host
    if not dry_run and host is not None and host.kind == "af_packet":
        linux.ensure_veth(host.linux_ifname, host.vpp_ifname, linux_mac=host.linux_mac,
                          vpp_mac=host.vpp_mac, mtu=desired.mtu, linux_netns=host.netns)
    changes = reconcile(api, desired, dry_run=dry_run, ledger=ledger)
    if not dry_run and host is not None:
        linux.configure_linux_side(host, desired.mtu)
    return changes


def up(options: NodeOptions, *, dry_run: bool = False, api: VppApi | None = None,
       mesh: Mesh | None = None) -> UpResult:
    mesh, secrets = load_inputs(options, mesh)
    started = time.monotonic()
    client = api or VppClient(options.api_socket).connect()
    try:
        workers = options.workers if options.workers is not None else system.worker_count(client)
        if options.take_uplink is not None:
            # One queue pair per worker on the NIC and on the host's link.
            spec = options.take_uplink.model_copy(update={"queues": max(1, workers)})
            bvi = nic.bvi_name(client) if dry_run else nic.ensure(
                client, spec, options.state_dir, mesh.node(options.node).primary)
            options = replace(options, uplink=bvi or options.uplink)
        desired = desired_state(options, mesh, secrets, workers)
        if not dry_run:
            client.call(ipsec.set_async_mode(mesh.settings.async_crypto))
        changes = apply(client, desired, dry_run=dry_run, ledger=options.ledger)
        return UpResult(desired=desired, changes=changes, seconds=time.monotonic() - started,
                        host_link=desired.host.kind if desired.host else "none",
                        messages=client.messages_sent)
    finally:
        if api is None:
            client.close()  # type: ignore[union-attr]


def down(options: NodeOptions, *, api: VppApi | None = None,
         mesh: Mesh | None = None) -> list[str]:
    """Remove the mesh from VPP and the host link from Linux."""
    mesh = mesh or load_mesh(options.mesh_file)
    local = mesh.node(options.node)
    client = api or VppClient(options.api_socket).connect()
    try:
        removed = teardown(client, mesh.settings.mesh_table_id, tuple(local.underlay[1:]))
        for ifname in nic.saved_uplinks(options.state_dir):
            removed += nic.restore(client, options.state_dir, ifname)
    finally:
        if api is None:
            client.close()  # type: ignore[union-attr]
    from vppmesh.plan import HOST_LINUX_IFNAME, HOST_VETH_PEER

    for name in (HOST_VETH_PEER, HOST_LINUX_IFNAME):
        if linux.remove_link(name):
            removed.append(f"linux link {name}")
    return removed
