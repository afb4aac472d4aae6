"""One node's agent: load the mesh, plan, reconcile VPP and Linux, report.

The CLI is a thin shell over these functions; the testbed and the benchmarks call them
too, so every path a user takes is the path the tests take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from vppmesh.agent.clock import AgentClock
from vppmesh.cni.reattach import DEFAULT_CNI_PATH, PodReport, reattach
from vppmesh.config import Mesh, Node, load_mesh
from vppmesh.dataplane import engines
from vppmesh.dataplane.index import PeerObjects
from vppmesh.dataplane.plan import HostOptions, drop_routes, plan_by_peer
from vppmesh.dataplane.reconcile import Change, Reconciler, gc_paused, reconcile
from vppmesh.dataplane.state import DesiredState
from vppmesh.dataplane.teardown import teardown
from vppmesh.dataplane.view import AgreedKeys, LocalView, build_view
from vppmesh.dataplane.vpp import interfaces, ipsec, system
from vppmesh.dataplane.vpp.client import DEFAULT_API_SOCKET, VppApi, VppClient
from vppmesh.dataplane.vpp.stats import SaCounters
from vppmesh.errors import VppUnavailableError
from vppmesh.host import guard, preflight
from vppmesh.host import link as linux
from vppmesh.host import uplink as nic
from vppmesh.host.uplink import UplinkSpec
from vppmesh.keying import epochs
from vppmesh.keying.agreement import Agreement, NoAgreement, save_state
from vppmesh.keying.epochs import GenerationState, GenerationStore, PeerKeying
from vppmesh.keying.keys import load_secrets
from vppmesh.keying.ledger import KeyLedger
from vppmesh.keying.observe import KeySas, observe_keys, read_key_sas, usable_keying
from vppmesh.keying.pairs import PairSecrecy, pair_secrecy
from vppmesh.keying.settled import SettledPeers, snapshot, take_over

if TYPE_CHECKING:
    from vppmesh.agent.secrecy import Secrecy

HostLinkKind = Literal["auto", "tap", "af_packet", "none"]
log = logging.getLogger("vppmesh")

# A long-running agent's periodic full run (Agent.full_every): VPP dumped and compared
# whole, the mesh and key files read again, pods re-attached and gone ones collected.
# Everything with a deadline is caught without it: a VPP restart breaks the connection
# (the reconnect's run is full at once), the SA counters are read on every poll (key
# limits), the generation file, the ledger and the mesh and key files are looked at on
# every run, and a run from the remembered state that VPP refuses dumps at once. What is
# left to it is drift nobody announces (an object removed in VPP's CLI by hand), so five
# minutes: at 1000 peers x 4 tunnels a full run costs ~0.6 s of CPU, which every minute
# was most of an idle agent's CPU.
FULL_EVERY_SECONDS = 300.0


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
    take_uplink: UplinkSpec | None = None  # hand this NIC to VPP first (vppmesh/host/uplink/)
    crypto_engine: str = engines.AUTO  # AES-GCM-256 engine (vppmesh/dataplane/engines.py)
    # The CNI plugin's attachment records (its stateDir): pods the agent re-attaches
    # after a VPP restart. None: the agent leaves pods alone.
    cni_state_dir: Path | None = None
    cni_path: tuple[Path, ...] = DEFAULT_CNI_PATH

    @cached_property
    def ledger(self) -> KeyLedger:
        """One ledger per options (it re-reads its file when another process wrote it)."""
        return KeyLedger(self.state_dir / f"{self.node}.used-keys.json")

    @cached_property
    def clock(self) -> AgentClock:
        """The node's clock (vppmesh/agent/clock.py): every run's `now`, the agent's channel,
        `up` and `rekey` read this one, so the generation file's times stay comparable
        whatever the wall clock does."""
        return AgentClock(self.state_dir / f"{self.node}.clock.json")

    @cached_property
    def generations(self) -> GenerationStore:
        """One store per options: a long-running agent's runs reuse the state it last
        read or wrote while the file is unchanged (GenerationStore.load)."""
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
    # Peers without an outbound key for a moment: their agent is installing a new one.
    waiting_peers: list[str] = field(default_factory=list)
    # Peers failed closed, and why (epochs.Decision.stopped): no agreed key may be used.
    stopped_peers: dict[str, str] = field(default_factory=dict)
    # Peers that left agreed keys for the static schedule in this run (`preferred`).
    downgraded_peers: list[str] = field(default_factory=list)
    # Per peer: does the pair run on agreed (forward-secret) keys, each way.
    secrecy: dict[str, PairSecrecy] = field(default_factory=dict)
    # The engine running AES-GCM-256 (None: not looked at in this run, or unknown).
    crypto_engine: str | None = None
    # The pass over the CNI records (Agent only, on its full runs); None if none ran.
    pod_report: PodReport | None = None
    mesh: Mesh | None = None  # the mesh this run applied (file or datastore)


def resolve_host_kind(kind: HostLinkKind) -> Literal["tap", "af_packet", "none"]:
    if kind == "auto":
        return "tap" if linux.tap_supported() else "af_packet"
    return kind


def local_view(options: NodeOptions, mesh: Mesh | None = None, *,
               previous: LocalView | None = None, source: str | None = None) -> LocalView:
    """This node's view of the mesh (from the mesh file unless given, e.g. from the
    datastore, which `source` names in errors) and its keys; see vppmesh/dataplane/view.py."""
    mesh = mesh or load_mesh(options.mesh_file)
    local = mesh.node(options.node)  # fail early, naming the node, before the key file
    secrets = load_secrets(options.private_key, mesh.settings.psk_file)
    return build_view(mesh, local, secrets, previous=previous, key_file=options.private_key,
                      mesh_source=source or str(options.mesh_file))


def datastore_mesh(url: str | None) -> Mesh | None:
    """The mesh as the datastore holds it now (None without --datastore)."""
    if url is None:
        return None
    from vppmesh.agent.datastore.etcd import current_mesh
    from vppmesh.agent.datastore.records import DatastoreUrl

    return current_mesh(DatastoreUrl.parse(url))


def desired_state(options: NodeOptions, view: LocalView, workers: int,
                  epochs: tuple[int, ...] | None = None,
                  keying: dict[str, PeerKeying] | None = None,
                  uplink: str | None = None) -> DesiredState:
    """plan() with this machine's host link; `uplink` (a taken NIC's bridge) overrides
    the options' one."""
    return planned(options, view, workers, epochs, keying, uplink)[0]


