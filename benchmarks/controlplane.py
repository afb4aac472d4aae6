"""``python -m benchmarks.controlplane``: how fast the controller programs a big mesh.

One VPP (testbed profile, no traffic) in its own network namespace is programmed with a
synthetic mesh of N peers x T tunnels, seen from one node: 2·N·T SAs, N·T IPIP tunnels and
N ECMP routes. Per size it reports the first full reconcile, a no-op reconcile (with
dumps, and from the remembered state), one peer joining and one leaving, plan() and key
derivation, the controller's peak memory, VPP's heap per peer and the API messages sent.
Each size runs in a fresh process against a fresh VPP, so memory numbers do not mix.

The idle case (at the largest size) is `up --watch` with nothing to change: the CPU of
an agent polling every 2 s with its periodic full resync, and one peer joining from the
mesh file to VPP, with the SA counts for key limits read from the stats segment (the
agent's way) and from an SA dump on every run (the way before), in one run; and the
agent with the channel (its polls are quiet runs once the channel has settled; each
channel event that asks for a run costs one that decides the peer it concerns again,
the others' decisions taken from the last run; the channel's own idle CPU simulated
in process, benchmarks.channel_rotation).
Sizes go up to 5000 peers (pod CIDRs of /29 beyond 1000); targets are checked at 1000
and 5000 peers.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import ipaddress
import itertools
import os
import pstats
import re
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel, ConfigDict

from vppmesh.agent.node import FULL_EVERY_SECONDS, QuietRuns
from vppmesh.config import Mesh, MeshSettings, Node
from vppmesh.dataplane.plan import HostOptions, plan, plan_by_peer
from vppmesh.dataplane.reconcile import Reconciler
from vppmesh.dataplane.startup import MeshSize, fit_to_mesh, load_profile
from vppmesh.dataplane.state import DesiredState
from vppmesh.dataplane.view import build_view
from vppmesh.dataplane.vpp import interfaces, ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.keying.keys import NodeSecrets, derive_sa_key, pair_secret, public_key_b64
from vppmesh.lab.testbed import TestbedError, find_vpp, require_root, single_vpp

DEFAULT_SIZES = (100, 300, 1000)
DEFAULT_PREFIX = "vmc-"
DEFAULT_BASE = Path("/run/vppmesh-vmc")
RESULTS_DIR = Path(__file__).parent / "results"
UPLINK = "loop0"
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/16")  # RFC 2544 benchmarking range
PODS = ipaddress.IPv4Network("198.19.0.0/16")
POD_PREFIX = 26  # 1,024 pod CIDRs fit in PODS
LARGE_POD_PREFIX = 29  # beyond 1,022 peers: 8,192 fit
MAX_PEERS = 5000
BASELINE_SAS = 2000
AGENT_RATIO = 1.5  # datastore agent vs file mode, for the same change
# Targets by mesh size (issue 30 adds the first reconcile at 5000 peers).
TARGETS = {1000: {"first_reconcile_s": 2.0, "noop_full_s": 1.0, "add_peer_s": 0.020,
                  "remove_peer_s": 0.020},
           5000: {"first_reconcile_s": 5.0}}


class SizeResult(BaseModel):
    """Everything measured for one mesh size (seconds, bytes, message counts)."""

    model_config = ConfigDict(extra="forbid")
    peers: int
    tunnels_per_peer: int
    sas: int
    tunnels: int
    routes: int
    key_derivation_s: float
    plan_cold_s: float
    plan_warm_s: float
    load_average: str
    first_reconcile_s: float
    first_reconcile_cpu_s: float
    first_reconcile_breakdown: dict[str, float]
    first_reconcile_messages: int
    messages_per_s: float
    noop_full_s: float
    noop_full_cpu_s: float
    noop_full_breakdown: dict[str, float]
    noop_full_messages: int
    noop_incremental_s: float
    noop_incremental_cpu_s: float
    add_peer_s: float
    add_peer_cpu_s: float
    add_peer_messages: int
    remove_peer_s: float
    remove_peer_cpu_s: float
    remove_peer_messages: int
    controller_rss_base_bytes: int
    controller_rss_peak_bytes: int
    vpp_heap_before_bytes: int
    vpp_heap_after_bytes: int
    vpp_heap_per_peer_bytes: float
    converged: bool
    profile: str = ""


class BaselineResult(BaseModel):
    """vpp-papi's synchronous client against this one, on the same VPP and the same SAs."""

    model_config = ConfigDict(extra="forbid")
    sas: int
    papi_sync_messages_per_s: float
    papi_sync_dump_s: float
    pipelined_messages_per_s: float
    pipelined_dump_s: float


class AgentResult(BaseModel):
    """One peer joining and leaving, applied by the long-running agent in both modes:
    `up --watch` with a mesh file and `up --watch --datastore` with every peer in etcd.

    Times are the agent's run from "something changed" to "VPP holds it" (median of
    the rounds); `phases` says where one change's time goes, per mode (median)."""

    model_config = ConfigDict(extra="forbid")
    peers: int
    tunnels_per_peer: int
    rounds: int
    load_average: str
    file_join_s: float
    file_leave_s: float
    datastore_join_s: float
    datastore_leave_s: float
    join_ratio: float  # datastore / file
    leave_ratio: float
    file_phases: dict[str, float]
    datastore_phases: dict[str, float]
    messages_per_change: int
    converged: bool


class IdleMode(BaseModel):
    """The idle agent with one way of reading SA counts for the key generations, or with
    the channel ("channel": counters; the polls quiet, each run-waking channel event a
    run that decides one peer again: OnePeerSpoke)."""

    model_config = ConfigDict(extra="forbid")
    # "counters" (stats segment) | "dumps" (an SA dump every run, as before) | "channel"
    mode: str
    steady_run_s: float  # median of the rounds: a poll with nothing to change
    steady_run_cpu_s: float
    full_run_s: float  # the periodic resync (full_every)
    full_run_cpu_s: float
    cpu_s_per_minute: float  # 29 steady polls and one full resync
    sa_dumps_per_steady_run: float
    sa_dumps_per_full_run: float
    join_s: float  # median: mesh file written -> the run that programmed VPP ended
    join_cpu_s: float
    leave_s: float
    join_phases: dict[str, float]
    # "channel": the channel's own idle CPU (share of a core: timers, session rekeys,
    # acknowledgements; benchmarks.channel_rotation's simulation of the node and its
    # peers without rotation) and the channel events per second that ask for a run at
    # once (Secrecy.service), on top of the polls.
    channel_cpu_share: float = 0.0
    channel_run_events_per_s: float = 0.0
    runs_per_s: float = 1 / 2.0


