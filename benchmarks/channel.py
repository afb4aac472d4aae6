"""``python -m benchmarks.channel``: what the agents' channel costs the agent.

In process (no VPP, no root): receive rates of the session (parser + checks + crypto) for
valid transport messages and for every kind of hostile datagram, full handshakes and
generation key exchanges per second, and one node with many peers: the CPU of a timer
tick and the share of a core the channel's rekeys take at REKEY_AFTER.

With ``--vpp`` (root and a VPP, `VPPMESH_VPP`): a 2-node testbed whose agents' endpoints
talk through their VPPs' punt sockets; the round trip of a handshake and of a message
through VPP. Prints a table and JSON, and writes ``<stamp>-channel.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from benchmarks.capacity.report import machine
from benchmarks.report import DEFAULT_RESULTS_DIR
from benchmarks.stats import median, percentile
from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.endpoint import PORT, ChannelEndpoint
from vppmesh.channel.noise import public_bytes
from vppmesh.channel.transport import (
    PACKETDESC,
    PUNT_L2,
    PuntTransport,
    build_packet,
    parse_punted,
)
from vppmesh.dataplane.vpp import punt
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.keying.keys import NodeSecrets
from vppmesh.lab.testbed import NodeHandle, Testbed, TestbedSpec

PSK = bytes(range(32))
T0 = 1_000_000.0  # the benchmark's clock: seconds, advanced by hand


# ---- in process -------------------------------------------------------------------------
def channels(count: int, *, hub_peers: int | None = None) -> dict[int, s.Channel]:
    """Node 1 and `count - 1` peers, every one knowing node 1 (and node 1 all of them)."""
    keys = {n: X25519PrivateKey.generate() for n in range(1, count + 1)}
    address = {n: (f"10.{n >> 8}.{n & 0xFF}.1", PORT) for n in keys}

    def config(n: int) -> s.PeerConfig:
        # No NAT between them: as the agent, no keepalives (PeerConfig.keepalive).
        return s.PeerConfig(n, public_bytes(keys[n]), address[n], keepalive=False)

    out = {1: s.Channel(1, NodeSecrets(keys[1], PSK), [config(n) for n in keys if n != 1],
                        boot_id=1)}
    for n in list(keys)[1:hub_peers]:
        out[n] = s.Channel(n, NodeSecrets(keys[n], PSK), [config(1)], boot_id=n)
    for channel in out.values():  # as an agent's first run: the first generations answered
        for peer in channel.peers():
            channel.accept_generations(peer, 0, s.MAX_WINDOW)
    return out


def exchange(nodes: dict[int, s.Channel], sender: int, out: s.Output, now: float) -> None:
    """Deliver everything `out` sends, and the answers, at once."""
    for destination, data in out.datagrams:
        receiver = int(destination[0].split(".")[1]) << 8 | int(destination[0].split(".")[2])
        answer = nodes[receiver].receive(now, (f"10.{sender >> 8}.{sender & 0xFF}.1", PORT),
                                         data)
        exchange(nodes, receiver, answer, now)


def per_second(run: Callable[[], object], count: int) -> dict[str, float]:
    started = time.process_time()
    for _ in range(count):
        run()
    spent = time.process_time() - started
    return {"per_s": round(count / spent) if spent else float("inf"),
            "us_each": round(spent / count * 1e6, 2)}


def receive_rate(node: s.Channel, datagrams: list[bytes], source: m.Address,
                 now: float) -> dict[str, Any]:
    """Receive rate, and what the session made of them (by drop reason)."""
    it = iter(datagrams)
    before = dict(node.drops)
    rate: dict[str, Any] = per_second(lambda: node.receive(now, source, next(it)),
                                      len(datagrams))
    rate["dropped_as"] = {str(k): v - before.get(k, 0) for k, v in node.drops.items()
                          if v != before.get(k, 0)}
    return rate


def measure_in_process(count: int) -> dict[str, dict[str, Any]]:
    nodes = channels(2)
    a, b = nodes[1], nodes[2]
    source = ("10.0.1.1", PORT)  # node 1's address as node 2 sees it
    exchange(nodes, 1, a.tick(T0), T0)
    results: dict[str, dict[str, Any]] = {}
    valid = [a.send(T0, 2, m.SasInstalled(i)).datagrams[0][1] for i in range(count)]
    results["valid transport"] = receive_rate(b, valid, source, T0)
    punted = [PACKETDESC.pack(1, PUNT_L2) + bytes(14) + build_packet(source, ("10.0.2.1", PORT), d)
              for d in (a.send(T0, 2, m.Keepalive()).datagrams[0][1] for _ in range(count))]
    it = iter(punted)

    def through_punt() -> None:
        parsed = parse_punted(next(it))
        assert not isinstance(parsed, m.Drop)
        b.receive(T0, parsed.source, parsed.payload)

    results["valid, punt framing too"] = per_second(through_punt, count)
    results["replayed transport"] = receive_rate(b, valid, source, T0)
    forged = [m.transport_header(1, 2, 0, i) + bytes(20) for i in range(count)]
    results["forged transport (bad index)"] = receive_rate(b, forged, source, T0)
    header = m.parse_datagram(valid[0])
    assert isinstance(header, m.Transport)
    wrong_tag = [m.transport_header(1, 2, header.receiver_index, 10 * count + i)
                 + header.ciphertext
                 for i in range(count)]
    results["forged transport (bad tag)"] = receive_rate(b, wrong_tag, source, T0)
    init = next(d for _, _, d in record_handshake(nodes))
    results["replayed handshake"] = receive_rate(b, [init] * count, source, T0)
    forged_init = init[:-1] + bytes([init[-1] ^ 1])
    results["forged handshake (bad MAC)"] = receive_rate(b, [forged_init] * count, source, T0)
    stranger = m.build_init(9, 2, 1, 1, bytes(m.NOISE_INIT_BYTES)) + bytes(m.MAC_BYTES)
    results["handshake from a stranger"] = receive_rate(b, [stranger] * count, source, T0)
    results["truncated"] = receive_rate(b, [init[:40]] * count, source, T0)
    results["oversized"] = receive_rate(b, [bytes(1400)] * count, source, T0)
    results["random bytes"] = receive_rate(
        b, [os.urandom(60) for _ in range(count)], source, T0)
    handshakes = max(count // 50, 20)
    clock = iter(range(handshakes * 2))

    def handshake() -> None:
        a._peers[2].pending = None
        now = T0 + next(clock)  # a new second: the DH budget is not what is measured
        exchange(nodes, 1, a.tick(now + s.REKEY_AFTER), now)

    results["full handshake (both ends)"] = per_second(handshake, handshakes)
    generation = iter(range(10, 10 + handshakes))

    def key_exchange() -> None:
        g = next(generation)
        nodes[2].accept_generations(1, g, s.MAX_WINDOW)  # the receiver's window slides
        exchange(nodes, 1, a.start_generation(T0, 2, g), T0)

    results["generation key exchange (both ends)"] = per_second(key_exchange, handshakes)
    return results


def record_handshake(nodes: dict[int, s.Channel]) -> list[tuple[int, int, bytes]]:
    """A fresh handshake of node 1 with node 2: what node 1 sent."""
    a = nodes[1]
    a._peers[2].pending = None
    sent = a.tick(T0 + s.REKEY_AFTER)
    exchange(nodes, 1, sent, T0)
    return [(1, 2, d) for _, d in sent.datagrams]


def measure_peers(peers: int) -> dict[str, Any]:
    """Node 1 with `peers` established sessions: a timer tick, and rekeys' CPU share."""
    nodes = channels(peers + 1)
    started = time.process_time()
    for n in range(2, peers + 2):  # 200 handshakes a second: inside the node's DH budget
        now = T0 + n * 0.005
        exchange(nodes, n, nodes[n].tick(now), now)
    setup = time.process_time() - started
    hub = nodes[1]
    if not all(hub.established(p) for p in hub.peers()):
        raise RuntimeError(f"handshakes were refused: {hub.drops}")
    idle = per_second(lambda: hub.tick(T0 + peers * 0.005 + 1.0), 20)
    handshake_cpu = setup / peers  # both ends of each handshake, done in this process
    return {
        "peers": peers,
        "idle_tick_ms": round(idle["us_each"] / 1000, 3),
        "handshake_cpu_ms_both_ends": round(handshake_cpu * 1000, 3),
        "rekeys_per_s": round(peers / s.REKEY_AFTER, 2),
        # One end's share: half of each handshake's CPU, every REKEY_AFTER seconds.
        "rekey_core_share": round(peers / s.REKEY_AFTER * handshake_cpu / 2, 5),
        "keepalives_per_s": round(peers / s.KEEPALIVE_AFTER, 1)
        if hub._peers[2].config.keepalive else 0.0,
    }