def planned(options: NodeOptions, view: LocalView, workers: int,
            epochs: tuple[int, ...] | None = None,
            keying: dict[str, PeerKeying] | None = None,
            uplink: str | None = None, agreed: Mapping[str, AgreedKeys] | None = None,
            ) -> tuple[DesiredState, dict[int, PeerObjects]]:
    """desired_state() and its parts by peer (plan.plan_by_peer), for a Reconciler."""
    kind = resolve_host_kind(options.host_link)
    return plan_by_peer(view, workers=workers,
                        host=HostOptions(kind=kind, queues=max(1, workers)), epochs=epochs,
                        uplink=uplink or options.uplink, keying=keying, agreed=agreed)


def apply(api: VppApi, desired: DesiredState, *, dry_run: bool = False,
          ledger: KeyLedger | None = None, reconciler: Reconciler | None = None,
          full: bool = False, by_peer: Mapping[int, PeerObjects] | None = None,
          sas: Mapping[int, ipsec.SaState] | None = None,
          unchanged: bool = False) -> list[Change]:
    """Reconcile VPP, with the Linux end of the host link prepared before and after.

    With a `reconciler` (kept by a long-running agent), only what changed since its last
    run is compared (peer by peer with `by_peer`, the plan's parts) and applied, unless
    `full`. `sas`: this run's SA dump (read_key_sas), compared instead of a second one.
    `unchanged`: `desired` is the plan the reconciler applied last (a quiet run,
    QuietRuns): there is nothing to compare; only the host link is looked after.
    """
    host = desired.host
    if not dry_run and host is not None and host.kind == "af_packet":
        linux.ensure_veth(host.linux_ifname, host.vpp_ifname, linux_mac=host.linux_mac,
                          vpp_mac=host.vpp_mac, mtu=desired.mtu, linux_netns=host.netns)
    if unchanged:
        changes: list[Change] = []
    elif reconciler is not None:
        changes = reconciler.reconcile(desired, dry_run=dry_run, ledger=ledger, full=full,
                                       by_peer=by_peer, sas=sas)
    else:
        changes = reconcile(api, desired, dry_run=dry_run, ledger=ledger, sas=sas)
    if not dry_run and host is not None:
        linux.configure_linux_side(host, desired.mtu)
    return changes


