"""``python -m benchmarks.metrics_scrape``: what a Prometheus scrape costs the agent.

A scrape of `up --watch --metrics` formats the last snapshot and never talks to VPP, so
its cost depends on the number of peers and tunnels only. This builds the snapshot of a
node with N peers x T tunnels (every tunnel with an outbound and two inbound SAs, as
during a rekey), serves it on a real HTTP endpoint and reports, over R scrapes:

- `exposition`: the agent's CPU time per scrape (node metrics through the client
  library, then the per-tunnel text written at the last snapshot);
- `text`: writing the per-tunnel families once per snapshot
  (metrics.MeshCollector.render);
- `scrape`: wall time of a whole HTTP GET /metrics on loopback, as curl measures it
  (`time_total`; urllib in this process when there is no curl);
- `library`: the client library's generic generate_latest on the same families, for
  comparison (why the per-tunnel families have their own formatter);
- `snapshot`: building the snapshot from a status (Python side of a poll).

With --vpp, one VPP (testbed profile, in its own namespace) is programmed with the same
mesh and the snapshot is also taken from it, as the agent does every 5 s: the dumps and
the stats segment read included.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from statistics import median

from prometheus_client import CollectorRegistry, generate_latest

from vppmesh.keying.epochs import GenerationState, PeerGenerations
from vppmesh.ops.metrics import AgentMetrics, MetricsServer, families
from vppmesh.ops.status import NodeStatus, PeerStatus, SaStatus, TunnelStatus


def synthetic_status(peers: int, tunnels: int) -> NodeStatus:
    big = 123_456_789

    def sa(sa_id: int, direction: str) -> SaStatus:
        return SaStatus(sa_id=sa_id, spi=sa_id, direction=direction, packets=big,
                        bytes=big * 1400, thread=0, seq=big)

    return NodeStatus(node="n1", vpp_version="26.06", workers=2, host_link=None, peers=[
        PeerStatus(name=f"n{p + 2}", node_number=p + 2, tunnels=[
            TunnelStatus(name=f"ipip{p}{t}", index=t, src="a", dst="b", admin_up=True,
                         protected=True, sa_out=sa(p * 100 + t, "out"),
                         sa_in=[sa(p * 100 + 50 + t, "in"), sa(p * 100 + 60 + t, "in")])
            for t in range(tunnels)])
        for p in range(peers)], missing_peers=[])


def synthetic_generations(peers: int, now: float) -> GenerationState:
    return GenerationState(peers={
        f"n{p + 2}": PeerGenerations(public_key="k", out=3, out_since=now - 3600, floor=2,
                                     in_base=2)
        for p in range(peers)})


def stats(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return (f"median {1000 * median(ordered):6.1f} ms, p90 {1000 * p90:6.1f} ms, "
            f"max {1000 * ordered[-1]:6.1f} ms")


def cpu_timed(fn):  # type: ignore[no-untyped-def]
    started = time.process_time()
    result = fn()
    return result, time.process_time() - started


def curl_seconds(url: str) -> float:
    """A whole GET as curl (another process: it does not share the agent's GIL) times it."""
    done = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-w", "%{time_total}", url],
                          capture_output=True, text=True, check=True, timeout=60)
    return float(done.stdout)


def urllib_seconds(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as reply:
        reply.read()
    return time.perf_counter() - started


def offline(peers: int, tunnels: int, rounds: int) -> None:
    from benchmarks.controlplane import synthetic_mesh

    mesh, _ = synthetic_mesh(min(peers, 1000), tunnels)
    metrics = AgentMetrics()
    for _ in range(10):
        metrics.reconcile_seconds.observe(0.05)
    status = synthetic_status(peers, tunnels)
    generations = synthetic_generations(peers, time.time())
    snapshot_s = []
    for _ in range(rounds):
        snap, seconds = cpu_timed(lambda: metrics.observer.snapshot(
            status, mesh, generations, {"/err/esp4-decrypt-tun/replay": 3}, vpp_pid=1,
            now=time.time()))
        snapshot_s.append(seconds)
    text_s = []
    for _ in range(rounds):
        _, seconds = cpu_timed(lambda: metrics.mesh.update(snap))
        text_s.append(seconds)
    render_s = []
    for _ in range(rounds):
        body, seconds = cpu_timed(metrics.exposition)
        render_s.append(seconds)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.mesh)
    library_s = []
    for _ in range(max(3, rounds // 4)):
        _, seconds = cpu_timed(lambda: generate_latest(registry))
        library_s.append(seconds)
    server = MetricsServer(metrics, ("127.0.0.1", 0)).start()
    scrape_s = []
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        for _ in range(rounds):
            scrape_s.append(curl_seconds(url) if shutil.which("curl") else urllib_seconds(url))
        with urllib.request.urlopen(url, timeout=30) as reply:
            text = reply.read().decode()
    finally:
        server.stop()
    count = sum(len(f.samples) for f in families(text))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{peers} peers x {tunnels} tunnels: {count} samples, {len(body) / 1e6:.2f} MB "
          f"per scrape, {rounds} rounds, load average {load} (2 cores shared: wall times "
          f"include waiting for a core)")
    print(f"  exposition (agent CPU per scrape) {stats(render_s)}")
    print(f"  text at each snapshot (CPU)    {stats(text_s)}")
    print(f"  scrape (HTTP GET by curl, wall) {stats(scrape_s)}")
    print(f"  library generate_latest (CPU)  {stats(library_s)}")
    print(f"  snapshot from a status (CPU)   {stats(snapshot_s)}")


def with_vpp(peers: int, tunnels: int, rounds: int) -> None:
    from benchmarks.controlplane import (
        DEFAULT_BASE,
        give_uplink,
        plan_for,
        synthetic_mesh,
        with_nodes,
    )
    from vppmesh.dataplane.reconcile import Reconciler
    from vppmesh.dataplane.vpp.client import VppClient
    from vppmesh.lab.testbed import require_root, single_vpp

    require_root()
    mesh, secrets = synthetic_mesh(peers, tunnels)
    mesh = with_nodes(mesh, list(mesh.nodes)[:-1])
    desired = plan_for(mesh, secrets, 0)
    generations = synthetic_generations(peers, time.time())
    with single_vpp("vmx-ms", Path(DEFAULT_BASE.parent / "vppmesh-vmx-ms"),
                    main_heap_size="2G") as instance, \
            VppClient(instance.api_socket, timeout=60).connect() as api:
        give_uplink(api, mesh.node("n1").primary)  # type: ignore[arg-type]
        Reconciler(api).reconcile(desired)
        metrics = AgentMetrics()
        wall, cpu = [], []
        for _ in range(rounds):
            started, cpu_started = time.perf_counter(), time.process_time()
            snap = metrics.observe(api, mesh, "n1", instance.stats_socket, generations,
                                   vpp_pid=1)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        assert len(snap.tunnels) == peers * tunnels, len(snap.tunnels)
        body = metrics.exposition()
    print(f"snapshot from a real VPP ({peers} peers x {tunnels} tunnels, "
          f"{len(body) / 1e6:.2f} MB exposition), {rounds} rounds:")
    print(f"  wall {stats(wall)}")
    print(f"  agent CPU {stats(cpu)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_scrape",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--tunnels", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--vpp", action="store_true",
                        help="also take snapshots from a real VPP programmed with the mesh")
    args = parser.parse_args(argv)
    offline(args.peers, args.tunnels, args.rounds)
    if args.vpp:
        with_vpp(args.peers, args.tunnels, max(3, args.rounds // 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