# ---- through real VPPs ------------------------------------------------------------------
@dataclass
class VppPair:
    """Two testbed nodes' channel endpoints, talking through their VPPs (both in here)."""

    bed: Testbed
    endpoints: dict[int, ChannelEndpoint]
    addresses: dict[int, m.Address]
    events: dict[int, list[s.Event]]

    def channel(self, number: int) -> s.Channel:
        return self.endpoints[number].channel

    def drops(self) -> dict[int, dict[str, int]]:
        return {n: {str(k): v for k, v in e.drops().items()} for n, e in self.endpoints.items()}

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> float:
        """Run both endpoints (receive, tick) until `until()`; the seconds it took."""
        start = time.monotonic()
        while not until():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the channel did not get there in {timeout} s: "
                                   f"{self.events}, drops {self.drops()}")
            readable, _, _ = select.select(list(self.endpoints.values()), [], [], 0.02)
            now = time.time()
            for number, endpoint in self.endpoints.items():
                if endpoint in readable:
                    self.events[number] += endpoint.receive(now)
                self.events[number] += endpoint.tick(now)
        return time.monotonic() - start

    def emit(self, number: int, out: s.Output) -> None:
        self.events[number] += self.endpoints[number].emit(out)


def register_punt(node: NodeHandle, path: Path) -> str:
    """Punt the channel's port to `path`, IPv4 and IPv6; VPP's own punt socket path."""
    with VppClient(node.instance.api_socket).connect() as api:
        replies = api.call_many([punt.register(PORT, False, path),
                                 punt.register(PORT, True, path)])
    return str(replies[0].pathname)


