"""The agent of a node whose membership lives in etcd: register, watch, reconcile.

The node publishes its record under a lease that it keeps alive while it runs, and
watches the prefix. Any change (a node joins, leaves, changes its record, the settings
change) leads to one new snapshot and one reconcile. reconcile() compares the new
desired state with what VPP holds and changes only the difference, so a join or a
leave touches the SAs, tunnels and route of that one peer; the tunnels of every other
peer are left exactly as they were. Stopping the agent does not revoke the lease: a
restart within the lease's TTL is invisible to the other nodes; `vppmesh down` removes
the record at once.

The node's X25519 key is its identity and stays the same across leaving, rejoining and
VPP restarts. Key reuse is not this module's concern: whenever an outbound key would be
installed again (a peer removed this node's SAs when it left, or a VPP restart lost
them), the sender steps to its next key generation inside the receiver's window
(epochs.py), on both the file and the datastore path. A new key per membership would
only trade that for a changing identity: a rewritten key file (impossible when it is
mounted read-only) and records whose key no longer tells one host from another.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

import vppmesh.agent.node
from vppmesh.agent import hardening
from vppmesh.agent.datastore.etcd import DatastoreError, EtcdStore, Registration
from vppmesh.agent.datastore.records import (
    DatastoreUrl,
    Membership,
    assemble,
    membership_change,
    parse_record,
)
from vppmesh.agent.loop import agent_loop, leave_uplinks, open_control
from vppmesh.agent.secrecy import Secrecy
from vppmesh.config import Mesh, MeshSettings, NatSettings, Node, format_validation_error
from vppmesh.dataplane.vpp.client import VppApi, VppClient
from vppmesh.errors import ConfigError, VppMeshError
from vppmesh.keying.keys import load_secrets, public_key_b64

if TYPE_CHECKING:
    from etcd3gw.lease import Lease

    from vppmesh.ops.metrics import AgentMetrics

log = logging.getLogger("vppmesh.agent.datastore")
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
RETRY_SECONDS = 1.0
# How long the loop waits on the agents' channel before it looks at the membership again.
CHANNEL_CHECK_SECONDS = 0.1


@dataclass(frozen=True)
class LocalNode:
    """What this node publishes about itself; the number is allocated unless given."""

    underlay: tuple[IPInterface, ...]
    pod_cidr: ipaddress.IPv4Network
    node_number: int | None = None
    uplink: str | None = None
    # Behind NAT: the public address (and forwarded port) peers reach this node at.
    nat: NatSettings | None = None
    udp_encap: bool = False


@dataclass(frozen=True)
class DatastoreOptions:
    url: DatastoreUrl
    local: LocalNode | None = None  # needed to join, not to leave
    lease_ttl: int = 30
    settings_file: Path | None = None
    resync_seconds: float = 10.0
    debounce_seconds: float = 0.05


def load_settings_file(path: Path) -> MeshSettings:
    """A settings file: the settings mapping itself, or a mesh file (its settings)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the settings file ({exc})") from None
    if isinstance(data, dict) and "settings" in data:
        data = data["settings"]
    try:
        return MeshSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path)).replace(
            "the mesh file is not valid", "the settings are not valid")) from None


def local_record(options: vppmesh.agent.node.NodeOptions, local: LocalNode,
                 public_key: str) -> Node:
    """This node's record, validated like a node of the mesh file (number 1 until claimed)."""
    try:
        return Node(name=options.node, node_number=local.node_number or 1,
                    underlay=list(local.underlay), pod_cidr=local.pod_cidr,
                    public_key=public_key, uplink=local.uplink, nat=local.nat,
                    udp_encap=local.udp_encap)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "this node's record").replace(
            "the mesh file is not valid",
            "check --node, --underlay, --pod-cidr, --nat-public")) from None


def record_file(options: vppmesh.agent.node.NodeOptions) -> Path:
    """Where the agent keeps a copy of its record and settings, so `down` works offline."""
    return options.state_dir / f"{options.node}.datastore.json"