class IdleResult(BaseModel):
    """`up --watch` at N peers with nothing to change, and one peer joining, per mode."""

    model_config = ConfigDict(extra="forbid")
    peers: int
    tunnels_per_peer: int
    rounds: int
    poll_s: float
    full_every_s: float
    load_average: str
    modes: list[IdleMode]
    converged: bool


class RunResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    started: str
    command: str
    machine: dict[str, str]
    vpp_version: str
    baseline: BaselineResult | None
    results: list[SizeResult]
    agents: AgentResult | None = None
    idle: IdleResult | None = None


# ---- the synthetic mesh ------------------------------------------------------------------
def node_key(number: int) -> X25519PrivateKey:
    """Deterministic per node, so every run plans the very same keys."""
    return X25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"vppmesh controlplane benchmark node %d" % number).digest())


def pod_prefix(peers: int) -> int:
    """Pod CIDRs as before up to 1000 peers (results stay comparable), smaller beyond."""
    return POD_PREFIX if peers + 2 < 1 << (POD_PREFIX - PODS.prefixlen) else LARGE_POD_PREFIX


def statseg(peers: int, tunnels: int) -> str:
    """VPP's stats segment for the mesh, as `render-startup --peers --tunnels` gives it:
    the testbed profile's 64M, raised where the mesh needs more (at 5000 peers x 4
    tunnels the directory alone outgrows 64M and VPP stops answering)."""
    return fit_to_mesh(load_profile("testbed"), MeshSize(peers, tunnels)).statseg_size


def synthetic_node(number: int, tunnels: int, prefix: int = POD_PREFIX) -> Node:
    base = int(UNDERLAY.network_address) + number * 8
    pods = int(PODS.network_address) + number * (1 << (32 - prefix))
    return Node(
        name=f"n{number}", node_number=number,
        underlay=[ipaddress.IPv4Interface((base + t, UNDERLAY.prefixlen))
                  for t in range(tunnels)],
        pod_cidr=ipaddress.IPv4Network((pods, prefix)),
        public_key=public_key_b64(node_key(number)),
        uplink=UPLINK if number == 1 else None,
    )


def synthetic_mesh(peers: int, tunnels: int) -> tuple[Mesh, NodeSecrets]:
    """Node 1 (the one measured) and `peers` + 1 peers: the last one is there to join."""
    if not 1 <= peers <= MAX_PEERS:
        raise SystemExit(f"--sizes: {peers} peers is out of range (1..{MAX_PEERS})")
    nodes = [synthetic_node(number, tunnels, pod_prefix(peers))
             for number in range(1, peers + 3)]
    mesh = Mesh(settings=MeshSettings(tunnels_per_peer=tunnels), nodes=nodes)
    return mesh, NodeSecrets(private_key=node_key(1))


def with_nodes(mesh: Mesh, keep: list[Node]) -> Mesh:
    return mesh.model_copy(update={"nodes": keep})


def plan_for(mesh: Mesh, secrets: NodeSecrets, workers: int) -> DesiredState:
    return plan(build_view(mesh, "n1", secrets), workers=workers, host=HostOptions(kind="none"))


def derive_all(mesh: Mesh, secrets: NodeSecrets) -> None:
    """Every key plan() derives (X25519 per peer, HKDF per SA), for timing alone."""
    for peer in mesh.peers_of("n1"):
        shared = pair_secret(secrets, peer.public_key_bytes)
        for tunnel in range(mesh.settings.tunnels_per_peer):
            for sender, receiver in (("n1", peer.name), (peer.name, "n1")):
                derive_sa_key(shared, secrets.psk, sender=sender, receiver=receiver,
                              tunnel=tunnel, epoch=mesh.settings.key_epoch)


# ---- VPP ---------------------------------------------------------------------------------
def give_uplink(api: VppClient, address: ipaddress.IPv4Interface) -> None:
    """A loopback stands in for the uplink: nothing is sent, only programmed."""
    index = api.call(interfaces.create_loopback("02:fe:cc:00:00:01", "uplink")).sw_if_index
    api.call_many([interfaces.address(index, address, True),
                   interfaces.set_admin(index, True, "uplink")])


def heap_used(api: VppClient) -> int:
    """Bytes in use on VPP's main heap (`show memory`: live, unlike the stats gauge)."""
    text = api.cli("show memory main-heap")
    match = re.search(r"used: ([\d.]+)([KMGT]?)", text)
    if match is None:
        raise RuntimeError(f"unexpected `show memory` output: {text[:200]!r}")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- one size ----------------------------------------------------------------------------