@dataclass
class Settled:
    """A run that changed nothing (no generation, no VPP object), and what it was
    decided from: QuietRuns compares the next run's inputs with these."""

    view: LocalView
    state: GenerationState  # the store's kept object: the file is unchanged while it is
    sas: Mapping[int, ipsec.SaState]  # the reconciler's remembered SAs
    packets: Mapping[int, int]  # their counters
    ledger: tuple[int, int, int] | None  # the used-key ledger's file signature
    writes: int  # GenerationStore.writes after the run
    now: float
    until: float  # epochs.next_change: the first time rule still to be met
    desired: DesiredState
    result: UpResult


class QuietRuns:
    """Lets a long-running agent's run with nothing new skip the O(peers) work.

    At 1000 peers x 4 tunnels observing every SA, advancing every pair's generations,
    planning and comparing the plan cost tens of ms of CPU on every 2 s poll, to decide
    what the last run decided. The key decision is a function of the view, the
    generation state, the SAs and their packet counters, the used-key ledger and time;
    when the last run changed nothing (a fixed point) and all of these are the same
    objects or values now, only time can change the outcome, and only where a time rule
    (epochs.next_change) is met for the first time. Such a run reuses the last plan; the
    host link, the uplink's state and the guard are still looked at, as on every run.

    Key limits hold exactly as before: any SA counter that moved, or any time rule
    reached, makes the run a full decision (packets are compared exactly, not against a
    threshold); with the agents' channel, only a run after which nothing happened on
    it (ChannelAgreement.settles: no key event, no NAT port learned, no session made,
    changed or expired, no offer open, no restart to announce) skips; a full, dry or
    rekey run never skips anything.
    """

    def __init__(self) -> None:
        self._settled: Settled | None = None
        # A run with something new decides again only the peers it concerns.
        self.peers = SettledPeers()

    def forget(self) -> None:
        self._settled = None
        self.peers.forget()

    def on_vpp_met(self, api: VppApi, pid: int, *, restarted: bool,
                   view: LocalView) -> None:
        self.forget()  # the plan reused is the one VPP held

    def on_vpp_gone(self, reason: str) -> None:
        self.forget()

    def unchanged(self, view: LocalView, state: GenerationState, key_sas: KeySas,
                  ledger: KeyLedger, now: float, writes: int) -> Settled | None:
        """The last settled run, if this run's inputs are exactly its inputs."""
        s = self._settled
        if s is None or s.view is not view or s.state is not state or s.writes != writes or \
                s.sas is not key_sas.sas or key_sas.packets is None or \
                key_sas.note is not None or not s.now <= now < s.until or \
                file_signature(ledger.path) != s.ledger or key_sas.packets != s.packets:
            return None
        return s

    def ran(self, settled: Settled | None) -> None:
        """The run's outcome: a Settled when it changed nothing, else None."""
        self._settled = settled