class MembershipSource:
    """Keeps this node registered, and is the mesh source of its node.Agent.

    The membership is one more source of meshes for the same Agent and Loop that
    `up --watch` runs (loop.py): one VPP connection, the local view kept while the
    membership is unchanged, only changed peers re-applied from the remembered state,
    and one way of recovering from VPP restarts, re-attaching pods and filling metrics.
    """

    def __init__(self, options: vppmesh.agent.node.NodeOptions, ds: DatastoreOptions,
                 store: EtcdStore | None = None, api: VppApi | None = None,
                 metrics: AgentMetrics | None = None, stats_socket: Path | None = None,
                 ) -> None:
        if ds.local is None:
            raise ConfigError("joining through a datastore needs --underlay and --pod-cidr")
        self.options = options
        self.ds = ds
        self.local = ds.local
        self.name = str(ds.url)  # names the source in the Agent's errors
        self.store = store or EtcdStore(ds.url)
        self._api = api  # None: the session keeps its own connection to options.api_socket
        self.changed = threading.Event()
        self.stop = threading.Event()
        self.registration: Registration | None = None
        self.lease_lost = threading.Event()
        self.watch_broken = threading.Event()
        self.applied: Mesh | None = None
        self.rejected: dict[str, str] = {}
        self._records: dict[tuple[str, bytes], Node] = {}  # the last snapshot's (assemble)
        self.blocked: list[str] = []
        self.changed_at: float | None = None
        self.event_at: float | None = None  # when the watch reported the change applied now
        self._stop_watch: Callable[[], None] | None = None
        self._keepalive: threading.Thread | None = None
        self._following = False  # run() keeps the watch armed
        self._next_resync = 0.0
        self._key_signature: tuple[int, int, int] | None = None  # at the last registration
        # The loop of run(), wired as `up --watch`'s (watch.agent_loop) with the membership
        # as its mesh source; with --metrics it fills them after every sync (metrics.py).
        self.loop = agent_loop(options, source=self, connect=self._connect, metrics=metrics,
                               stats_socket=stats_socket, report=self._applied,
                               on_error=self._failed)
        self.session = self.loop.session
        # The agents' channel: generations agreed with the peers' agents (secrecy.py).
        self.secrecy: Secrecy = self.session.secrecy  # type: ignore[assignment]

    @property
    def api(self) -> VppApi | None:
        return self._api

    @api.setter
    def api(self, api: VppApi | None) -> None:
        """Another VPP (connection): the session forgets what the last one held."""
        self._api = api
        self.session.close()

    def _connect(self) -> VppApi:
        return self._api if self._api is not None else \
            VppClient(self.options.api_socket).connect()

    # ---- joining ----------------------------------------------------------------------
    def register(self, lease: Lease | None = None) -> Registration:
        """Register this node's record under a new lease, or under `lease` (ours, alive)
        when only the record changed: a key rotated on disk moves the record without a
        second lease for the keepalive to miss."""
        if self.ds.settings_file is not None:
            wanted = load_settings_file(self.ds.settings_file)
            if self.store.seed_settings(wanted):
                log.info("stored the mesh settings from %s in %s", self.ds.settings_file,
                         self.ds.url)
            elif self.store.settings() != wanted:
                log.warning("%s holds other mesh settings than %s: the datastore's apply",
                            self.ds.url, self.ds.settings_file)
        # taken before reading the key
        self._key_signature = vppmesh.agent.node.file_signature(self.options.private_key)
        secrets = load_secrets(self.options.private_key, None)
        record = local_record(self.options, self.local, secrets.public_key_b64())
        previous = secrets.private_key_previous  # a key rotation: the record may move
        granted = lease is None
        if lease is None:
            lease = self.store.grant(self.ds.lease_ttl)
        try:
            self.registration = self.store.register(
                record, lease, requested_number=self.local.node_number,
                previous_key=public_key_b64(previous) if previous is not None else None)
        except VppMeshError:
            if granted:
                self.store.revoke(lease)
            raise
        self.lease_lost.clear()
        return self.registration

    def _keepalive_loop(self) -> None:
        interval = max(self.ds.lease_ttl / 3, 0.5)
        while not self.stop.wait(interval):
            registration = self.registration
            if registration is None:
                continue
            try:
                alive = self.store.keepalive(registration.lease)
            except VppMeshError as exc:
                log.warning("%s", exc)
                self.changed.set()  # the watch stream is likely broken too: resync
                continue
            if not alive:
                log.warning("the lease of %s expired; registering again", self.options.node)
                self.lease_lost.set()
                self.changed.set()

    # ---- following the membership -------------------------------------------------------
    def mesh(self, *, fresh: bool = False) -> Mesh:
        """The session's mesh: one snapshot, (re-)registering if our record is gone.

        Every snapshot is read anew (`fresh` changes nothing): it is what changed.
        """
        if self._following and (time.monotonic() >= self._next_resync
                                or self._stop_watch is None or self.watch_broken.is_set()):
            self.watch_broken.clear()
            # Re-arm the watch from a fresh revision: a broken stream goes quiet.
            self._watch(self.store.snapshot().revision)
            self._next_resync = time.monotonic() + self.ds.resync_seconds
        snap = self.store.snapshot()
        own = next((r for r in snap.records if r.name == self.options.node), None)
        if own is None or self.registration is None or self.lease_lost.is_set() or \
                own.lease != self.registration.lease.id:
            self.register()
            snap = self.store.snapshot()
        elif vppmesh.agent.node.file_signature(self.options.private_key) != self._key_signature:
            # `vppmesh keygen --rotate` on this node: the record takes the new key now (the
            # store accepts it since KEY.previous is the registered one), no restart needed.
            log.info("the private key file changed: registering %s's record again",
                     self.options.node)
            self.register(self.registration.lease)
            snap = self.store.snapshot()
        settings = self.store.settings(snap)
        membership = assemble(settings, snap.records, snap.numbers, self._records)
        if membership.rejected != self.rejected:  # report each conflict once
            for reason in sorted(set(membership.rejected.values())):
                log.error("ignoring %s", reason)
            self.rejected = membership.rejected
        if not membership.has(self.options.node):
            raise ConfigError(f"this node's record was rejected: "
                              f"{membership.rejected.get(self.options.node, 'not found')}")
        assert membership.mesh is not None
        self._save(membership)
        return membership.mesh

    def sync(self, event_at: float | None = None) -> vppmesh.agent.node.UpResult | None:
        """One run of the session: snapshot, (re-)register if needed, reconcile.

        `event_at` (monotonic) is when the watch reported the change, for the log.
        """
        self.event_at = event_at
        result = self.session.run()
        self._applied(result)
        return result

    def _applied(self, result: vppmesh.agent.node.UpResult) -> None:
        """What one run did, in the log: key generation notes, blocked peers, and the
        membership change (each told once)."""
        for note in result.notes:  # key generation steps and slides, each told once
            log.info("%s", note)
        if result.blocked_peers and result.blocked_peers != self.blocked:
            log.error("fail closed: no usable key towards %s; their traffic is dropped",
                      ", ".join(result.blocked_peers))
        self.blocked = result.blocked_peers
        mesh = result.mesh
        assert mesh is not None
        change = membership_change(self.applied, mesh)
        if self.applied is None or not change.empty or result.changes:
            since = (f", {1000 * (time.monotonic() - self.event_at):.0f} ms after the "
                     "event" if self.event_at is not None else "")
            log.info("membership %s (%d node(s)): %d change(s) in %.0f ms%s", change,
                     len(mesh.nodes), len(result.changes), result.seconds * 1000, since)
        self.applied = mesh

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, DatastoreError) or not isinstance(exc, VppMeshError):
            self._unwatch()  # re-armed from a fresh revision once etcd answers

    def _save(self, membership: Membership) -> None:
        assert membership.mesh is not None
        path = record_file(self.options)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"datastore": str(self.ds.url),
                "settings": membership.mesh.settings.model_dump(mode="json", exclude_none=True),
                "node": membership.mesh.node(self.options.node).model_dump(
                    mode="json", exclude_none=True)}
        text = json.dumps(data, indent=2)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)

    def _watch(self, revision: int) -> None:
        self._unwatch()

        def on_change() -> None:
            if self.changed_at is None:
                self.changed_at = time.monotonic()
            self.changed.set()

        self._stop_watch = self.store.watch(revision + 1, on_change, self._watch_ended)

    def _watch_ended(self) -> None:
        log.warning("the watch on %s ended (etcd restarted?); watching again", self.ds.url)
        self.watch_broken.set()
        self.changed.set()

    def _unwatch(self) -> None:
        if self._stop_watch is not None:
            self._stop_watch()
        self._stop_watch = None

    def ticks(self) -> Iterator[None]:
        """When the loop steps: on a change (a burst settled first), at the resync
        interval, and every RETRY_SECONDS while the last step failed; until stop."""
        while not self.stop.is_set():
            timeout = RETRY_SECONDS if self.loop.failed else \
                max(0.0, self._next_resync - time.monotonic())
            if self._wait(timeout) and self.changed.is_set() and self.ds.debounce_seconds:
                self.stop.wait(self.ds.debounce_seconds)  # let a burst of events settle
            if self.stop.is_set():
                return
            self.changed.clear()
            self.event_at, self.changed_at = self.changed_at, None
            yield

    def _wait(self, timeout: float) -> bool:
        """Until a membership change, the channel wanting a run, or `timeout`."""
        deadline = time.monotonic() + timeout
        wanted = False
        while not self.changed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            control = self.loop.control  # its socket is looked at between the waits
            if self.secrecy.endpoint is None and control is None:  # only the membership
                return self.changed.wait(left)
            pause = min(left, CHANNEL_CHECK_SECONDS)
            if wanted:  # a run is asked for: wait only until it may come
                pause = min(pause, max(0.0, self.loop.early_in()))
            wanted |= (control.wait(self.secrecy.wait) if control else self.secrecy.wait)(pause)
            if wanted and self.loop.may_run_early():
                return True
        return True

    def run(self) -> None:
        """Until stop is set: keep the lease, follow the prefix, reconcile on changes."""
        self._keepalive = threading.Thread(target=self._keepalive_loop, daemon=True,
                                           name="vppmesh-lease")
        self._keepalive.start()
        log.info("following %s as %s (lease TTL %d s)", self.ds.url, self.options.node,
                 self.ds.lease_ttl)
        self._following = True
        self.loop.control = open_control(self.options)
        if self.loop.control is not None:  # a `stop` request ends it as SIGTERM does
            self.loop.control.on_stop = lambda: (self.stop.set(), self.changed.set())
        try:
            self.loop.run(self.ticks())
        finally:
            self._following = False
            self._unwatch()
            self.session.close()
            self.secrecy.close()
            if self.loop.control is not None:
                self.loop.control.close()
            self.stop.set()