def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def timed_cpu(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """(result, wall seconds, this process's CPU seconds): the machine is shared, and CPU
    time is the controller's own cost whatever else runs (VPP included)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(peers: int, tunnels: int, workers: int, prefix: str, base_dir: Path, heap: str,
            profile: bool, rounds: int = 5) -> SizeResult:
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    mesh, secrets = synthetic_mesh(peers, tunnels)
    nodes = list(mesh.nodes)
    current = with_nodes(mesh, nodes[:-1])  # n1 and `peers` peers
    joined = mesh  # plus one

    derive_sa_key.cache_clear()
    _, keys_s = timed(derive_all, current, secrets)
    derive_sa_key.cache_clear()
    desired, plan_cold_s = timed(plan_for, current, secrets, workers)
    desired, plan_warm_s = timed(plan_for, current, secrets, workers)
    # As the agent does: it keeps its view and builds the joined mesh's from it, so every
    # other peer's planned objects are the same ones, compared peer by peer (plan.py).
    current_view = build_view(current, "n1", secrets)
    desired, parts = plan_by_peer(current_view, workers=workers, host=HostOptions(kind="none"))
    desired_joined, joined_parts = plan_by_peer(
        build_view(joined, "n1", secrets, previous=current_view), workers=workers,
        host=HostOptions(kind="none"))

    with single_vpp(f"{prefix}cp", base_dir / "controlplane", main_heap_size=heap,
                    statseg_size=statseg(peers, tunnels)) as instance, \
            VppClient(instance.api_socket, timeout=60).connect() as api:
        give_uplink(api, mesh.node("n1").primary)  # type: ignore[arg-type]
        rss_base = rss_bytes()
        heap_before = heap_used(api)
        reconciler = Reconciler(api)

        profiler = cProfile.Profile() if profile else None
        sent = api.messages_sent
        if profiler:
            profiler.enable()
        _, first_s, first_cpu = timed_cpu(reconciler.reconcile, desired, by_peer=parts)
        if profiler:
            profiler.disable()
        first_breakdown = dict(reconciler.last_timings)
        first_messages = api.messages_sent - sent
        heap_after = heap_used(api)

        sent = api.messages_sent
        changes, noop_full_s, noop_full_cpu = timed_cpu(reconciler.reconcile, desired, full=True,
                                                        by_peer=parts)
        assert changes == [], [str(c) for c in changes[:5]]
        noop_full_breakdown = dict(reconciler.last_timings)
        noop_full_messages = api.messages_sent - sent
        changes, noop_inc_s, noop_inc_cpu = timed_cpu(reconciler.reconcile, desired,
                                                      by_peer=parts)
        assert changes == []

        # One peer joins, then leaves again; the median of a few rounds, as the machine
        # is shared and a single sample of a few milliseconds is noisy.
        add: list[tuple[float, float, int]] = []
        remove: list[tuple[float, float, int]] = []
        for _ in range(rounds):
            for target, by_peer, samples in ((desired_joined, joined_parts, add),
                                             (desired, parts, remove)):
                sent = api.messages_sent
                changes, wall, cpu = timed_cpu(reconciler.reconcile, target, by_peer=by_peer)
                assert changes and reconciler.last_scope is not None and \
                    len(reconciler.last_scope) == 1
                samples.append((wall, cpu, api.messages_sent - sent))
        # Dumps from scratch must agree that VPP holds exactly the last desired state.
        converged = Reconciler(api).reconcile(desired, dry_run=True) == []
        rss_peak = rss_bytes()

    text = ""
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        text = out.getvalue()
    return SizeResult(
        peers=peers, tunnels_per_peer=tunnels, sas=len(desired.sas),
        tunnels=len(desired.tunnels), routes=len(desired.routes),
        key_derivation_s=keys_s, plan_cold_s=plan_cold_s, plan_warm_s=plan_warm_s,
        load_average=load,
        first_reconcile_s=first_s, first_reconcile_cpu_s=first_cpu,
        first_reconcile_breakdown=first_breakdown,
        first_reconcile_messages=first_messages,
        messages_per_s=first_messages / max(first_breakdown["apply"], 1e-9),
        noop_full_s=noop_full_s, noop_full_cpu_s=noop_full_cpu,
        noop_full_breakdown=noop_full_breakdown, noop_full_messages=noop_full_messages,
        noop_incremental_s=noop_inc_s, noop_incremental_cpu_s=noop_inc_cpu,
        add_peer_s=median(w for w, _, _ in add), add_peer_cpu_s=median(c for _, c, _ in add),
        add_peer_messages=max(m for _, _, m in add),
        remove_peer_s=median(w for w, _, _ in remove),
        remove_peer_cpu_s=median(c for _, c, _ in remove),
        remove_peer_messages=max(m for _, _, m in remove),
        controller_rss_base_bytes=rss_base, controller_rss_peak_bytes=rss_peak,
        vpp_heap_before_bytes=heap_before, vpp_heap_after_bytes=heap_after,
        vpp_heap_per_peer_bytes=(heap_after - heap_before) / peers,
        converged=converged, profile=text,
    )


def measure_baseline(prefix: str, base_dir: Path, sas: int = BASELINE_SAS) -> BaselineResult:
    """The starting point: one round trip per message through vpp-papi, as before."""
    import logging

    from vpp_papi import VPPApiClient

    mesh, secrets = synthetic_mesh(sas // (2 * 4), 4)
    specs = plan_for(with_nodes(mesh, mesh.nodes[:-1]), secrets, 0).sas[:sas]
    requests = [ipsec.add_sa(s) for s in specs]
    with single_vpp(f"{prefix}cp", base_dir / "controlplane") as instance:
        papi = VPPApiClient(server_address=str(instance.api_socket), bootstrapapi=True,
                            logger=logging.getLogger("benchmark.papi"), use_socket=True)
        papi.connect("vppmesh-baseline")
        try:
            started = time.perf_counter()
            for request in requests:
                reply = getattr(papi.api, request.name)(**request.args)
                assert reply.retval == 0, reply.retval
            papi_rate = len(requests) / (time.perf_counter() - started)
            _, papi_dump_s = timed(papi.api.ipsec_sa_v5_dump, sa_id=ipsec.ALL_SAS)
        finally:
            papi.disconnect()
        with VppClient(instance.api_socket, timeout=60).connect() as api:
            api.call_many([ipsec.del_sa(s.sa_id) for s in specs])
            _, pipelined_s = timed(api.call_many, requests)
            _, pipelined_dump_s = timed(api.dump, "ipsec_sa_v5_dump", sa_id=ipsec.ALL_SAS)
    return BaselineResult(sas=len(requests), papi_sync_messages_per_s=papi_rate,
                          papi_sync_dump_s=papi_dump_s,
                          pipelined_messages_per_s=len(requests) / pipelined_s,
                          pipelined_dump_s=pipelined_dump_s)


# ---- the agent in both modes ---------------------------------------------------------------
# Where one change's time goes: each phase is one or two functions of the agent's run,
# timed where they are called (the rest of `up` is "other"). reconcile() looks for the
# uplink only on full runs, so "uplink and guard" is `up`'s own lookup.
PHASES = (("source", "vppmesh.agent.node", "MeshFile.mesh"),
          ("source", "vppmesh.agent.datastore.membership", "MembershipSource.mesh"),
          ("view", "vppmesh.agent.node", "local_view"),
          ("key state: SAs (dump or counters)", "vppmesh.agent.node", "read_key_sas"),
          ("key state: observe", "vppmesh.agent.node", "observe_keys"),
          ("generations", "vppmesh.keying.epochs", "schedule"),
          ("plan", "vppmesh.agent.node", "planned"),
          ("reconcile", "vppmesh.agent.node", "apply"),
          ("generation file", "vppmesh.keying.epochs", "GenerationStore.load"),
          ("generation file", "vppmesh.keying.epochs", "GenerationStore.save"),
          ("uplink and guard", "vppmesh.dataplane.vpp.interfaces", "find_uplink"),
          ("uplink and guard", "vppmesh.host.guard", "ensure"),
          ("VPP pid and workers", "vppmesh.dataplane.vpp.system", "vpp_pid"),
          ("VPP pid and workers", "vppmesh.dataplane.vpp.system", "worker_count"),
          ("mesh changed? (compare)", "vppmesh.config", "Mesh.__eq__"),
          ("key and PSK files (stat)", "vppmesh.agent.node", "Agent._secret_files"),
          ("NAT ports", "vppmesh.agent.nat", "ported_view"),
          ("NAT ports", "vppmesh.agent.nat", "saved_ports"),
          ("keying: usable", "vppmesh.agent.node", "usable_keying"),
          ("keying: agreed", "vppmesh.keying.book", "KeyBook.agreed"),
          ("generation file", "vppmesh.keying.epochs", "GenerationStore.text"),
          ("result: pair secrecy", "vppmesh.agent.node", "pair_secrecy"),
          ("result: next change", "vppmesh.keying.epochs", "next_change"))
RECONCILE_PARTS = ("index", "observe", "diff", "apply")


GC_PHASE = "garbage collection"


class Phases:
    """Wraps the functions of PHASES with timers (in this benchmark process only), and
    times the cyclic garbage collections that run outside them (GC_PHASE): a run pauses
    the collector while it allocates (reconcile.gc_paused), and the collections that
    follow walk what the run left."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._undo: list[tuple[object, str, object]] = []
        self._depth = 0  # phases under way: a collection inside one is that phase's
        self._collecting: float | None = None

    def _collection(self, event: str, info: dict[str, int]) -> None:
        if event == "start":
            self._collecting = time.perf_counter() if self._depth == 0 else None
        elif self._collecting is not None:
            self.spent[GC_PHASE] = self.spent.get(GC_PHASE, 0.0) + \
                time.perf_counter() - self._collecting
            self._collecting = None

    def __enter__(self) -> Phases:
        import gc
        import importlib

        gc.callbacks.append(self._collection)

        for phase, module, name in PHASES:
            owner: object = importlib.import_module(module)
            attr = name
            if "." in name:
                cls, attr = name.split(".")
                owner = getattr(owner, cls)
            original = getattr(owner, attr)
            raw = vars(owner).get(attr) if isinstance(owner, type) else None
            self._undo.append((owner, attr, raw if raw is not None else original))
            wrapped = self._timed(phase, original)
            setattr(owner, attr, staticmethod(wrapped) if isinstance(raw, staticmethod)
                    else wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        gc.callbacks.remove(self._collection)
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)

    def _timed(self, phase: str, fn):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - started
        return timed


def one_change(run, reconciler_of, phases: Phases):  # type: ignore[no-untyped-def]
    """(seconds, phases, API messages) of one agent run that applies one peer's change."""
    phases.spent.clear()
    reconciler = reconciler_of()
    sent = reconciler.api.messages_sent
    result, seconds = timed(run)
    assert result.changes and any(c.kind == "tunnel" for c in result.changes), \
        [str(c) for c in result.changes]
    spent = dict(phases.spent)
    assert reconciler is not None and reconciler.last_scope is not None and \
        len(reconciler.last_scope) == 1, "not applied from the remembered state"
    for part in RECONCILE_PARTS:
        spent[f"reconcile: {part}"] = reconciler.last_timings[part]
    # The reconcile's parts are inside its phase; "key state: ..." are phases of their own.
    spent["other"] = seconds - sum(v for k, v in spent.items()
                                   if not k.startswith("reconcile: "))
    spent["total"] = seconds
    return seconds, spent, reconciler.api.messages_sent - sent


def measure_agents(peers: int, tunnels: int, prefix: str, base_dir: Path, heap: str,
                   rounds: int = 5) -> AgentResult:
    """The same joins and leaves through the mesh file's Agent and the datastore agent,
    on one VPP holding `peers` peers; each round a new peer (a key never used before)."""
    import tempfile

    from vppmesh.agent.datastore.etcd import EtcdStore, b64
    from vppmesh.agent.datastore.membership import DatastoreOptions, LocalNode, MembershipSource
    from vppmesh.agent.datastore.records import DatastoreUrl, encode_record
    from vppmesh.agent.node import Agent, NodeOptions
    from vppmesh.config import dump_mesh
    from vppmesh.dataplane.vpp.stats import SaCounters
    from vppmesh.keying.keys import private_key_b64, write_secret_file
    from vppmesh.lab.etcd import running_etcd

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    mesh, secrets = synthetic_mesh(peers, tunnels)
    base = with_nodes(mesh, mesh.nodes[:-1])  # n1 and `peers` peers
    joiners = [synthetic_node(peers + 2 + i, tunnels, pod_prefix(peers))
               for i in range(2 * rounds)]
    local = base.nodes[0]
    work = Path(tempfile.mkdtemp(prefix="vppmesh-agents-"))
    key = work / "n1.key"
    write_secret_file(key, private_key_b64(secrets.private_key))
    mesh_file = work / "mesh.yaml"
    samples: dict[str, list[tuple[float, dict[str, float], int]]] = {
        "file join": [], "file leave": [], "datastore join": [], "datastore leave": []}
    with single_vpp(f"{prefix}ag", base_dir / "agents", main_heap_size=heap,
                    statseg_size=statseg(peers, tunnels)) as instance, \
            Phases() as phases:
        with VppClient(instance.api_socket, timeout=60).connect() as api:
            give_uplink(api, local.primary)  # type: ignore[arg-type]
        options = NodeOptions(mesh_file=mesh_file, node="n1", private_key=key,
                              api_socket=instance.api_socket, host_link="none", workers=0,
                              state_dir=work)
        # `up --watch` with a mesh file: the file changes, the next poll applies it.
        mesh_file.write_text(dump_mesh(base))
        session = Agent(options, counters=SaCounters(instance.stats_socket))
        try:
            session.run()  # programs the whole mesh
            session.run()
            for joiner in joiners[:rounds]:
                mesh_file.write_text(dump_mesh(with_nodes(base, [*base.nodes, joiner])))
                samples["file join"].append(one_change(
                    session.run, lambda: session._reconciler, phases))
                mesh_file.write_text(dump_mesh(base))
                samples["file leave"].append(one_change(
                    session.run, lambda: session._reconciler, phases))
        finally:
            session.close()
        # `up --watch --datastore`: every peer registered in etcd; a record comes or goes,
        # the agent's next sync applies it (the watch and its debounce are not timed).
        with running_etcd(data_dir=work / "etcd") as etcd:
            store = EtcdStore(DatastoreUrl.parse(etcd.url()))
            store.seed_settings(base.settings)
            lease = store.grant(3600)
            url = store.url

            def put(node: Node) -> list[dict[str, object]]:
                return [{"request_put": {"key": b64(url.node_key(node.name)),
                                         "value": b64(encode_record(node)),
                                         "lease": lease.id}},
                        {"request_put": {"key": b64(url.number_key(node.node_number)),
                                         "value": b64(node.name)}}]

            others = base.nodes[1:]
            for start in range(0, len(others), 64):  # etcd takes 128 operations per txn
                store._txn([], [op for n in others[start:start + 64] for op in put(n)])
            member = MembershipSource(options, DatastoreOptions(url=url, local=LocalNode(
                underlay=tuple(local.underlay), pod_cidr=local.pod_cidr,
                node_number=local.node_number, uplink=local.uplink)), store=store,
                stats_socket=instance.stats_socket)
            try:
                member.sync()  # registers n1, dumps VPP: the mesh is already there
                member.sync()
                for joiner in joiners[rounds:]:
                    store._txn([], put(joiner))
                    samples["datastore join"].append(one_change(
                        member.sync, lambda: member.session._reconciler, phases))
                    store.deregister(joiner.name)
                    samples["datastore leave"].append(one_change(
                        member.sync, lambda: member.session._reconciler, phases))
                client = member.session.client
                assert client is not None
                last = member.sync()  # dumps from scratch must agree with the last plan
                assert last is not None
                converged = Reconciler(client).reconcile(last.desired, dry_run=True) == []
            finally:
                member.session.close()
                store.revoke(lease)
    shutil.rmtree(work, ignore_errors=True)

    def seconds(name: str) -> float:
        return median(s for s, _, _ in samples[name])

    def phase_medians(mode: str) -> dict[str, float]:
        changes = samples[f"{mode} join"] + samples[f"{mode} leave"]
        return {k: median(p.get(k, 0.0) for _, p, _ in changes) for k in changes[0][1]}

    return AgentResult(
        peers=peers, tunnels_per_peer=tunnels, rounds=rounds, load_average=load,
        file_join_s=seconds("file join"), file_leave_s=seconds("file leave"),
        datastore_join_s=seconds("datastore join"),
        datastore_leave_s=seconds("datastore leave"),
        join_ratio=seconds("datastore join") / seconds("file join"),
        leave_ratio=seconds("datastore leave") / seconds("file leave"),
        file_phases=phase_medians("file"), datastore_phases=phase_medians("datastore"),
        messages_per_change=max(m for v in samples.values() for _, _, m in v),
        converged=converged)


# ---- the idle agent ---------------------------------------------------------------------
POLL_SECONDS = 2.0  # `up --watch`'s poll (watch.WATCH_POLL_SECONDS)
FULL_EVERY = FULL_EVERY_SECONDS  # Agent.full_every
# Issue 30: an idle agent (with and without the channel) and one peer joining.
IDLE_TARGETS = {1000: {"cpu_share": 0.01, "join_s": 0.020, "join_reconcile_s": 0.005},
                5000: {"cpu_share": 0.03}}
IDLE_MODES = ("dumps", "counters", "channel")
CHANNEL_SECONDS = 300.0  # simulated stretch of the idle channel (after its warm-up)
# The channel's events after which Secrecy.service asks for a run at once (a completed
# handshake, a session rekey every 2 minutes per peer, does not).
CHANNEL_RUN_EVENTS = ("GenerationKeyed", "PeerAcked", "PeerRestarted", "EndpointChanged",
                      "FlowSeen")


class OnePeerSpoke(QuietRuns):
    """QuietRuns as a run woken by one channel event sees them: the channel said
    something (ChannelAgreement.settles is false), so the run does not reuse the last
    one as a whole, and what it said concerns one peer (an "installed", a "slid", a
    KeyInit's keys: Agreement.peer_marks), so that peer is decided again and the others
    are the last run's (keying/settled.py). The peer spoken of changes from run to run."""

    def __init__(self) -> None:
        super().__init__()
        clean, turn = self.peers.clean, itertools.count()

        def one_peer_spoke(*args: Any, **kwargs: Any) -> dict[str, Any]:
            found = clean(*args, **kwargs)
            if found:
                found.pop(sorted(found)[next(turn) % len(found)])
            return found
        self.peers.clean = one_peer_spoke  # type: ignore[method-assign]

    def unchanged(self, *args: Any, **kwargs: Any) -> None:
        return None


def idle_channel(peers: int, tunnels: int) -> tuple[float, float]:
    """(the channel's CPU share of a core, run-waking events per second) of the node's
    channel with `peers` peers and nothing to rotate, simulated in process."""
    from benchmarks.channel_rotation import simulate, summarize

    run = simulate(peers, 0, CHANNEL_SECONDS, grace=10.0, tunnels=tunnels, seed=1)
    row = summarize(0, tunnels, [run])
    events = sum(run["events"].get(k, 0) for k in CHANNEL_RUN_EVENTS) / run["duration_s"]
    return (row["channel_cpu_pct"] + row["wakeup_ticks_cpu_pct"]) / 100.0, events


class SaDumps:
    """Counts ipsec.dump_sas calls (the key generations' and the reconcile's)."""

    def __init__(self) -> None:
        self.count = 0
        self._original = None

    def __enter__(self) -> SaDumps:
        self._original = original = ipsec.dump_sas

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.count += 1
            return original(*args, **kwargs)
        ipsec.dump_sas = counted  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        ipsec.dump_sas = self._original  # type: ignore[assignment]


def measure_idle(peers: int, tunnels: int, prefix: str, base_dir: Path, heap: str,
                 rounds: int = 10, modes: tuple[str, ...] = IDLE_MODES) -> IdleResult:
    """One VPP holding `peers` peers; per mode a new agent (Agent, as `up --watch` makes
    it) on it: its first run (full), `rounds` polls with nothing to change, a periodic
    resync, then `rounds` // 2 peers joining and leaving through the mesh file (each a new
    peer). CPU is this process's (the agent's), whatever else the shared machine runs."""
    import tempfile

    from vppmesh.agent.node import Agent, NodeOptions
    from vppmesh.config import dump_mesh
    from vppmesh.dataplane.vpp.stats import SaCounters
    from vppmesh.keying.keys import private_key_b64, write_secret_file

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    mesh, secrets = synthetic_mesh(peers, tunnels)
    base = with_nodes(mesh, mesh.nodes[:-1])
    joins = max(1, rounds // 2)
    joiners = iter([synthetic_node(peers + 2 + i, tunnels, pod_prefix(peers))
                    for i in range(joins * len(modes))])
    work = Path(tempfile.mkdtemp(prefix="vppmesh-idle-"))
    key = work / "n1.key"
    write_secret_file(key, private_key_b64(secrets.private_key))
    mesh_file = work / "mesh.yaml"
    mesh_file.write_text(dump_mesh(base))
    results = []
    with single_vpp(f"{prefix}id", base_dir / "idle", main_heap_size=heap,
                    statseg_size=statseg(peers, tunnels)) as instance, \
            Phases() as phases, SaDumps() as dumps:
        with VppClient(instance.api_socket, timeout=60).connect() as api:
            give_uplink(api, base.nodes[0].primary)  # type: ignore[arg-type]
        options = NodeOptions(mesh_file=mesh_file, node="n1", private_key=key,
                              api_socket=instance.api_socket, host_link="none", workers=0,
                              state_dir=work)
        for mode in modes:
            counters = SaCounters(instance.stats_socket) if mode != "dumps" else None
            # Resyncs come when this benchmark says (full_every is far away).
            session = Agent(options, counters=counters, full_every=1e9)
            if mode == "channel":
                session._quiet = OnePeerSpoke()
            try:
                session.run()  # the agent starts: full (the first mode programs VPP)
                steady = []
                for _ in range(rounds):
                    before = dumps.count
                    result, wall, cpu = timed_cpu(session.run)
                    assert result.changes == [], [str(c) for c in result.changes[:5]]
                    steady.append((wall, cpu, dumps.count - before))
                session._last_full = None  # the periodic resync is due
                before = dumps.count
                result, full_s, full_cpu = timed_cpu(session.run)
                full_dumps = dumps.count - before
                assert result.changes == [], [str(c) for c in result.changes[:5]]
                joined, left = [], []
                for _ in range(joins):
                    mesh_file.write_text(dump_mesh(with_nodes(base, [*base.nodes,
                                                                     next(joiners)])))
                    cpu_before = time.process_time()
                    join = one_change(session.run, lambda s=session: s._reconciler, phases)
                    joined.append((*join, time.process_time() - cpu_before))
                    mesh_file.write_text(dump_mesh(base))
                    left.append(one_change(session.run, lambda s=session: s._reconciler,
                                           phases))
                if counters is not None:
                    assert counters.unavailable is None, counters.unavailable
                steady_cpu = median(c for _, c, _ in steady)
                steady_wall = median(w for w, _, _ in steady)
                channel_share, events = idle_channel(peers, tunnels) if mode == "channel" \
                    else (0.0, 0.0)
                # A run per poll, and one per run-waking channel event (runs never overlap:
                # at most back to back); every FULL_EVERY one of them is the full resync.
                runs = min(1 / POLL_SECONDS + events, 1 / max(steady_wall, 1e-9))
                # With the channel, a poll after which the channel said nothing is quiet
                # (ChannelAgreement.settles): it costs what the counters mode's polls
                # cost; the runs the channel's events ask for plan again (steady_cpu).
                quiet = next((m.steady_run_cpu_s for m in results if m.mode == "counters"),
                             None) if mode == "channel" else None
                per_second = runs * steady_cpu if quiet is None else \
                    min(1 / POLL_SECONDS, runs) * quiet + max(0.0, runs - 1 / POLL_SECONDS) \
                    * steady_cpu
                results.append(IdleMode(
                    mode=mode, steady_run_s=steady_wall,
                    steady_run_cpu_s=steady_cpu, full_run_s=full_s, full_run_cpu_s=full_cpu,
                    cpu_s_per_minute=(per_second + (full_cpu - steady_cpu) / FULL_EVERY
                                      + channel_share) * 60.0,
                    channel_cpu_share=channel_share, channel_run_events_per_s=events,
                    runs_per_s=runs,
                    sa_dumps_per_steady_run=sum(d for _, _, d in steady) / len(steady),
                    sa_dumps_per_full_run=full_dumps,
                    join_s=median(s for s, _, _, _ in joined),
                    join_cpu_s=median(c for _, _, _, c in joined),
                    leave_s=median(s for s, _, _ in left),
                    join_phases={k: median(p.get(k, 0.0) for _, p, _, _ in joined)
                                 for k in joined[0][1]}))
            finally:
                session.close()
        with VppClient(instance.api_socket, timeout=60).connect() as api:
            last = Agent(options, connect=lambda: api).run(dry_run=True)  # type: ignore[arg-type,return-value]
            converged = last.changes == []
    shutil.rmtree(work, ignore_errors=True)
    return IdleResult(peers=peers, tunnels_per_peer=tunnels, rounds=rounds,
                      poll_s=POLL_SECONDS, full_every_s=FULL_EVERY, load_average=load,
                      modes=results, converged=converged)


def render_idle(idle: IdleResult) -> str:
    """The idle agent per mode (before: dumps; after: counters) and one peer joining."""
    modes = idle.modes

    def row(name: str, cell) -> str:  # type: ignore[no-untyped-def]
        return f"| {name} | " + " | ".join(cell(m) for m in modes) + " |"

    def share(m: IdleMode) -> float:
        return m.cpu_s_per_minute / 60.0

    lines = [
        f"| idle `up --watch`, {idle.peers} peers x {idle.tunnels_per_peer} tunnels | "
        + " | ".join({"dumps": "SA dump every run (before)",
                      "counters": "stats segment counters (now)",
                      "channel": "with the channel"}.get(m.mode, m.mode)
                     for m in modes) + " |",
        "|---|" + "---|" * len(modes),
        row("poll with nothing to change, wall (CPU)",
            lambda m: f"{ms(m.steady_run_s)} ({ms(m.steady_run_cpu_s)})"),
        row("  SA dumps per poll", lambda m: f"{m.sa_dumps_per_steady_run:g}"),
        row("full resync, wall (CPU)", lambda m: f"{ms(m.full_run_s)} ({ms(m.full_run_cpu_s)})"),
        row("  SA dumps per resync", lambda m: f"{m.sa_dumps_per_full_run:g}"),
        row(f"CPU per minute ({idle.poll_s:g} s polls, resync every {idle.full_every_s:g} s)",
            lambda m: f"{m.cpu_s_per_minute:.2f} s ({share(m) * 100:.1f} % of a core)"),
        row("  of which the channel (timers, session rekeys)",
            lambda m: f"{m.channel_cpu_share * 100:.2f} % of a core" if m.mode == "channel"
            else "-"),
        row("  runs per second (polls + run-waking channel events)",
            lambda m: f"{m.runs_per_s:.2f} ({m.channel_run_events_per_s:.2f} events/s)"),
        row("one peer joins: mesh file -> VPP programmed",
            lambda m: f"{ms(m.join_s)} (CPU {ms(m.join_cpu_s)})"),
        row("one peer leaves", lambda m: ms(m.leave_s)),
    ]
    for k in modes[0].join_phases:
        if k != "total":
            lines.append(row(f"  join: {k}", lambda m, k=k: ms(m.join_phases.get(k, 0.0))))
    lines.append("")
    lines.append(f"Medians of {idle.rounds} polls and {max(1, idle.rounds // 2)} joins per "
                 f"mode; converged: {'yes' if idle.converged else 'NO'}; load average at "
                 f"start {idle.load_average}.")
    if any(m.mode == "channel" for m in modes):
        lines.append(
            "With the channel: a poll after which the channel said nothing is a quiet run "
            "(the counters mode's cost); each channel event that asks for a run costs a "
            "run that decides the peer it concerns again and takes the others' decisions "
            "from the last run (this mode's measured polls: OnePeerSpoke); plus the "
            "channel's idle CPU from an in-process simulation "
            f"of the node and its {idle.peers} peers ({CHANNEL_SECONDS:g} s, no "
            "rotation: benchmarks.channel_rotation).")
    targets = IDLE_TARGETS.get(idle.peers)
    if targets is not None:
        misses = []
        for m in modes:
            if m.mode != "dumps" and share(m) > targets["cpu_share"]:
                misses.append(f"idle CPU ({m.mode}) {share(m) * 100:.1f} % > "
                              f"{targets['cpu_share'] * 100:g} % of a core")
        now = next((m for m in modes if m.mode == "counters"), None)
        if now is not None and now.join_s > targets.get("join_s", float("inf")):
            misses.append(f"join {ms(now.join_s)} > {ms(targets['join_s'])}")
        reconcile = now.join_phases.get("reconcile", 0.0) if now is not None else 0.0
        if reconcile > targets.get("join_reconcile_s", float("inf")):
            misses.append(f"join's reconcile {ms(reconcile)} > "
                          f"{ms(targets['join_reconcile_s'])}")
        lines.append(f"Targets at {idle.peers} peers: " + (
            "met." if not misses else "missed: " + "; ".join(misses) + "."))
    return "\n".join(lines)


# ---- report ------------------------------------------------------------------------------
def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def mib(value: float) -> str:
    return f"{value / (1 << 20):.0f} MiB"


def render_table(results: list[SizeResult]) -> str:
    def both(wall: float, cpu: float) -> str:
        return f"{ms(wall)} ({ms(cpu)})"

    rows = [
        ("SAs / tunnels / routes", lambda r: f"{r.sas} / {r.tunnels} / {r.routes}"),
        ("first reconcile, empty -> full", lambda r: both(r.first_reconcile_s,
                                                         r.first_reconcile_cpu_s)),
        ("  of which dumps / diff / apply", lambda r: " / ".join(
            ms(r.first_reconcile_breakdown[k]) for k in ("observe", "diff", "apply"))),
        ("  API messages", lambda r: f"{r.first_reconcile_messages:,}"),
        ("  messages/s while applying", lambda r: f"{r.messages_per_s:,.0f}"),
        ("no-op reconcile, full dumps", lambda r: both(r.noop_full_s, r.noop_full_cpu_s)),
        ("  of which dumps / diff", lambda r: " / ".join(
            ms(r.noop_full_breakdown[k]) for k in ("observe", "diff"))),
        ("no-op reconcile, remembered state", lambda r: both(r.noop_incremental_s,
                                                            r.noop_incremental_cpu_s)),
        ("add one peer", lambda r: f"{both(r.add_peer_s, r.add_peer_cpu_s)}, "
                                   f"{r.add_peer_messages} msgs"),
        ("remove one peer", lambda r: f"{both(r.remove_peer_s, r.remove_peer_cpu_s)}, "
                                      f"{r.remove_peer_messages} msgs"),
        ("plan(), cold / warm key cache", lambda r: f"{ms(r.plan_cold_s)} / "
                                                    f"{ms(r.plan_warm_s)}"),
        ("  key derivation alone (X25519 + HKDF)", lambda r: ms(r.key_derivation_s)),
        ("controller RSS, connected / peak", lambda r: f"{mib(r.controller_rss_base_bytes)} / "
                                                       f"{mib(r.controller_rss_peak_bytes)}"),
        ("VPP main heap per peer", lambda r: f"{r.vpp_heap_per_peer_bytes / 1024:.0f} KiB"),
        ("converged (fresh dumps agree)", lambda r: "yes" if r.converged else "NO"),
        ("load average at start", lambda r: r.load_average),
    ]
    head = "| peers | " + " | ".join(str(r.peers) for r in results) + " |"
    sep = "|---|" + "---|" * len(results)
    lines = [head, sep]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in results) + " |"
              for name, cell in rows]
    if len(results) >= 2:
        small, large = results[0], results[-1]
        growth = large.peers / small.peers
        lines.append("")
        lines.append(
            f"Growth {small.peers} → {large.peers} peers (x{growth:g}): first reconcile "
            f"x{large.first_reconcile_s / small.first_reconcile_s:.1f}, no-op "
            f"x{large.noop_full_s / small.noop_full_s:.1f}, add one peer "
            f"x{large.add_peer_s / small.add_peer_s:.1f}, messages "
            f"x{large.first_reconcile_messages / small.first_reconcile_messages:.1f}.")
    misses = [f"{name} at {r.peers} peers: {ms(getattr(r, name))} > {ms(limit)}"
              for r in results for name, limit in TARGETS.get(r.peers, {}).items()
              if getattr(r, name) > limit]
    lines.append("")
    lines.append("Times are wall clock (controller CPU in parentheses); add/remove: median "
                 "of 5 rounds.")
    sizes = sorted({r.peers for r in results if r.peers in TARGETS})
    if sizes:
        lines.append("")
        lines.append(f"Targets at {' and '.join(map(str, sizes))} peers (wall clock): " + (
            "all met." if not misses else "missed: " + "; ".join(misses)))
    return "\n".join(lines)


