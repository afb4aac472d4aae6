"""Prometheus metrics of a running agent (`vppmesh up --watch --metrics ADDR:PORT`).

Two kinds of metrics, served together on one endpoint in the text exposition format:

- Per node (reconcile duration and errors, VPP restarts and recovery time, pods, the
  agents' channel: sessions, handshakes, messages, drops by reason): the client
  library's own Histogram, Counter and Gauge objects, updated by the watch loop.
- Per peer and tunnel (SA packets and bytes, tunnel up/protected, key generation,
  rekeys, key limits used, forward secrecy each way) and VPP's ESP and guard error
  counters: a snapshot taken
  after a poll, at most every 5 s and never more than 1/20 of the agent's time, from
  VPP (status.collect: the same dumps and stats-segment reads as `vppmesh status`),
  written out as text once, when it is taken. A scrape never talks to VPP and formats
  nothing big: it copies that text behind the node metrics.

Why the per-tunnel families have their own formatter: with 1000 peers and 4 tunnels a
snapshot holds about 29,000 samples, and the library's generic exposition takes about
9 microseconds per sample here (over 250 ms). `MeshCollector.render` writes the very
same bytes (a unit test compares it with the library's `generate_latest` on the same
snapshot) from label strings built once per tunnel, in about 15 ms
(benchmarks/metrics_scrape.py).

SA counters in VPP restart whenever an SA is replaced (every rekey, a VPP restart). The
`_total` counters here add the last value of every retired SA, so they only ever grow.
The channel's counters restart when the agent opens a new channel endpoint (VPP's punt
socket moved); the `_total` counters here add only what they grew by.
"""

from __future__ import annotations

import logging
import ssl
import stat
import threading
import time
from collections import Counter as Counter_
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from vppmesh.channel.endpoint import PATHS
from vppmesh.channel.messages import Drop
from vppmesh.cni.reattach import PodReport
from vppmesh.config import Mesh
from vppmesh.dataplane.reconcile import gc_paused
from vppmesh.dataplane.vpp.client import VppApi
from vppmesh.dataplane.vpp.stats import StatsReader
from vppmesh.errors import ConfigError, VppUnavailableError
from vppmesh.keying.epochs import GenerationState
from vppmesh.keying.pairs import pair_secrecy
from vppmesh.ops.status import NodeStatus

if TYPE_CHECKING:
    from vppmesh.agent.secrecy import Secrecy

log = logging.getLogger("vppmesh.ops.metrics")

# VPP's error counters in the stats segment (/err/<node>/<counter name>) by our reason,
# IPv4 and IPv6 nodes; read by name (listing the stats directory of a big VPP is slow).
ERRORS = {reason: tuple(f"/err/{node}{v}-{rest}" for v in (4, 6))
          for reason, (node, rest) in {
              "replay": ("esp", "decrypt-tun/replay"),
              "decryption_failed": ("esp", "decrypt-tun/decryption_failed"),
              "no_matching_tunnel": ("ipsec", "tun-input/no_tunnel"),
              "guard": ("ip", "inacl/input ACL hits"),
          }.items()}
ERROR_COUNTERS = [name for names in ERRORS.values() for name in names]
LIMITS = ("packets", "bytes", "seconds")
# The channel's counters (Secrecy.counters()) exported as counters without a label.
# The roles a PSK has at a node during a rotation (keys.NodeSecrets.psks).
PSK_ROLES = ("current", "next", "previous")
# The roles of a node's private keys during a node key rotation (keys.NodeSecrets.private_keys).
KEY_ROLES = ("current", "previous")
CHANNEL_COUNTERS = {"handshakes": "handshakes_completed", "sent": "sent",
                    "received": "received", "nat_keepalives": "nat_keepalives",
                    "nat_probes": "nat_probes"}
# A snapshot (dumps and stats segment) is taken after a poll at most this often, and
# never more often than SNAPSHOT_COST_FACTOR times its own cost (so snapshots take at
# most 1/20 of the agent's time: about every 20 s at 1000 peers, benchmarks/README.md).
SNAPSHOT_EVERY_SECONDS = 5.0
SNAPSHOT_COST_FACTOR = 20.0
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class TunnelSample:
    peer: str
    tunnel: int
    up: bool
    protected: bool
    out_packets: int
    out_bytes: int
    in_packets: int
    in_bytes: int