def up(options: NodeOptions, *, dry_run: bool = False, api: VppApi | None = None,
       rekey: bool = False, now: float | None = None, mesh: Mesh | None = None,
       view: LocalView | None = None, reconciler: Reconciler | None = None,
       full: bool = False, agreement: Agreement,
       vpp_pid: int | None = None, counters: SaCounters | None = None,
       quiet: QuietRuns | None = None) -> UpResult:
    """Plan and apply this node's part of the mesh, with key generations advanced first.

    `view` (a Agent's) or else the view of `mesh` (the mesh file's by default) is
    built before anything else, so every input is checked before the host or VPP is
    touched. The generation file is read and written under its lock, so `vppmesh rekey`
    and a running `up --watch` never choose generations from a stale copy. `agreement`
    (keying/agreement.py) is the agents' channel of a long-running agent (Secrecy's) or
    NoAgreement (a one-shot run: static keys). A long-running agent passes `vpp_pid`
    when it already asked VPP for it (one round trip less per run), its `counters` (the
    stats segment's SA counters: read_key_sas) and its `quiet` runs (QuietRuns: a run
    whose inputs are the last unchanged run's reuses its plan).
    """
    view = view or local_view(options, mesh)
    if reconciler is None or full:  # node-wide runs: at start, after a restart, resyncs
        # An underlay address the host holds too would be on the wire twice.
        preflight.refuse_host_addresses(view.node.underlay,
                                        f"node {view.node.name}'s underlay")
    started = time.monotonic()
    client = api or VppClient(options.api_socket).connect()
    store = options.generations
    ledger = options.ledger
    settings = view.settings
    try:
        # No cyclic GC while the SA dump and the plan allocate (reconcile.gc_paused).
        with store.locked(), gc_paused():
            pid = vpp_pid if vpp_pid is not None else system.vpp_pid(client)
            workers = (options.workers if options.workers is not None
                       else system.worker_count(client))
            uplink = options.uplink
            if options.take_uplink is not None:
                # One queue pair per worker on the NIC and on the host's link.
                spec = options.take_uplink.model_copy(update={"queues": max(1, workers)})
                bvi = nic.bvi_name(client) if dry_run else nic.ensure(
                    client, spec, options.state_dir, view.node.primary,
                    underlay_mtu=settings.underlay_mtu)
                uplink = bvi or uplink
            state = store.load(reuse=not dry_run)
            before = store.loaded_text(state)
            key_sas = read_key_sas(client, reconciler, full, counters)
            if now is None:  # the agent's channel and its runs on one clock
                now = agreement.clock()
            given = view
            may_reuse = quiet is not None and reconciler is not None \
                and not (dry_run or rekey or full)
            may_settle = may_reuse and agreement.settles
            settled = quiet.unchanged(view, state, key_sas, ledger, now, store.writes) \
                if quiet is not None and may_settle else None
            if settled is not None:  # nothing new since a run that changed nothing
                desired, by_peer, notes, claim = settled.desired, None, [], None
            else:
                # A peer's new public key: keep what it vouches for.
                agreement.follow_keys(view, state)
                # Towards peers behind NAT: the ports their NATs map to, as learned.
                view = agreement.learned_view(view, state)
                if rekey:
                    epochs.request_rekey(state)
                # The peers whose decision is the last run's (keying/settled.py), by
                # what the agreement says before this run adopts anything.
                heard, marks = agreement.said(view), agreement.peer_marks(view)
                kept = quiet.peers.clean(view, state, store.writes, key_sas.sas,
                                         key_sas.packets, file_signature(ledger.path), now,
                                         heard, marks) \
                    if quiet is not None and may_reuse else {}
                deciding = [p for p in view.peers if p.name not in kept] \
                    if kept else list(view.peers)
                decided = {p.name: snapshot(pg) for p in deciding
                           if (pg := state.peers.get(p.name)) is not None} \
                    if quiet is not None and not dry_run else {}
                book = agreement.book
                observations, key_used = observe_keys(client, view, state, ledger, book,
                                                      agreement, sas=key_sas.sas,
                                                      packets=key_sas.packets,
                                                      peers=deciding)
                if not dry_run:  # behind NAT: mappings lost
                    agreement.watch_flows(key_sas.sas, key_sas.packets)
                peers = {p.name: p.node.public_key for p in view.peers}
                scheduled = epochs.schedule(
                    state, settings, {p.name: p.node.public_key for p in deciding},
                    observations, now=now, key_used=key_used,
                    # with the keys observe_keys adopted
                    said=agreement.said(view, deciding), me=view.node.public_key)
                notes = scheduled.notes
                if key_sas.note is not None:
                    notes.append(key_sas.note)
                for name in sorted(scheduled.downgraded):  # never quietly (`preferred` only)
                    log.warning("%s: forward secrecy lost: the pair leaves agreed keys for "
                                "the static schedule (forward_secrecy: preferred)", name)
                claim = None if dry_run else agreement.claim(state, scheduled.wants)
                keying = usable_keying(view, state, book, scheduled.keying)
                agreed = {p.name: a for p in deciding
                          if p.name in keying and (a := book.agreed(p)) is not None}
                take_over(kept, scheduled, keying, agreed)
                desired, by_peer = planned(options, view, workers, keying=keying,
                                           uplink=uplink, agreed=agreed)
            if not dry_run and (reconciler is None or full
                                or reconciler.async_crypto != settings.async_crypto):
                client.call(ipsec.set_async_mode(settings.async_crypto))
                if reconciler is not None:  # told once per connection, and when it changes
                    reconciler.async_crypto = settings.async_crypto
            changes = []
            engine = None
            if reconciler is None or full:  # node-wide: at start, after a restart, resyncs
                choice = engines.ensure(client, options.crypto_engine, dry_run=dry_run,
                                        vpp_pid=pid)
                changes, engine = choice.changes, choice.engine
                if choice.warning:
                    notes.append(choice.warning)
            found = None
            if reconciler is not None and not full:
                # Its index is remembered; one interface read gives its state now.
                remembered = reconciler.uplink_for(desired)
                if remembered is not None:
                    found = interfaces.dump_interface(client, remembered.sw_if_index)
                    if found is not None and found.name != remembered.name:
                        found = None
            if found is None:
                found, _ = interfaces.find_uplink(client, desired.uplink,
                                                  desired.uplink_addresses[0])
            if found is not None:
                refuse_uplink_mtu(settings.underlay_mtu, found)
            if found is not None and found.admin_up and not found.link_up:
                notes.append(f"uplink {found.name} is up but has no link (cable, switch "
                             "port, or the NIC's driver): no peer is reachable through it")
            if found is not None:  # else reconcile() explains what is missing
                for version in sorted({a.version for a in desired.uplink_addresses}):
                    changes += guard.ensure(client, found.sw_if_index, version,
                                            dry_run=dry_run)
            changes += apply(client, desired, dry_run=dry_run, ledger=ledger,
                             reconciler=reconciler, full=full, by_peer=by_peer,
                             sas=key_sas.dumped, unchanged=settled is not None)
            if settled is not None:
                agreement.quiet()
                return replace(settled.result, changes=changes, notes=notes, vpp_pid=pid,
                               seconds=time.monotonic() - started,
                               messages=client.messages_sent, mesh=view.mesh)
            if claim is None:  # a dry run: nothing claimed, saved or sent
                after = store.text(state)
            else:
                retired = agreement.applied(claim, view, state,
                                            {name: k.inbound for name, k in keying.items()})
                if retired:  # their SAs are gone: nothing can install them
                    ledger.forget(retired)
                saved = save_state(store, state, before, claim)
                after = saved.text
                agreement.flush(saved)  # offers go out once their generations are claimed on disk
                if quiet is not None:
                    quiet.peers.ran(
                        view, state, writes=store.writes, sas=key_sas.sas, packets=key_sas.packets,
                        ledger=file_signature(ledger.path), now=now, settings=settings,
                        decided=decided, said=heard, marks=marks, kept=kept,
                        scheduled=scheduled, keying=keying,
                        agreed=agreed, objects=by_peer or {},
                        until=((n, epochs.next_change(state, settings, (n,), now))
                               for n in decided), changed=bool(changes))
        result = UpResult(desired=desired, changes=changes, seconds=time.monotonic() - started,
                        host_link=desired.host.kind if desired.host else "none",
                        messages=client.messages_sent, notes=notes, vpp_pid=pid,
                        blocked_peers=sorted(set(peers) - set(keying) - scheduled.waiting
                                             - {n for n, why in scheduled.stopped.items()
                                                if why != "window"}),
                        waiting_peers=sorted(scheduled.waiting), mesh=view.mesh,
                        stopped_peers=dict(sorted(scheduled.stopped.items())),
                        downgraded_peers=sorted(scheduled.downgraded),
                        secrecy=pair_secrecy(state, peers),
                        rekey_pending=sorted(n for n in peers if state.peers[n].rekey_pending),
                        crypto_engine=engine)
        if quiet is not None:
            quiet.ran(Settled(
                view=given, state=state, sas=key_sas.sas, packets=key_sas.packets,
                ledger=file_signature(ledger.path), writes=store.writes, now=now,
                until=epochs.next_change(state, settings, peers, now), desired=desired,
                result=result) if may_settle and not changes and after == before and
                key_sas.packets is not None and key_sas.note is None and
                reconciler is not None and reconciler.remembered_sas() is key_sas.sas
                else None)
        return result
    except BaseException:
        store.forget()  # the state it handed out may have changed without being saved
        if quiet is not None:
            quiet.forget()
        raise
    finally:
        if api is None:
            client.close()  # type: ignore[union-attr]


