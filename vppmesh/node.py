"""One node's agent: load the mesh, plan, reconcile VPP and Linux, report.

The CLI is a thin shell over these functions; the testbed and the benchmarks call them
too, so every path a user takes is the path the tests take.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from vppmesh import engines, epochs, guard
from vppmesh import host as linux
from vppmesh import uplink as nic
from vppmesh.cni.reattach import DEFAULT_CNI_PATH, PodReport, reattach
from vppmesh.config import Mesh, load_mesh
from vppmesh.epochs import GenerationState, GenerationStore, PeerKeying, PeerObservation
from vppmesh.errors import VppUnavailableError
from vppmesh.keys import NodeSecrets, derive_sa_key, load_secrets, pair_secret, spi_for
from vppmesh.ledger import KeyLedger
from vppmesh.plan import HostOptions, plan
from vppmesh.reconcile import Change, Reconciler, reconcile
from vppmesh.state import DesiredState, sa_id_for
from vppmesh.teardown import teardown
from vppmesh.underlay import encapsulation, path
from vppmesh.uplink import UplinkSpec
from vppmesh.vpp import interfaces, ipsec, system
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
    crypto_engine: str = engines.AUTO  # AES-GCM-256 engine (vppmesh/engines.py)
    # The CNI plugin's attachment records (its stateDir): pods the agent re-attaches
    # after a VPP restart. None: the agent leaves pods alone.
    cni_state_dir: Path | None = None
    cni_path: tuple[Path, ...] = DEFAULT_CNI_PATH

    @property
    def ledger(self) -> KeyLedger:
        return KeyLedger(self.state_dir / f"{self.node}.used-keys.json")

    @property
    def generations(self) -> GenerationStore:
        return GenerationStore(self.state_dir, self.node)


@dataclass
class UpResult:
    desired: DesiredState
    changes: list[Change]
    seconds: float
    host_link: str
    messages: int = 0
    notes: list[str] = field(default_factory=list)
    vpp_pid: int | None = None
    # Peers left out because no key may be used towards them (their traffic is dropped).
    blocked_peers: list[str] = field(default_factory=list)
    # Peers whose requested rekey waits until they have surely followed the last one.
    rekey_pending: list[str] = field(default_factory=list)
    # The engine running AES-GCM-256 (None: not looked at in this run, or unknown).
    crypto_engine: str | None = None
    # The pass over the CNI records (Session only, on its full runs); None if none ran.
    pod_report: PodReport | None = None
    mesh: Mesh | None = None  # the mesh this run applied (file or datastore)


def resolve_host_kind(kind: HostLinkKind) -> Literal["tap", "af_packet", "none"]:
    if kind == "auto":
        return "tap" if linux.tap_supported() else "af_packet"
    return kind


def load_inputs(options: NodeOptions, mesh: Mesh | None = None) -> tuple[Mesh, NodeSecrets]:
    """The mesh (from the mesh file unless given, e.g. from the datastore) and the keys."""
    mesh = mesh or load_mesh(options.mesh_file)
    mesh.node(options.node)  # fail early, naming the node, if it is not in the mesh
    return mesh, load_secrets(options.private_key, mesh.settings.psk_file)


def datastore_mesh(url: str | None) -> Mesh | None:
    """The mesh as the datastore holds it now (None without --datastore)."""
    if url is None:
        return None
    from vppmesh.datastore.agent import current_mesh
    from vppmesh.datastore.records import DatastoreUrl

    return current_mesh(DatastoreUrl.parse(url))


def desired_state(options: NodeOptions, mesh: Mesh, secrets: NodeSecrets, workers: int,
                  epochs: tuple[int, ...] | None = None,
                  keying: dict[str, PeerKeying] | None = None) -> DesiredState:
    local = mesh.node(options.node)
    if secrets.public_key_b64() != local.public_key:
        from vppmesh.errors import KeyFileError

        raise KeyFileError(
            f"the private key in {options.private_key} does not match the public_key of node "
            f"{options.node} in {options.mesh_file}; publish `vppmesh pubkey` output there")
    kind = resolve_host_kind(options.host_link)
    return plan(mesh, options.node, secrets, workers=workers,
                host=HostOptions(kind=kind, queues=max(1, workers)), epochs=epochs,
                uplink=options.uplink, keying=keying)


def apply(api: VppApi, desired: DesiredState, *, dry_run: bool = False,
          ledger: KeyLedger | None = None, reconciler: Reconciler | None = None,
          full: bool = False) -> list[Change]:
    """Reconcile VPP, with the Linux end of the host link prepared before and after.

    With a `reconciler` (kept by a long-running agent), only what changed since its last
    run is compared and applied, unless `full`.
    """
    host = desired.host
    if not dry_run and host is not None and host.kind == "af_packet":
        linux.ensure_veth(host.linux_ifname, host.vpp_ifname, linux_mac=host.linux_mac,
                          vpp_mac=host.vpp_mac, mtu=desired.mtu, linux_netns=host.netns)
    if reconciler is not None:
        changes = reconciler.reconcile(desired, dry_run=dry_run, ledger=ledger, full=full)
    else:
        changes = reconcile(api, desired, dry_run=dry_run, ledger=ledger)
    if not dry_run and host is not None:
        linux.configure_linux_side(host, desired.mtu)
    return changes


def observe_keys(api: VppApi, mesh: Mesh, local: str, secrets: NodeSecrets,
                 state: GenerationState, ledger: KeyLedger,
                 ) -> tuple[dict[str, PeerObservation], Callable[[str, int], bool]]:
    """What VPP's SAs say about each peer's generations, and a used-key test per peer."""
    count = mesh.settings.tunnels_per_peer
    me = mesh.node(local)
    sas = {s.spec.sa_id: s for s in ipsec.dump_sas(api)}
    shared_by_name = {}
    observations = {}
    numbers = {}
    for peer in mesh.peers_of(local):
        numbers[peer.name] = peer.node_number
        shared = shared_by_name[peer.name] = pair_secret(secrets, peer.public_key_bytes)
        pg = state.peers.get(peer.name)
        if pg is None or pg.public_key != peer.public_key:
            continue
        out = [sas.get(sa_id_for("out", peer.node_number, t, pg.out)) for t in range(count)]
        installed = all(
            sa is not None and sa.spec.spi == spi_for(me.node_number, t, pg.out)
            and sa.spec.key.get_secret_value() == derive_sa_key(
                shared, secrets.psk, sender=local, receiver=peer.name, tunnel=t,
                epoch=pg.out).key.get_secret_value()
            for t, sa in enumerate(out))
        pair = path(me, peer, count)
        reencapsulate = installed and any(
            sa is not None and encapsulation(sa.spec) != pair.encapsulation for sa in out)
        active = frozenset(
            g for g in pg.window for t in range(count)
            if (sa := sas.get(sa_id_for("in", peer.node_number, t, g))) is not None
            and sa.spec.spi == spi_for(peer.node_number, t, g) and sa.last_seq_inbound > 0)
        observations[peer.name] = PeerObservation(
            out_installed=installed,
            out_packets=max((sa.seq_outbound for sa in out if sa is not None), default=0),
            inbound_active=active,
            inbound_seq={g: sum(sa.last_seq_inbound for t in range(count)
                                if (sa := sas.get(sa_id_for("in", peer.node_number, t, g)))
                                is not None) for g in pg.window},
            encapsulation_changed=reencapsulate)

    def key_used(peer: str, generation: int) -> bool:
        for t in range(count):
            key = derive_sa_key(shared_by_name[peer], secrets.psk, sender=local, receiver=peer,
                                tunnel=t, epoch=generation)
            if ledger.seen(key.key.get_secret_value(), key.salt):
                return True
        return False

    return observations, key_used


def up(options: NodeOptions, *, dry_run: bool = False, api: VppApi | None = None,
       rekey: bool = False, now: float | None = None, mesh: Mesh | None = None,
       reconciler: Reconciler | None = None, full: bool = False) -> UpResult:
    """Plan and apply this node's part of the mesh, with key generations advanced first.

    The generation file is read and written under its lock, so `vppmesh rekey` and a
    running `up --watch` never choose generations from a stale copy.
    """
    mesh, secrets = load_inputs(options, mesh)
    started = time.monotonic()
    client = api or VppClient(options.api_socket).connect()
    store = options.generations
    try:
        with store.locked():
            pid = system.vpp_pid(client)
            workers = (options.workers if options.workers is not None
                       else system.worker_count(client))
            if options.take_uplink is not None:
                # One queue pair per worker on the NIC and on the host's link.
                spec = options.take_uplink.model_copy(update={"queues": max(1, workers)})
                bvi = nic.bvi_name(client) if dry_run else nic.ensure(
                    client, spec, options.state_dir, mesh.node(options.node).primary)
                options = replace(options, uplink=bvi or options.uplink)
            state = store.load()
            before = state.model_dump()
            if rekey:
                epochs.request_rekey(state)
            observations, key_used = observe_keys(client, mesh, options.node, secrets, state,
                                                  options.ledger)
            peers = {p.name: p.public_key for p in mesh.peers_of(options.node)}
            keying, notes = epochs.schedule(state, mesh.settings, peers, observations,
                                            now=time.time() if now is None else now,
                                            key_used=key_used)
            desired = desired_state(options, mesh, secrets, workers, keying=keying)
            if not dry_run:
                client.call(ipsec.set_async_mode(mesh.settings.async_crypto))
            changes = []
            engine = None
            if reconciler is None or full:  # node-wide: at start, after a restart, resyncs
                choice = engines.ensure(client, options.crypto_engine, dry_run=dry_run,
                                        vpp_pid=pid)
                changes, engine = choice.changes, choice.engine
                if choice.warning:
                    notes.append(choice.warning)
            uplink, _ = interfaces.find_uplink(client, desired.uplink,
                                               desired.uplink_addresses[0])
            if uplink is not None and uplink.admin_up and not uplink.link_up:
                notes.append(f"uplink {uplink.name} is up but has no link (cable, switch "
                             "port, or the NIC's driver): no peer is reachable through it")
            if uplink is not None:  # else reconcile() explains what is missing
                for version in sorted({a.version for a in desired.uplink_addresses}):
                    changes += guard.ensure(client, uplink.sw_if_index, version,
                                            dry_run=dry_run)
            changes += apply(client, desired, dry_run=dry_run, ledger=options.ledger,
                             reconciler=reconciler, full=full)
            if not dry_run and state.model_dump() != before:
                store.save(state)
        return UpResult(desired=desired, changes=changes, seconds=time.monotonic() - started,
                        host_link=desired.host.kind if desired.host else "none",
                        messages=client.messages_sent, notes=notes, vpp_pid=pid,
                        blocked_peers=sorted(set(peers) - set(keying)), mesh=mesh,
                        rekey_pending=sorted(n for n in peers if state.peers[n].rekey_pending),
                        crypto_engine=engine)
    finally:
        if api is None:
            client.close()  # type: ignore[union-attr]


class Session:
    """What `up --watch` keeps between polls: one VPP connection and what VPP holds.

    Each poll runs `up` as before (key generations advance, SAs are observed), but the
    reconcile compares the new plan with the last one and applies only the peers that
    changed, from the remembered state. Every `full_every` seconds, after any error and
    after a reconnect, it dumps VPP again, which also catches changes made behind the
    agent's back. A VPP restart breaks the connection: that poll fails with
    VppUnavailableError and the next one reconnects.

    On those full runs it also re-attaches the CNI plugin's pods that VPP lost (after a
    restart: all of them) and collects the records of pods that are gone
    (vppmesh/cni/reattach.py).
    """

    def __init__(self, options: NodeOptions, *, full_every: float = 60.0,
                 connect: Callable[[], VppClient] | None = None) -> None:
        self.options = options
        self.full_every = full_every
        self._connect = connect or VppClient(options.api_socket).connect
        self._client: VppClient | None = None
        self._reconciler: Reconciler | None = None
        self._last_full: float | None = None

    def run(self, **up_options: Any) -> UpResult:
        if self._client is None:
            self._client = self._connect()
            self._reconciler = Reconciler(self._client)
            self._last_full = None
        started = time.monotonic()
        full = self._last_full is None or started - self._last_full >= self.full_every
        try:
            result = up(self.options, api=self._client, reconciler=self._reconciler,
                        full=full, **up_options)
        except VppUnavailableError:
            self.close()
            raise
        if full and self.options.cni_state_dir is not None:
            try:
                result.pod_report = reattach(self._client, self.options.cni_state_dir,
                                       self.options.cni_path)
            except VppUnavailableError:
                self.close()
                raise
        if full:
            self._last_full = started
        return result

    @property
    def client(self) -> VppClient | None:
        """The connection of the last run (None while VPP is away)."""
        return self._client

    def close(self) -> None:
        client, self._client, self._reconciler = self._client, None, None
        if client is not None:
            client.close()


def down(options: NodeOptions, *, api: VppApi | None = None,
         mesh: Mesh | None = None) -> list[str]:
    """Remove the mesh from VPP and the host link from Linux.

    Without the mesh (no file), what VPP itself says is vppmesh's goes (teardown.py),
    and the guard wherever it is bound; only the extra underlay addresses vppmesh put on
    the uplink stay, since nothing in VPP tells them from an operator's.
    """
    if mesh is None and options.mesh_file.exists():
        mesh = load_mesh(options.mesh_file)
    local = mesh.node(options.node) if mesh is not None else None
    client = api or VppClient(options.api_socket).connect()
    try:
        if local is None or mesh is None:
            removed = teardown(client, None)
            removed += guard.remove_everywhere(client)
        else:
            removed = teardown(client, mesh.settings.mesh_table_id, tuple(local.underlay[1:]))
            uplink, _ = interfaces.find_uplink(client, local.uplink, local.primary)
            if uplink is not None:  # after the tunnels: they never exist unguarded
                for version in sorted({a.version for a in local.underlay}):
                    removed += guard.remove(client, uplink.sw_if_index, version)
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