@dataclass(frozen=True)
class PeerSample:
    peer: str
    generation: int  # the outbound key generation
    rekeys: int
    limits: tuple[float, float, float]  # fraction used of LIMITS, in that order
    # Keys agreed by the two agents (forward secret): (outbound, inbound).
    forward_secret: tuple[bool, bool] = (False, False)
    key_age: float = 0.0  # seconds the outbound key has been in use
    agreement_pending: float = 0.0  # seconds the next key's agreement has waited (0: none)
    stopped: bool = False  # failed closed: no key may be used towards the peer


@dataclass(frozen=True)
class Snapshot:
    tunnels: tuple[TunnelSample, ...] = ()
    peers: tuple[PeerSample, ...] = ()
    esp_errors: tuple[tuple[str, int], ...] = ()  # (reason, count), in ERRORS order
    guard_drops: int | None = None
    taken_at: float = 0.0


@dataclass
class _Totals:
    """Monotonic packets/bytes of one tunnel direction across SA replacements."""

    retired_packets: int = 0
    retired_bytes: int = 0
    live: dict[tuple[int | None, int], tuple[int, int]] = field(default_factory=dict)

    def update(self, current: dict[tuple[int | None, int], tuple[int, int]]) -> tuple[int, int]:
        for key, (packets, octets) in self.live.items():
            if key not in current:
                self.retired_packets += packets
                self.retired_bytes += octets
        self.live = current
        return (self.retired_packets + sum(p for p, _ in current.values()),
                self.retired_bytes + sum(b for _, b in current.values()))