def refuse_uplink_mtu(underlay_mtu: int, found: interfaces.Interface) -> None:
    """settings.underlay_mtu must fit VPP's uplink (a taken NIC's bridge has the NIC's
    MTU, so the fix is then the NIC's)."""
    if found.tag == nic.TAG_BVI:
        fix = ("raise the MTU of the NIC VPP took (`vppmesh uplink restore`, `ip link set "
               f"NIC mtu {underlay_mtu}`, then take it again), and the switch ports' alike")
    else:
        fix = (f"raise {found.name}'s MTU in VPP (`set interface mtu {underlay_mtu} "
               f"{found.name}`), the NIC's and the switch ports' alike")
    preflight.refuse_mtu_above(underlay_mtu, found.mtu, f"VPP's uplink {found.name}", fix)


class MeshSource(Protocol):
    """Where a Agent's meshes come from: the mesh file, or the datastore's membership
    (datastore/membership.py). `name` names it in errors."""

    name: str

    def mesh(self, *, fresh: bool = False) -> Mesh:
        """The mesh now; `fresh`: read it again even if it looks unchanged."""
        ...


class VppHooks(Protocol):
    """What a part of a long-running agent is told about the VPP it works with: the
    Agent alone decides (Agent.run), and tells every hook, in the order given.

    `on_vpp_met`: a VPP not met before answers (the first one, or after a broken
    connection, or one with a new process id): `restarted` when another VPP was met
    before, so whatever it held is gone (punt registrations, SAs, counters). `view`: the
    run's local view. `on_vpp_gone`: the VPP stopped answering (said once per outage,
    until a run succeeds again; `reason` says why). Implemented by QuietRuns,
    vpp.stats.SaCounters, secrecy.Secrecy and watch.Loop."""

    def on_vpp_met(self, api: VppApi, pid: int, *, restarted: bool,
                   view: LocalView) -> None:
        """A VPP not met before answers (see the class)."""

    def on_vpp_gone(self, reason: str) -> None:
        """The VPP stopped answering (see the class)."""