def render_agents(a: AgentResult) -> str:
    """The agent in both modes, and where one change's time goes."""
    lines = [
        f"| {a.peers} peers x {a.tunnels_per_peer} tunnels, one peer | mesh file "
        "(`up --watch`) | datastore (etcd) | datastore / file |",
        "|---|---|---|---|",
        f"| joins | {ms(a.file_join_s)} | {ms(a.datastore_join_s)} | x{a.join_ratio:.2f} |",
        f"| leaves | {ms(a.file_leave_s)} | {ms(a.datastore_leave_s)} | "
        f"x{a.leave_ratio:.2f} |",
    ]
    lines += [f"| {'  ' if ':' in k else ''}{k} | {ms(a.file_phases.get(k, 0.0))} | "
              f"{ms(a.datastore_phases.get(k, 0.0))} | |"
              for k in a.file_phases if k != "total"]
    lines.append("")
    lines.append(f"One change (median of {a.rounds} joins and {a.rounds} leaves per mode, "
                 f"each a new peer): the agent's run from the changed input to VPP holding "
                 f"it, at most {a.messages_per_change} API messages; converged: "
                 f"{'yes' if a.converged else 'NO'}; load average at start {a.load_average}.")
    verdict = "met" if max(a.join_ratio, a.leave_ratio) <= AGENT_RATIO else "missed"
    lines.append(f"Target: the datastore agent within x{AGENT_RATIO} of the file mode: "
                 f"{verdict}.")
    return "\n".join(lines)