class Observer:
    """Turns what VPP and the generation file say into snapshots, poll after poll."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, int, str], _Totals] = {}
        self._generations: dict[str, int] = {}
        self._rekeys: dict[str, int] = {}

    def snapshot(self, status: NodeStatus, mesh: Mesh, generations: GenerationState,
                 errors: dict[str, int] | None, *, vpp_pid: int | None,
                 now: float) -> Snapshot:
        settings = mesh.settings
        tunnels = []
        out_seq: dict[str, int] = {}
        seen: set[tuple[str, int, str]] = set()
        for peer in status.peers:
            for t in peer.tunnels:
                sa_out = {(vpp_pid, t.sa_out.sa_id): (t.sa_out.packets or 0, t.sa_out.bytes or 0)
                          } if t.sa_out is not None else {}
                sa_in = {(vpp_pid, s.sa_id): (s.packets or 0, s.bytes or 0) for s in t.sa_in}
                totals = []
                for direction, current in (("out", sa_out), ("in", sa_in)):
                    key = (peer.name, t.index, direction)
                    seen.add(key)
                    totals.append(self._totals.setdefault(key, _Totals()).update(current))
                if t.sa_out is not None:
                    out_seq[peer.name] = max(out_seq.get(peer.name, 0), t.sa_out.seq)
                (op, ob), (ip, ib) = totals
                tunnels.append(TunnelSample(peer.name, t.index, t.admin_up, t.protected,
                                            op, ob, ip, ib))
        for key in set(self._totals) - seen:  # a peer gone: its SAs are retired
            self._totals[key].update({})
        peers = []
        secrecy = pair_secrecy(generations, generations.peers)
        for name, pg in sorted(generations.peers.items()):
            last = self._generations.get(name)
            if last is not None and pg.out > last:
                self._rekeys[name] = self._rekeys.get(name, 0) + pg.out - last
            self._generations[name] = pg.out
            packets = out_seq.get(name, 0)
            limits = (packets / settings.key_max_packets,
                      packets * settings.underlay_mtu / settings.key_max_bytes,
                      max(0.0, now - pg.out_since) / settings.key_max_seconds)
            pair = secrecy[name]
            peers.append(PeerSample(
                name, pg.out, self._rekeys.get(name, 0), limits, (pair.outbound, pair.inbound),
                key_age=max(0.0, now - pg.out_since),
                agreement_pending=max(0.0, now - pg.agreeing_since)
                if pg.agreeing_since is not None else 0.0,
                stopped=pg.stopped_since is not None))
        esp = guard = None
        if errors is not None:
            counts = {reason: sum(errors.get(name, 0) for name in names)
                      for reason, names in ERRORS.items()}
            guard = counts.pop("guard")
            esp = tuple(counts.items())
        return Snapshot(tuple(tunnels), tuple(peers), esp or (), guard, now)


# (family name, help, type) of the per-peer families, in the order they are exposed.
FAMILIES = {
    "packets": ("vppmesh_tunnel_packets", "Packets through a tunnel's SAs (all key "
                "generations), by direction.", "counter"),
    "bytes": ("vppmesh_tunnel_bytes", "Bytes through a tunnel's SAs (all key generations), "
              "by direction.", "counter"),
    "up": ("vppmesh_tunnel_up", "1 if the tunnel interface is admin-up in VPP.", "gauge"),
    "protected": ("vppmesh_tunnel_protected", "1 if the tunnel is protected by IPsec SAs.",
                  "gauge"),
    "generation": ("vppmesh_key_generation", "The key generation this node sends on "
                   "towards the peer.", "gauge"),
    "rekeys": ("vppmesh_rekeys", "Outbound key generation steps towards the peer since "
               "the agent started.", "counter"),
    "limit": ("vppmesh_key_limit_used_ratio", "Fraction of each key limit (packets, bytes, "
              "seconds) the current outbound key has used; the agent rekeys at 0.5.",
              "gauge"),
    "forward_secret": ("vppmesh_peer_forward_secret", "1 if the keys of this direction "
                       "are agreed by the two nodes' agents (ephemeral: forward secret), 0 "
                       "if they derive from the static keys.", "gauge"),
    "key_age": ("vppmesh_key_age_seconds", "Seconds the outbound key towards the peer "
                "has been in use; with forward secrecy a recorded packet stays decryptable "
                "about this long plus rekey_grace.", "gauge"),
    "agreement_pending": ("vppmesh_key_agreement_pending_seconds", "Seconds the agreement "
                          "of the next outbound key with the peer's agent has been waiting "
                          "(0: none pending); growing without end is a stalled or blocked "
                          "channel.", "gauge"),
    "stopped": ("vppmesh_peer_stopped", "1 while the pair fails closed: no key may be used "
                "towards the peer (a key at its hard limit before a new one was agreed, or "
                "agreed keys required and the peer's agent unreachable).", "gauge"),
    "esp": ("vppmesh_esp_errors", "ESP packets VPP dropped, by reason (since VPP started).",
            "counter"),
    "guard": ("vppmesh_guard_dropped_packets", "Plain IP-in-IP packets dropped by the "
              "uplink guard (since VPP started).", "counter"),
}


class MeshCollector:
    """The per-peer and per-tunnel families of the last snapshot.

    Their text is written once per snapshot (update), not per scrape: snapshots come
    at most every 5 s while any number of scrapers may ask, and a scrape then only
    copies bytes.
    """

    def __init__(self) -> None:
        self._labels: dict[tuple[str, int], str] = {}
        self._state = (Snapshot(), b"")
        self.update(Snapshot())

    @property
    def snapshot(self) -> Snapshot:
        return self._state[0]

    def text(self) -> bytes:
        """The exposition of the last snapshot, as render() wrote it at update()."""
        return self._state[1]

    def update(self, snapshot: Snapshot) -> None:
        with gc_paused():
            text = self.render(snapshot).encode()
        self._state = (snapshot, text)  # one swap: a scrape sees one whole snapshot

    # -- the library's families (generic; also the reference for render()) ----------
    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        name, doc, _ = FAMILIES["packets"]
        packets = CounterMetricFamily(name, doc, labels=["peer", "tunnel", "direction"])
        name, doc, _ = FAMILIES["bytes"]
        octets = CounterMetricFamily(name, doc, labels=["peer", "tunnel", "direction"])
        name, doc, _ = FAMILIES["up"]
        up = GaugeMetricFamily(name, doc, labels=["peer", "tunnel"])
        name, doc, _ = FAMILIES["protected"]
        protected = GaugeMetricFamily(name, doc, labels=["peer", "tunnel"])
        for t in snap.tunnels:
            for direction, p, b in (("in", t.in_packets, t.in_bytes),
                                    ("out", t.out_packets, t.out_bytes)):
                packets.add_metric([t.peer, str(t.tunnel), direction], p)
                octets.add_metric([t.peer, str(t.tunnel), direction], b)
            up.add_metric([t.peer, str(t.tunnel)], int(t.up))
            protected.add_metric([t.peer, str(t.tunnel)], int(t.protected))
        yield from (packets, octets, up, protected)
        name, doc, _ = FAMILIES["generation"]
        generation = GaugeMetricFamily(name, doc, labels=["peer"])
        name, doc, _ = FAMILIES["rekeys"]
        rekeys = CounterMetricFamily(name, doc, labels=["peer"])
        name, doc, _ = FAMILIES["limit"]
        limit = GaugeMetricFamily(name, doc, labels=["peer", "limit"])
        name, doc, _ = FAMILIES["forward_secret"]
        secret = GaugeMetricFamily(name, doc, labels=["peer", "direction"])
        gauges = {kind: GaugeMetricFamily(*FAMILIES[kind][:2], labels=["peer"])
                  for kind in ("key_age", "agreement_pending", "stopped")}
        for p in snap.peers:
            generation.add_metric([p.peer], p.generation)
            rekeys.add_metric([p.peer], p.rekeys)
            for kind, used in zip(LIMITS, p.limits, strict=True):
                limit.add_metric([p.peer, kind], used)
            for direction, agreed in zip(("outbound", "inbound"), p.forward_secret,
                                         strict=True):
                secret.add_metric([p.peer, direction], int(agreed))
            for kind, family in gauges.items():
                family.add_metric([p.peer], float(getattr(p, kind)))
        yield from (generation, rekeys, limit, secret, *gauges.values())
        if snap.esp_errors:
            name, doc, _ = FAMILIES["esp"]
            esp = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, count in snap.esp_errors:
                esp.add_metric([reason], count)
            yield esp
        if snap.guard_drops is not None:
            name, doc, _ = FAMILIES["guard"]
            yield CounterMetricFamily(name, doc, value=snap.guard_drops)

    # -- the same text, fast --------------------------------------------------------
    def _tunnel_labels(self, peer: str, tunnel: int) -> str:
        key = (peer, tunnel)
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels[key] = f'peer="{escape(peer)}",tunnel="{tunnel}"'
        return labels

    def render(self, snapshot: Snapshot | None = None) -> str:
        """The families of collect() as generate_latest writes them (labels sorted)."""
        snap = self.snapshot if snapshot is None else snapshot
        out: list[str] = []
        add = out.append
        labels = [(t, self._tunnel_labels(t.peer, t.tunnel)) for t in snap.tunnels]

        def header(kind: str) -> str:
            name, doc, typ = FAMILIES[kind]
            full = f"{name}_total" if typ == "counter" else name
            add(f"# HELP {full} {doc}\n# TYPE {full} {typ}\n")
            return full

        for kind in ("packets", "bytes"):
            name, inbound, outbound = header(kind), f"in_{kind}", f"out_{kind}"
            for t, lab in labels:
                add(f'{name}{{direction="in",{lab}}} {number(getattr(t, inbound))}\n'
                    f'{name}{{direction="out",{lab}}} {number(getattr(t, outbound))}\n')
        for kind in ("up", "protected"):
            name = header(kind)
            for t, lab in labels:
                add(f"{name}{{{lab}}} {'1.0' if getattr(t, kind) else '0.0'}\n")
        peers = [(p, f'peer="{escape(p.peer)}"') for p in snap.peers]
        for kind in ("generation", "rekeys"):
            name = header(kind)
            for p, lab in peers:
                add(f"{name}{{{lab}}} {number(getattr(p, kind))}\n")
        name = header("limit")
        for p, lab in peers:
            packets, octets, seconds = p.limits
            add(f'{name}{{limit="packets",{lab}}} {floatToGoString(packets)}\n'
                f'{name}{{limit="bytes",{lab}}} {floatToGoString(octets)}\n'
                f'{name}{{limit="seconds",{lab}}} {floatToGoString(seconds)}\n')
        name = header("forward_secret")
        for p, lab in peers:
            outbound, inbound = ("1.0" if agreed else "0.0" for agreed in p.forward_secret)
            add(f'{name}{{direction="outbound",{lab}}} {outbound}\n'
                f'{name}{{direction="inbound",{lab}}} {inbound}\n')
        for kind in ("key_age", "agreement_pending", "stopped"):
            name = header(kind)
            for p, lab in peers:
                add(f"{name}{{{lab}}} {floatToGoString(float(getattr(p, kind)))}\n")
        if snap.esp_errors:
            name = header("esp")
            for reason, count in snap.esp_errors:
                add(f'{name}{{reason="{reason}"}} {number(count)}\n')
        if snap.guard_drops is not None:
            name = header("guard")
            add(f"{name} {number(snap.guard_drops)}\n")
        return "".join(out)


def escape(value: str) -> str:
    """A label value as the text format wants it (backslash, newline, double quote)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def number(value: int) -> str:
    """An integer sample value exactly as the client library writes it (a Go float)."""
    return f"{value}.0" if abs(value) < 10**15 else floatToGoString(value)