def leave(options: vppmesh.agent.node.NodeOptions, url: DatastoreUrl, *,
          store: EtcdStore | None = None) -> list[str]:
    """Delete this node's record and number claim, then remove the mesh from VPP."""
    store = store or EtcdStore(url)
    removed: list[str] = []
    snap = store.snapshot()
    record = next((r for r in snap.records if r.name == options.node), None)
    saved = record_file(options)
    node: Node | None = None
    settings: MeshSettings | None = None
    if saved.exists():
        data = json.loads(saved.read_text())
        node = Node.model_validate(data["node"])
        settings = MeshSettings.model_validate(data["settings"])
    if record is not None:
        node = parse_record(record)
    if snap.settings is not None:
        settings = store.settings(snap)
    if store.deregister(options.node):
        removed.append(f"datastore record {url.node_key(options.node)}")
    if node is None or settings is None:
        raise ConfigError(f"no record of {options.node!r} in {url} nor in {saved}: nothing "
                          "tells which addresses to remove; run `vppmesh down --mesh` instead")
    removed += vppmesh.agent.node.down(options, mesh=Mesh(settings=settings, nodes=[node]))
    saved.unlink(missing_ok=True)
    return removed


def parse_nat(value: str | None) -> NatSettings | None:
    """`--nat-public ADDR[:PORT]` (IPv6: `[ADDR]:PORT`); the port defaults to 4500."""
    if value is None:
        return None
    text, port = value.strip(), None
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
        text = addr
    elif text.count(":") == 1:
        text, port = text.split(":")
    try:
        public = ipaddress.ip_address(text)
        number = int(port) if port is not None else 4500
        return NatSettings(public=public, port=number)
    except (ValueError, ValidationError):
        raise ConfigError(f"--nat-public {value}: give the public ADDRESS[:PORT] peers reach "
                          "this node at, e.g. 203.0.113.7:4500 or [2001:db8::7]:4500 (the "
                          "port, 1-65535, is the one the NAT forwards to this node's 4500)"
                          ) from None


