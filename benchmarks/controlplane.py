"""``python -m benchmarks.controlplane``: how fast the controller programs a big mesh.

One VPP (testbed profile, no traffic) in its own network namespace is programmed with a
synthetic mesh of N peers x T tunnels, seen from one node: 2·N·T SAs, N·T IPIP tunnels and
N ECMP routes. Per size it reports the first full reconcile, a no-op reconcile (with
dumps, and from the remembered state), one peer joining and one leaving, plan() and key
derivation, the controller's peak memory, VPP's heap per peer and the API messages sent.
Each size runs in a fresh process against a fresh VPP, so memory numbers do not mix.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import ipaddress
import os
import pstats
import re
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel, ConfigDict

from vppmesh.config import Mesh, MeshSettings, Node
from vppmesh.keys import NodeSecrets, derive_sa_key, pair_secret, public_key_b64
from vppmesh.lab.testbed import TestbedError, find_vpp, require_root, single_vpp
from vppmesh.plan import HostOptions, plan
from vppmesh.reconcile import Reconciler
from vppmesh.state import DesiredState
from vppmesh.view import build_view
from vppmesh.vpp import interfaces, ipsec
from vppmesh.vpp.client import VppClient

DEFAULT_SIZES = (100, 300, 1000)
DEFAULT_PREFIX = "vmc-"
DEFAULT_BASE = Path("/run/vppmesh-vmc")
RESULTS_DIR = Path(__file__).parent / "results"
UPLINK = "loop0"
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/16")  # RFC 2544 benchmarking range
PODS = ipaddress.IPv4Network("198.19.0.0/16")
POD_PREFIX = 26  # 1,024 pod CIDRs fit in PODS
MAX_PEERS = 1000
BASELINE_SAS = 2000
TARGETS = {"first_reconcile_s": 2.0, "noop_full_s": 1.0, "add_peer_s": 0.020,
           "remove_peer_s": 0.020}


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


class RunResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    started: str
    command: str
    machine: dict[str, str]
    vpp_version: str
    baseline: BaselineResult | None
    results: list[SizeResult]


# ---- the synthetic mesh ------------------------------------------------------------------
def node_key(number: int) -> X25519PrivateKey:
    """Deterministic per node, so every run plans the very same keys."""
    return X25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"vppmesh controlplane benchmark node %d" % number).digest())


def synthetic_mesh(peers: int, tunnels: int) -> tuple[Mesh, NodeSecrets]:
    """Node 1 (the one measured) and `peers` + 1 peers: the last one is there to join."""
    if not 1 <= peers <= MAX_PEERS:
        raise SystemExit(f"--sizes: {peers} peers is out of range (1..{MAX_PEERS})")
    nodes = []
    for number in range(1, peers + 3):
        base = int(UNDERLAY.network_address) + number * 8
        pods = int(PODS.network_address) + number * (1 << (32 - POD_PREFIX))
        nodes.append(Node(
            name=f"n{number}", node_number=number,
            underlay=[ipaddress.IPv4Interface((base + t, UNDERLAY.prefixlen))
                      for t in range(tunnels)],
            pod_cidr=ipaddress.IPv4Network((pods, POD_PREFIX)),
            public_key=public_key_b64(node_key(number)),
            uplink=UPLINK if number == 1 else None,
        ))
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
    desired_joined = plan_for(joined, secrets, workers)

    with single_vpp(f"{prefix}cp", base_dir / "controlplane", main_heap_size=heap) as instance, \
            VppClient(instance.api_socket, timeout=60).connect() as api:
        give_uplink(api, mesh.node("n1").primary)  # type: ignore[arg-type]
        rss_base = rss_bytes()
        heap_before = heap_used(api)
        reconciler = Reconciler(api)

        profiler = cProfile.Profile() if profile else None
        sent = api.messages_sent
        if profiler:
            profiler.enable()
        _, first_s, first_cpu = timed_cpu(reconciler.reconcile, desired)
        if profiler:
            profiler.disable()
        first_breakdown = dict(reconciler.last_timings)
        first_messages = api.messages_sent - sent
        heap_after = heap_used(api)

        sent = api.messages_sent
        changes, noop_full_s, noop_full_cpu = timed_cpu(reconciler.reconcile, desired, full=True)
        assert changes == [], [str(c) for c in changes[:5]]
        noop_full_breakdown = dict(reconciler.last_timings)
        noop_full_messages = api.messages_sent - sent
        changes, noop_inc_s, noop_inc_cpu = timed_cpu(reconciler.reconcile, desired)
        assert changes == []

        # One peer joins, then leaves again; the median of a few rounds, as the machine
        # is shared and a single sample of a few milliseconds is noisy.
        add: list[tuple[float, float, int]] = []
        remove: list[tuple[float, float, int]] = []
        for _ in range(rounds):
            for target, samples in ((desired_joined, add), (desired, remove)):
                sent = api.messages_sent
                changes, wall, cpu = timed_cpu(reconciler.reconcile, target)
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
              for r in results for name, limit in TARGETS.items()
              if r.peers == MAX_PEERS and getattr(r, name) > limit]
    lines.append("")
    lines.append("Times are wall clock (controller CPU in parentheses); add/remove: median "
                 "of 5 rounds.")
    if any(r.peers == MAX_PEERS for r in results):
        lines.append("")
        lines.append("Targets at 1000 peers (wall clock): " + (
            "all met." if not misses else "missed: " + "; ".join(misses)))
    return "\n".join(lines)


def render_baseline(b: BaselineResult) -> str:
    return "\n".join([
        f"| {b.sas} SAs on one VPP | vpp-papi, synchronous | pipelined (this client) |",
        "|---|---|---|",
        f"| add, messages/s | {b.papi_sync_messages_per_s:,.0f} | "
        f"{b.pipelined_messages_per_s:,.0f} |",
        f"| dump all | {ms(b.papi_sync_dump_s)} | {ms(b.pipelined_dump_s)} |",
    ])


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown")
    return {"cpu": cpu, "cpus": str(os.cpu_count()), "kernel": os.uname().release,
            "python": sys.version.split()[0]}


def vpp_version() -> str:
    result = subprocess.run([str(find_vpp()), "--version"], capture_output=True, text=True,
                            check=False, timeout=30)
    return (result.stdout or result.stderr).strip().splitlines()[0] if result.stdout or \
        result.stderr else "unknown"


def run_child(args: argparse.Namespace, peers: int) -> SizeResult | BaselineResult:
    """One size (0: the baseline) in a fresh interpreter, so its peak memory is its own."""
    command = [sys.executable, "-m", "benchmarks.controlplane", "--one", str(peers),
               "--tunnels", str(args.tunnels), "--workers", str(args.workers),
               "--prefix", args.prefix, "--base-dir", str(args.base_dir), "--heap", args.heap]
    if args.profile:
        command.append("--profile")
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{peers} peers failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    line = result.stdout.strip().splitlines()[-1]
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
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers:
        parser.error("--workers: the benchmark VPP runs without workers; SA binding to "
                     "workers is exercised by the testbed instead")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one == 0:
        print(measure_baseline(args.prefix, args.base_dir).model_dump_json())
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
    run = RunResult(started=datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
                    command=" ".join(["python -m benchmarks.controlplane", *(argv or
                                                                            sys.argv[1:])]),
                    machine=machine(), vpp_version=vpp_version(),
                    baseline=baseline,  # type: ignore[arg-type]
                    results=results)  # type: ignore[arg-type]
    table = render_table(run.results)
    if run.baseline is not None:
        table += "\n\n" + render_baseline(run.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{run.started}-controlplane"
    stem.with_suffix(".json").write_text(run.model_dump_json(indent=2))
    stem.with_suffix(".md").write_text(f"# Control plane, {run.started}\n\n`{run.command}` "
                                       f"on {run.machine['cpu']} ({run.machine['cpus']} CPUs), "
                                       f"{run.vpp_version}\n\n{table}\n")
    print(table)
    print(f"\nwrote {stem}.json and {stem}.md")
    return 0 if all(r.converged for r in run.results) else 1


if __name__ == "__main__":
    sys.exit(main())