class AgentMetrics:
    """Everything the agent exposes: node metrics (library objects) and the snapshot."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.reconcile_seconds = Histogram(
            "vppmesh_reconcile_duration_seconds", "Duration of one agent poll: key "
            "generations, reconcile of VPP and Linux, pod re-attach.",
            buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.reconcile_errors = Counter(
            "vppmesh_reconcile_errors", "Polls that failed (VPP or the datastore "
            "unavailable excluded).",
            registry=self.registry)
        self.vpp_up = Gauge("vppmesh_vpp_up", "1 while VPP answers the agent.",
                            registry=self.registry)
        self.source_up = Gauge("vppmesh_mesh_source_up", "1 while the mesh source (the "
                               "datastore; a mesh file always) answers the agent.",
                               registry=self.registry)
        self.source_up.set(1)
        self.sa_counters_unavailable = Gauge(
            "vppmesh_sa_counters_unavailable", "1 while VPP's stats segment cannot be "
            "read: every run dumps all SAs for the key limits instead.",
            registry=self.registry)
        self.vpp_restarts = Counter(
            "vppmesh_vpp_restarts", "VPP restarts the agent recovered from.",
            registry=self.registry)
        self.recovery_seconds = Gauge(
            "vppmesh_vpp_recovery_seconds", "Seconds from VPP answering again to the mesh "
            "and every pod programmed again, at the last VPP restart.",
            registry=self.registry)
        self.vpp_down_seconds = Gauge(
            "vppmesh_vpp_unavailable_seconds", "Seconds VPP did not answer the agent, at "
            "the last VPP restart.", registry=self.registry)
        self.pods_attached = Gauge(
            "vppmesh_pods_attached", "CNI pods attached to VPP at the last check.",
            registry=self.registry)
        self.pod_reattachments = Counter(
            "vppmesh_pod_reattachments", "Pods re-attached after VPP lost them.",
            registry=self.registry)
        self.pods_collected = Counter(
            "vppmesh_pod_records_collected", "CNI records removed because the pod's "
            "network namespace was gone.", registry=self.registry)
        self.channel_up = Gauge(
            "vppmesh_channel_up", "1 while VPP punts the agents' channel (UDP 4501) to this "
            "agent; 0: keys stay static (VPP needs `punt { socket ... }`).",
            registry=self.registry)
        self.channel_sessions = Gauge(
            "vppmesh_channel_sessions", "Peers whose agent has a live channel session with "
            "this one.", registry=self.registry)
        self.channel_psk_sessions = Gauge(
            "vppmesh_channel_psk_sessions", "Live channel sessions by the role here of the "
            "PSK they were made with (current, next, previous): during a PSK rotation, "
            "how many pairs moved.", ["psk"], registry=self.registry)
        for role in PSK_ROLES:
            self.channel_psk_sessions.labels(psk=role)  # present from the start, at 0
        self.channel_key_sessions = Gauge(
            "vppmesh_channel_key_sessions", "Live channel sessions by the role of this "
            "node's private key they authenticated (current, previous): during its key "
            "rotation, KEY.previous may go once `previous` is 0 for good.", ["key"],
            registry=self.registry)
        for role in KEY_ROLES:
            self.channel_key_sessions.labels(key=role)
        self.previous_key_unvouched = Counter(
            "vppmesh_channel_previous_key_unvouched", "Peers whose public key changed in "
            "the mesh file without their agent vouching for the old one in time: the keys "
            "agreed under it were dropped (a replaced key, or KEY.previous removed too "
            "early).", registry=self.registry)
        self._unvouched_seen = 0
        self.channel_counters = {
            "handshakes": Counter("vppmesh_channel_handshakes", "Channel handshakes "
                                  "completed with peers' agents.", registry=self.registry),
            "sent": Counter("vppmesh_channel_messages_sent", "Messages sent to peers' "
                            "agents over the channel.", registry=self.registry),
            "received": Counter("vppmesh_channel_messages_received", "Authenticated "
                                "messages received from peers' agents.",
                                registry=self.registry),
            "nat_keepalives": Counter("vppmesh_channel_nat_keepalives", "RFC 3948 NAT "
                                      "keepalives sent from VPP's UDP 4500 (a node behind "
                                      "NAT: one per tunnel every 20 s).",
                                      registry=self.registry),
            "nat_probes": Counter("vppmesh_channel_nat_probes", "Pairs behind NAT probed "
                                  "at once on every tunnel's flow: ESP sent over a poll "
                                  "and none received (a NAT mapping lost).",
                                  registry=self.registry),
        }
        self.channel_paths = Counter(
            "vppmesh_channel_path_datagrams", "Authenticated channel datagrams received, "
            "by path: the underlay (UDP 4501 or the ESP flow) or inside the pair's tunnel "
            "(the path that keeps keys agreed while the underlay's are blocked).", ["path"],
            registry=self.registry)
        for path in PATHS:
            self.channel_paths.labels(path=path)
        self.forward_secrecy_downgrades = Counter(
            "vppmesh_forward_secrecy_downgrades", "Times a pair left agreed keys for the "
            "static schedule (forward_secrecy: preferred, the agents could not agree).",
            registry=self.registry)
        self.pairs_stopped = Gauge(
            "vppmesh_pairs_stopped", "Pairs failing closed after the last run: no key may "
            "be used towards them (vppmesh_peer_stopped names them).", registry=self.registry)
        self.channel_dropped = Counter(
            "vppmesh_channel_dropped", "Channel datagrams dropped (and otherwise ignored), "
            "by reason.", ["reason"], registry=self.registry)
        for reason in Drop:
            self.channel_dropped.labels(reason=reason.value)  # present from the start, at 0
        self._channel_seen: tuple[int | None, dict[str, int]] = (None, {})
        self.mesh = MeshCollector()
        self.observer = Observer()
        self._last_snapshot = -SNAPSHOT_EVERY_SECONDS
        self.snapshot_cost = 0.0  # seconds the last snapshot took
        self._stats: StatsReader | None = None
        self._stats_owner: tuple[Path | None, int | None] | None = None

    def record_poll(self, seconds: float, pods: PodReport | None, *, restarted: bool,
                    unavailable: float | None = None) -> None:
        """One successful agent poll; `restarted`: the first one with a new VPP, which
        took `seconds` from VPP answering (after `unavailable` seconds without it)."""
        self.vpp_up.set(1)
        self.reconcile_seconds.observe(seconds)
        if restarted:
            self.vpp_restarts.inc()
            self.recovery_seconds.set(seconds)
            if unavailable is not None:
                self.vpp_down_seconds.set(unavailable)
        if pods is not None:
            self.pods_attached.set(pods.attached)
            self.pod_reattachments.inc(len(pods.reattached))
            self.pods_collected.inc(len(pods.collected))

    def record_keys(self, downgraded: int, stopped: int) -> None:
        """A run's key outcome: pairs that left agreed keys, pairs failing closed."""
        if downgraded:
            self.forward_secrecy_downgrades.inc(downgraded)
        self.pairs_stopped.set(stopped)

    def record_channel(self, secrecy: Secrecy | None) -> None:
        """The agents' channel after a poll (None: the agent runs none). Its counters
        restart with each endpoint (secrecy.py opens a new one when VPP's punt socket
        moves), so only what they grew by since the last look is added."""
        endpoint = secrecy.endpoint if secrecy is not None else None
        self.channel_up.set(int(endpoint is not None))
        channel = endpoint.channel if endpoint is not None else None
        if secrecy is None or endpoint is None or channel is None:
            self.channel_sessions.set(0)
            for role in PSK_ROLES:
                self.channel_psk_sessions.labels(psk=role).set(0)
            for role in KEY_ROLES:
                self.channel_key_sessions.labels(key=role).set(0)
            return
        now = secrecy.clock()  # live sessions: an expired one is a peer gone quiet
        self.channel_sessions.set(sum(channel.established(n, now) for n in channel.peers()))
        roles = Counter_(channel.session_psk(n, now) for n in channel.peers())
        for role in PSK_ROLES:
            self.channel_psk_sessions.labels(psk=role).set(roles.get(role, 0))
        keys = Counter_(channel.session_key(n, now) for n in channel.peers())
        for role in KEY_ROLES:
            self.channel_key_sessions.labels(key=role).set(keys.get(role, 0))
        unvouched = secrecy.agreement.unvouched
        if unvouched > self._unvouched_seen:
            self.previous_key_unvouched.inc(unvouched - self._unvouched_seen)
            self._unvouched_seen = unvouched
        counters = secrecy.counters()
        origin, last = self._channel_seen
        if origin != id(endpoint):
            last = {}
        grown = [(self.channel_counters[kind], key) for kind, key in CHANNEL_COUNTERS.items()]
        grown += [(self.channel_dropped.labels(reason=reason.value), f"drop_{reason.value}")
                  for reason in Drop]
        grown += [(self.channel_paths.labels(path=path), f"path_{path}") for path in PATHS]
        for counter, key in grown:
            now, before = counters.get(key, 0), last.get(key, 0)
            if now != before:
                counter.inc(now - before if now > before else now)
        self._channel_seen = (id(endpoint), counters)

    def snapshot_due(self, now: float) -> bool:
        """Whether the per-tunnel snapshot is due (see SNAPSHOT_EVERY_SECONDS)."""
        interval = max(SNAPSHOT_EVERY_SECONDS, SNAPSHOT_COST_FACTOR * self.snapshot_cost)
        if now - self._last_snapshot < interval:
            return False
        self._last_snapshot = now
        return True

    def observe(self, api: VppApi, mesh: Mesh, node: str, stats_socket: Path | None,
                generations: GenerationState, *, vpp_pid: int | None,
                now: float | None = None) -> Snapshot:
        """Take a new snapshot from VPP (dumps, stats segment) and the generation file;
        `now`: the node's clock (vppmesh/agent/clock.py), the one the file's times are on."""
        from vppmesh.ops.status import collect

        started = time.monotonic()
        now = time.time() if now is None else now
        reader = self._reader(stats_socket, vpp_pid)
        try:
            status = collect(api, mesh, node, None, reader)
            errors = reader.counters(ERROR_COUNTERS) if reader is not None else None
        except (VppUnavailableError, OSError, KeyError, ValueError) as exc:
            if reader is None:
                raise
            log.debug("stats segment unreadable (%s): connecting again next time", exc)
            self._close_reader()
            status, errors = collect(api, mesh, node, None), None
        snapshot = self.observer.snapshot(status, mesh, generations, errors,
                                          vpp_pid=vpp_pid, now=now)
        self.mesh.update(snapshot)
        self.snapshot_cost = time.monotonic() - started
        return snapshot

    def _reader(self, stats_socket: Path | None, vpp_pid: int | None) -> StatsReader | None:
        """The stats segment, connected once per VPP (connecting maps and indexes the
        whole directory: 0.6 s at 1000 peers); None without a stats socket."""
        if self._stats is not None and self._stats_owner == (stats_socket, vpp_pid):
            return self._stats
        self._close_reader()
        if stats_socket is None or not stats_socket.exists():
            return None
        try:
            self._stats = StatsReader(stats_socket).__enter__()
        except (VppUnavailableError, OSError) as exc:
            log.debug("stats segment unavailable: %s", exc)
            return None
        self._stats_owner = (stats_socket, vpp_pid)
        return self._stats

    def _close_reader(self) -> None:
        reader, self._stats = self._stats, None
        if reader is not None:
            try:
                reader.close()
            except Exception:  # a segment whose VPP is gone may fail to unmap cleanly
                log.debug("closing the stats reader failed", exc_info=True)

    def exposition(self) -> bytes:
        """The whole scrape: node metrics (the library) and the last snapshot's text."""
        with gc_paused():
            return generate_latest(self.registry) + self.mesh.text()