@contextmanager
def vpp_pair(bed: Testbed) -> Iterator[VppPair]:
    """Endpoints for the (built) 2-node `bed`, their handshake done."""
    with ExitStack() as stack:
        keys = {n.index: X25519PrivateKey.generate() for n in bed.nodes}
        addresses = {n.index: (str(n.underlay[0].ip), PORT) for n in bed.nodes}
        endpoints = {}
        for node in bed.nodes:
            client = node.dir / "channel.sock"
            transport = stack.enter_context(PuntTransport(client, node.instance.punt_socket))
            if register_punt(node, client) != str(node.instance.punt_socket):
                raise RuntimeError("VPP punts to another socket than its startup.conf names")
            peers = [s.PeerConfig(p, public_bytes(k), addresses[p])
                     for p, k in keys.items() if p != node.index]
            channel = s.Channel(node.index, NodeSecrets(keys[node.index], PSK), peers,
                                boot_id=1000 + node.index)
            for peer in peers:
                channel.accept_generations(peer.node_number, 0, s.MAX_WINDOW)
            endpoints[node.index] = ChannelEndpoint(
                channel, transport, {node.underlay[0].ip.version: str(node.underlay[0].ip)})
        pair = VppPair(bed, endpoints, addresses, {n.index: [] for n in bed.nodes})
        pair.pump(lambda: pair.channel(1).established(2) and pair.channel(2).established(1),
                  timeout=15.0)
        yield pair


def handshake_through_vpp(pair: VppPair) -> float:
    """One rekey handshake started by node 1: seconds until node 1 has the session."""
    before = pair.channel(1).stats["handshakes_completed"]
    pair.channel(1)._peers[2].pending = None
    pair.emit(1, pair.channel(1).tick(time.time() + s.REKEY_AFTER))
    return pair.pump(lambda: pair.channel(1).stats["handshakes_completed"] > before)


def message_through_vpp(pair: VppPair, generation: int) -> float:
    """A KeyInit from node 1 until node 1 holds the generation's secret (one round trip)."""
    pair.channel(2).accept_generations(1, generation, s.MAX_WINDOW)
    pair.emit(1, pair.channel(1).start_generation(time.time(), 2, generation))
    return pair.pump(
        lambda: pair.channel(1).generation_secret(2, generation, outbound=True) is not None)