def file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class MeshFile:
    """The mesh file as a MeshSource: parsed again only when it changed on disk (or when
    asked to be fresh), since a large mesh file costs far more to read than a poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self._signature: tuple[int, int, int] | None = None
        self._mesh: Mesh | None = None
        self._nodes: dict[str, Node] = {}  # the last parse's nodes (config.parse_mesh)

    def mesh(self, *, fresh: bool = False) -> Mesh:
        signature = file_signature(self.path)  # before reading: a later write is seen
        if fresh or self._mesh is None or signature is None or signature != self._signature:
            self._mesh = load_mesh(self.path, self._nodes)
            self._signature = signature
        return self._mesh


class Agent:
    """What a long-running agent keeps between runs: its mesh source, the local view,
    one VPP connection and what VPP holds. `up --watch` (mesh file) and the datastore
    agent (datastore/membership.py) both run one; loop.Loop drives it.

    Each run takes the mesh from the source and keeps the view (view.py) while the mesh
    is unchanged, building the next one from it when it changed. It then runs `up` (key
    generations advance, SAs are observed), but the reconcile compares the new plan with
    the last one and applies only the peers that changed, from the remembered state.
    Every `full_every` seconds and after a reconnect it dumps VPP again (and so does a
    run from the remembered state that VPP refuses), which also catches changes made
    behind the agent's back; those full runs also read the mesh and the key file again.
    A VPP restart breaks the connection: that run fails with VppUnavailableError and
    the next one reconnects.

    The Agent is the one place that decides what happened to VPP: a VPP not met before
    (a new connection after a broken one, or a new process id) and a VPP gone (a run
    could not reach it). It tells its `hooks` (VppHooks: the channel, the quiet runs,
    the SA counters, the loop), each once per event, and forgets what it remembered of
    the last VPP itself (the reconciler's state: the next run is full).

    On those full runs it also re-attaches the CNI plugin's pods that VPP lost (after a
    restart: all of them) and collects the records of pods that are gone
    (vppmesh/cni/reattach.py).

    With `secrecy` (the agents' channel: vppmesh/agent/secrecy.py) every run first makes sure
    the VPP it talks to punts the channel to this agent, and key generations are agreed
    with the peers' agents.

    With `counters` (VPP's stats segment) a run that is not full dumps no SA: the key
    generations take the SAs the reconciler remembers and their counters (read_key_sas).
    """

    def __init__(self, options: NodeOptions, *, full_every: float = FULL_EVERY_SECONDS,
                 connect: Callable[[], VppApi] | None = None,
                 source: MeshSource | None = None, secrecy: Secrecy | None = None,
                 counters: SaCounters | None = None,
                 hooks: Iterable[VppHooks] = ()) -> None:
        self.options = options
        self.secrecy = secrecy
        self.counters = counters
        self.full_every = full_every
        self.source: MeshSource = source or MeshFile(options.mesh_file)
        self._connect = connect or VppClient(options.api_socket).connect
        self._client: VppApi | None = None
        self._reconciler: Reconciler | None = None
        self._last_full: float | None = None
        self._view: LocalView | None = None
        self._secrets_seen: tuple[tuple[int, int, int] | None, ...] = ()
        self._quiet = QuietRuns()  # runs with nothing new reuse the last plan
        self._pid: int | None = None  # the VPP met last (None: none met yet)
        self._met = False  # the connection's VPP was told to the hooks
        self._gone = False  # VPP's absence was told (until a run succeeds)
        # Told of VPPs met and gone, in this order: what the Agent keeps first, then
        # the channel (punt registration before anyone else acts), then the others.
        self.hooks: list[VppHooks] = [self._quiet]
        if counters is not None:
            self.hooks.append(counters)
        if secrecy is not None:
            self.hooks.append(secrecy)
        self.hooks += hooks

    def view(self, *, fresh: bool = False) -> LocalView:
        """The local view of the source's mesh now: the last one while the mesh and the
        node's secret files (key, previous key, PSK and a rotation's second PSK) are
        unchanged. A PSK
        rotation step (docs/operations.md) takes effect at the next run, not the next
        full one."""
        mesh = self.source.mesh(fresh=fresh)
        view = self._view
        secrets = self._secret_files(mesh)
        if fresh or view is None or (view.mesh is not mesh and view.mesh != mesh) or \
                secrets != self._secrets_seen:
            view = self._view = local_view(self.options, mesh, previous=view,
                                           source=self.source.name)
            self._secrets_seen = secrets
        return view

    def _secret_files(self, mesh: Mesh) -> tuple[tuple[int, int, int] | None, ...]:
        from vppmesh.keying.keys import (
            PSK_NEXT_SUFFIX,
            PSK_PREVIOUS_SUFFIX,
            key_previous_file,
            psk_sibling,
        )

        paths = [self.options.private_key, key_previous_file(self.options.private_key)]
        psk = mesh.settings.psk_file
        if psk is not None:
            paths += [psk, psk_sibling(psk, PSK_NEXT_SUFFIX),
                      psk_sibling(psk, PSK_PREVIOUS_SUFFIX)]
        return tuple(file_signature(p) for p in paths)

    def run(self, **up_options: Any) -> UpResult:
        started = time.monotonic()
        full = self._client is None or self._last_full is None or \
            started - self._last_full >= self.full_every
        with gc_paused():  # a large mesh's records and view allocate as much as a dump
            view = self.view(fresh=full)  # a refused input stops the run before VPP
        try:
            if self._client is None:
                self._client = self._connect()
                self._met = False
            pid = system.vpp_pid(self._client)  # asked once: up() takes it too
            if not self._met or pid != self._pid:
                if not full:  # a new pid on this connection: read everything again too
                    full = True
                    view = self.view(fresh=True)
                self._vpp_met(self._client, pid, view)
            agreement: Agreement = NoAgreement(self.options.clock)  # static keys
            if self.secrecy is not None:  # the view's peers, this VPP's gateway
                self.secrecy.attach(self._client, view)
                agreement = self.secrecy.agreement
            result = up(self.options, api=self._client, view=view,
                        reconciler=self._reconciler, full=full, agreement=agreement,
                        vpp_pid=pid, counters=self.counters, quiet=self._quiet,
                        **up_options)
            if full and self.options.cni_state_dir is not None:
                result.pod_report = reattach(self._client, self.options.cni_state_dir,
                                             self.options.cni_path)
        except VppUnavailableError as exc:
            self.close()
            self._vpp_gone(str(exc))
            raise
        self._gone = False
        if full:
            self._last_full = started
        return result

    def _vpp_met(self, client: VppApi, pid: int, view: LocalView) -> None:
        """A VPP not met before (a new connection, or a new pid on this one): start from
        nothing of the last one's (the run is full) and tell the hooks."""
        restarted = self._pid is not None
        self._pid, self._met = pid, True
        self._reconciler = Reconciler(client)
        # A VPP met runs full until one full run succeeds: the first may fail before the
        # host has given VPP its uplink back, and only full runs re-attach the pods VPP
        # lost.
        self._last_full = None
        for hook in self.hooks:
            hook.on_vpp_met(client, pid, restarted=restarted, view=view)

    def _vpp_gone(self, reason: str) -> None:
        """VPP did not answer: the hooks are told once, until a run succeeds."""
        if self._gone:
            return
        self._gone = True
        for hook in self.hooks:
            hook.on_vpp_gone(reason)

    @property
    def client(self) -> VppApi | None:
        """The connection of the last run (None while VPP is away)."""
        return self._client

    def close(self) -> None:
        """Drop the VPP connection (the channel's socket stays: VPP comes back)."""
        client, self._client, self._reconciler = self._client, None, None
        self._quiet.forget()
        if self.counters is not None:
            self.counters.close()
        if client is not None:
            try:
                client.close()  # type: ignore[union-attr]
            except Exception:  # a dead connection may fail to close; it is dropped anyway
                log.debug("closing the VPP connection failed", exc_info=True)


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
            removed = teardown(client, mesh.settings.mesh_table_id, tuple(local.underlay[1:]),
                               drop_routes(local))
            uplink, _ = interfaces.find_uplink(client, local.uplink, local.primary)
            if uplink is not None:  # after the tunnels: they never exist unguarded
                for version in sorted({a.version for a in local.underlay}):
                    removed += guard.remove(client, uplink.sw_if_index, version)
        for ifname in nic.saved_uplinks(options.state_dir):
            removed += nic.restore(client, options.state_dir, ifname)
    finally:
        if api is None:
            client.close()  # type: ignore[union-attr]
    from vppmesh.dataplane.plan import HOST_LINUX_IFNAME, HOST_VETH_PEER

    for name in (HOST_VETH_PEER, HOST_LINUX_IFNAME):
        if linux.remove_link(name):
            removed.append(f"linux link {name}")
    return removed