def parse_listen(value: str) -> tuple[str, int]:
    """ADDR:PORT (ADDR may be empty or [v6]) for --metrics."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--metrics: {value!r} is not ADDR:PORT; e.g. 0.0.0.0:9477 or "
                          ":9477 (every address)")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class MetricsTls:
    """HTTPS for the endpoint and, with a client CA, only scrapers holding a certificate
    that CA signed (Prometheus' `tls_config` with `cert_file`/`key_file`).

    The files are read again when they change (checked at most every `reload_seconds`,
    on a scrape), so a rotated certificate (cert-manager, a renewed Secret) is served
    without restarting the agent; a rotation that does not load keeps the previous one.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None
    reload_seconds: float = 10.0

    def context(self) -> ssl.SSLContext:
        try:
            mode = self.key.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"--metrics-tls-key: cannot read {self.key} "
                              f"({exc.strerror})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"--metrics-tls-key: {self.key} has mode {stat.S_IMODE(mode):04o}; it must be "
                f"readable by its owner only: chmod 600 {self.key} (Kubernetes: "
                "defaultMode: 0400 on the Secret volume)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--metrics-tls-cert/--metrics-tls-key: cannot load {self.cert} with "
                f"{self.key} ({exc}); give a PEM certificate (chain) and its own private "
                "key") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--metrics-client-ca: cannot load {self.client_ca} "
                                  f"({exc}); give the PEM certificate of the CA that signs "
                                  "the scrapers' certificates") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def signature(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when a file is replaced (a Secret update swaps a symlink)."""
        found = []
        for path in (self.cert, self.key, self.client_ca):
            try:
                st = path.stat() if path is not None else None
            except OSError:
                st = None
            found.append((st.st_ino, st.st_mtime_ns, st.st_size) if st else (0, 0, 0))
        return tuple(found)


class MetricsServer:
    """The HTTP(S) endpoint (/metrics) in a daemon thread, one thread per scrape."""

    HANDSHAKE_SECONDS = 10.0  # a client that stalls gives up its thread after this

    def __init__(self, metrics: AgentMetrics, listen: tuple[str, int],
                 tls: MetricsTls | None = None) -> None:
        owner = metrics
        self.tls = tls
        self._context = tls.context() if tls is not None else None
        self._signature = tls.signature() if tls is not None else ()
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            timeout = self.HANDSHAKE_SECONDS

            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "metrics are at /metrics")
                    return
                body = owner.exposition()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # scrapes every few seconds would flood the agent's log

        class Server(ThreadingHTTPServer):
            def finish_request(self, request: Any, client_address: Any) -> None:
                """TLS handshake in the scrape's own thread, never in the accept loop."""
                context = endpoint.current_context()
                if context is None:
                    super().finish_request(request, client_address)
                    return
                request.settimeout(endpoint.HANDSHAKE_SECONDS)
                try:
                    wrapped = context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    log.debug("metrics: TLS handshake with %s failed: %s", client_address, exc)
                    return
                try:
                    super().finish_request(wrapped, client_address)
                finally:
                    wrapped.close()

        try:
            self.server = Server(listen, Handler)
        except OSError as exc:
            raise ConfigError(f"--metrics: cannot listen on {listen[0]}:{listen[1]}: "
                              f"{exc.strerror}; pick a free port") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="metrics")

    def current_context(self) -> ssl.SSLContext | None:
        """The TLS context, loaded again once its files have changed."""
        tls = self.tls
        if tls is None:
            return None
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= tls.reload_seconds:
                self._checked = now
                signature = tls.signature()
                if signature != self._signature:
                    self._signature = signature
                    try:
                        self._context = tls.context()
                        log.info("metrics: TLS certificate %s loaded again", tls.cert)
                    except ConfigError as exc:
                        log.warning("metrics: keeping the previous TLS certificate: %s", exc)
            return self._context

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def families(text: str) -> Iterable[Metric]:
    """Parse an exposition with the client library's own parser (tests, tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    return text_string_to_metric_families(text)


__all__ = ["AgentMetrics", "MeshCollector", "MetricsServer", "MetricsTls", "Observer",
           "Snapshot", "families", "parse_listen"]