def render_baseline(b: BaselineResult) -> str:
    return "\n".join([
        f"| {b.sas} SAs on one VPP | vpp-papi, synchronous | pipelined (this client) |",
        "|---|---|---|",
        f"| add, messages/s | {b.papi_sync_messages_per_s:,.0f} | "
        f"{b.pipelined_messages_per_s:,.0f} |",
        f"| dump all | {ms(b.papi_sync_dump_s)} | {ms(b.pipelined_dump_s)} |",
    ])


CPU_FLAGS = ("aes", "pclmulqdq", "avx", "avx2", "avx512f", "avx512bw", "vaes",
             "vpclmulqdq", "sha_ni")


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown")
    flags = next((line.split(":", 1)[1].split() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                 [])
    crypto = " ".join(f for f in CPU_FLAGS if f in flags)  # what AES-GCM engines use
    return {"cpu": cpu, "cpus": str(os.cpu_count()), "kernel": os.uname().release,
            "python": sys.version.split()[0], "cpu_flags": crypto}


def vpp_version() -> str:
    result = subprocess.run([str(find_vpp()), "--version"], capture_output=True, text=True,
                            check=False, timeout=30)
    return (result.stdout or result.stderr).strip().splitlines()[0] if result.stdout or \
        result.stderr else "unknown"


def run_child(args: argparse.Namespace, peers: int, *, agents: bool = False,
              idle: bool = False) -> SizeResult | BaselineResult | AgentResult | IdleResult:
    """One size (0: the baseline) in a fresh interpreter, so its peak memory is its own."""
    which = "--one-idle" if idle else "--one-agents" if agents else "--one"
    command = [sys.executable, "-m", "benchmarks.controlplane", which, str(peers),
               "--tunnels", str(args.tunnels), "--workers", str(args.workers),
               "--prefix", args.prefix, "--base-dir", str(args.base_dir), "--heap", args.heap,
               "--idle-modes", ",".join(args.idle_modes)]
    if args.profile:
        command.append("--profile")
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{peers} peers failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    line = result.stdout.strip().splitlines()[-1]
    if idle:
        return IdleResult.model_validate_json(line)
    if agents:
        return AgentResult.model_validate_json(line)
    if peers == 0:
        return BaselineResult.model_validate_json(line)
    return SizeResult.model_validate_json(line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.controlplane",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="peer counts, comma-separated (default %(default)s)")
    parser.add_argument("--tunnels", type=int, default=4, help="tunnels per peer")
    parser.add_argument("--workers", type=int, default=0,
                        help="plan for this many VPP workers (the VPP runs none)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace prefix")
    parser.add_argument("--base-dir", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--heap", default="2G", help="VPP main heap size")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--profile", action="store_true",
                        help="add a cProfile of each first reconcile to the JSON")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the vpp-papi synchronous baseline")
    parser.add_argument("--no-agents", action="store_true",
                        help="skip the agent case (one peer joining and leaving through the "
                        "mesh file and through etcd, at the largest size)")
    parser.add_argument("--no-idle", action="store_true",
                        help="skip the idle agent (CPU of `up --watch` with nothing to "
                        "change, one peer joining; SA counts from the stats segment and "
                        "from dumps) at the largest size")
    parser.add_argument("--idle-modes", default=",".join(IDLE_MODES),
                        help="the idle agent's ways of reading SA counts: counters (the "
                        "stats segment, as the agent does), dumps (an SA dump every run, "
                        "as before); default %(default)s")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-idle", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-agents", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.idle_modes = tuple(m.strip() for m in args.idle_modes.split(",") if m.strip())
    if not args.idle_modes or set(args.idle_modes) - set(IDLE_MODES):
        parser.error(f"--idle-modes: one or more of {', '.join(IDLE_MODES)}")
    if args.workers:
        parser.error("--workers: the benchmark VPP runs without workers; SA binding to "
                     "workers is exercised by the testbed instead")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one == 0:
        print(measure_baseline(args.prefix, args.base_dir).model_dump_json())
        return 0
    if args.one_idle is not None:
        print(measure_idle(args.one_idle, args.tunnels, args.prefix, args.base_dir, args.heap,
                           modes=args.idle_modes).model_dump_json())
        return 0
    if args.one_agents is not None:
        agent_result = measure_agents(args.one_agents, args.tunnels, args.prefix,
                                      args.base_dir, args.heap)
        print(agent_result.model_dump_json())
        return 0
    if args.one is not None:
        result = measure(args.one, args.tunnels, args.workers, args.prefix, args.base_dir,
                         args.heap, args.profile)
        print(result.model_dump_json())
        return 0
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    try:
        require_root()
        find_vpp()
    except TestbedError as exc:
        raise SystemExit(str(exc)) from None
    baseline = None
    if not args.no_baseline:
        print(f"baseline: {BASELINE_SAS} SAs, vpp-papi synchronous vs pipelined ...",
              file=sys.stderr, flush=True)
        baseline = run_child(args, 0)
    results = []
    for peers in sizes:
        print(f"{peers} peers x {args.tunnels} tunnels ...", file=sys.stderr, flush=True)
        results.append(run_child(args, peers))
    agents = None
    if not args.no_agents:
        from vppmesh.lab.etcd import etcd_binary

        if etcd_binary() is None:
            print("agents: no etcd (apt-get install etcd-server); skipped", file=sys.stderr)
        else:
            print(f"agents: one peer joining and leaving at {sizes[-1]} peers, mesh file "
                  "and etcd ...", file=sys.stderr, flush=True)
            agents = run_child(args, sizes[-1], agents=True)
    idle = None
    if not args.no_idle:
        print(f"idle agent: {sizes[-1]} peers, modes {', '.join(args.idle_modes)} ...",
              file=sys.stderr, flush=True)
        idle = run_child(args, sizes[-1], idle=True)
    run = RunResult(started=datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
                    command=" ".join(["python -m benchmarks.controlplane", *(argv or
                                                                            sys.argv[1:])]),
                    machine=machine(), vpp_version=vpp_version(),
                    baseline=baseline,  # type: ignore[arg-type]
                    results=results, agents=agents,  # type: ignore[arg-type]
                    idle=idle)  # type: ignore[arg-type]
    table = render_table(run.results)
    if run.agents is not None:
        table += "\n\n" + render_agents(run.agents)
    if run.idle is not None:
        table += "\n\n" + render_idle(run.idle)
    if run.baseline is not None:
        table += "\n\n" + render_baseline(run.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{run.started}-controlplane"
    stem.with_suffix(".json").write_text(run.model_dump_json(indent=2))
    stem.with_suffix(".md").write_text(f"# Control plane, {run.started}\n\n`{run.command}` "
                                       f"on {run.machine['cpu']} ({run.machine['cpus']} CPUs, "
                                       f"{run.machine.get('cpu_flags') or 'no AES flags'}), "
                                       f"{run.vpp_version}\n\n{table}\n")
    print(table)
    print(f"\nwrote {stem}.json and {stem}.md")
    converged = all(r.converged for r in run.results) and \
        (run.agents is None or run.agents.converged) and \
        (run.idle is None or run.idle.converged)
    return 0 if converged else 1


if __name__ == "__main__":
    sys.exit(main())