def parse_local(underlay: list[str], pod_cidr: str | None, node_number: int | None,
                uplink: str | None, nat_public: str | None = None,
                udp_encap: bool = False) -> LocalNode:
    """The command line's description of this node; errors name the option."""
    if not underlay or pod_cidr is None:
        raise ConfigError("joining through --datastore needs this node's --underlay "
                          "address(es) (ADDR/LEN, one per tunnel) and its --pod-cidr")
    try:
        addresses = tuple(ipaddress.ip_interface(a) for a in underlay)
    except ValueError as exc:
        raise ConfigError(f"--underlay: {exc}; give ADDR/LEN, e.g. 192.0.2.11/24") from None
    try:
        cidr = ipaddress.IPv4Network(pod_cidr)
    except ValueError as exc:
        raise ConfigError(f"--pod-cidr {pod_cidr}: {exc}; give an IPv4 network such as "
                          "198.18.1.0/24") from None
    return LocalNode(underlay=addresses, pod_cidr=cidr, node_number=node_number,
                     uplink=uplink, nat=parse_nat(nat_public), udp_encap=udp_encap)


def follow(options: vppmesh.agent.node.NodeOptions, url: str, *, watch: bool, underlay: list[str],
           pod_cidr: str | None, node_number: int | None, settings_file: Path | None,
           lease_ttl: int, metrics: AgentMetrics | None = None,
           stats_socket: Path | None = None, nat_public: str | None = None,
           udp_encap: bool = False) -> None:
    """`vppmesh up --datastore`: register and follow the membership until SIGTERM/SIGINT."""
    import signal

    hardening.forbid_core_dumps()  # before any key is read: see vppmesh/agent/hardening.py
    if not watch:
        raise ConfigError("--datastore needs --watch: a node's record lives only while its "
                          "agent keeps the lease alive")
    if lease_ttl < 2:
        raise ConfigError(f"--lease-ttl {lease_ttl}: at least 2 seconds (etcd's minimum)")
    ds = DatastoreOptions(url=DatastoreUrl.parse(url),
                          local=parse_local(underlay, pod_cidr, node_number, options.uplink,
                                            nat_public, udp_encap),
                          lease_ttl=lease_ttl, settings_file=settings_file)
    member = MembershipSource(options, ds, metrics=metrics, stats_socket=stats_socket)
    member.register()  # a conflicting record fails here, before VPP is touched
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (member.stop.set(), member.changed.set()))
    member.changed.set()
    member.run()
    leave_uplinks(options)  # VPP stopping too (a rolling update): the NIC back