def measure_vpp(repeats: int, family: str) -> dict[str, Any]:
    spec = TestbedSpec(nodes=2, tunnels=1, pods=0, prefix="vcb-",
                       base_dir=Path("/run/vppmesh-vcb"), underlay_family=family)
    bed = Testbed(spec)
    bed.up(join=False)
    try:
        with vpp_pair(bed) as pair:
            handshake_through_vpp(pair)  # neighbours resolved by the first ones
            handshakes = []
            for _ in range(repeats):
                time.sleep(1.0 / s.PEER_RATE)  # within the peer's DH budget
                handshakes.append(handshake_through_vpp(pair) * 1000)
            messages = [message_through_vpp(pair, g) * 1000 for g in range(repeats)]
            drops = pair.drops()
    finally:
        bed.down(quiet=True)
    return {"family": family, "repeats": repeats,
            "handshake_rtt_ms": {"median": median(handshakes),
                                 "p90": percentile(handshakes, 90)},
            "key_exchange_rtt_ms": {"median": median(messages),
                                    "p90": percentile(messages, 90)},
            "drops": drops}


# ---- report -----------------------------------------------------------------------------
def render_table(result: dict[str, Any]) -> str:
    lines = ["| Received by the session | per second | µs each | dropped as |",
             "|---|---:|---:|---|"]
    lines += [f"| {case} | {r['per_s']:,} | {r['us_each']} | "
              f"{', '.join(f'{k} {v}' for k, v in r.get('dropped_as', {}).items())} |"
              for case, r in result["in_process"].items()]
    p = result["peers"]
    lines += ["", f"One node with {p['peers']} peers: idle timer tick {p['idle_tick_ms']} ms; "
              f"a handshake {p['handshake_cpu_ms_both_ends']} ms CPU (both ends); rekeys every "
              f"{s.REKEY_AFTER:.0f} s = {p['rekeys_per_s']}/s = {p['rekey_core_share']:.2%} of "
              f"a core; keepalives {p['keepalives_per_s']}/s."]
    for v in result.get("vpp", []):
        lines.append(f"Through VPP ({v['family']}, {v['repeats']} repeats): handshake round "
                     f"trip median {v['handshake_rtt_ms']['median']:.2f} ms (p90 "
                     f"{v['handshake_rtt_ms']['p90']:.2f}), key exchange median "
                     f"{v['key_exchange_rtt_ms']['median']:.2f} ms.")
    return "\n".join(lines) + "\n"


def render_png(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(result["in_process"])
    values = [result["in_process"][c]["per_s"] for c in cases]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    bars = ax.barh(cases, values)
    ax.bar_label(bars, fmt="{:,.0f}", fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("datagrams (or handshakes) per second, one core, log scale")
    ax.set_title(f"channel session receive rates on {result['machine']['cpu_model']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.channel",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--count", type=int, default=20000,
                        help="datagrams per in-process case (default 20000)")
    parser.add_argument("--peers", type=int, default=1000,
                        help="peers of the one node of the peers case (default 1000)")
    parser.add_argument("--vpp", action="store_true",
                        help="also measure through two real VPPs (root, VPPMESH_VPP)")
    parser.add_argument("--repeats", type=int, default=20, help="round trips through VPP")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": machine(), "in_process": measure_in_process(args.count),
                              "peers": measure_peers(args.peers)}
    if args.vpp:
        result["vpp"] = [measure_vpp(args.repeats, family) for family in ("ipv4", "ipv6")]
    print(json.dumps(result, indent=1))
    write_results(args.out, "channel", result, render_table(result), render_png)
    return 0


def write_results(out: Path, name: str, result: dict[str, Any], table: str,
                  render_png: Callable[[dict[str, Any], Path], None]) -> Path:
    """`<stamp>-<name>.{json,md,png}` in `out`; prints the table. The stem written."""
    stem = out / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    render_png(result, stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.json, .md and .png", file=sys.stderr)
    return stem


if __name__ == "__main__":
    raise SystemExit(main())
