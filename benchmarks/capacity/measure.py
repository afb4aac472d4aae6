"""One measurement window on a programmed path, and the statistics over repeats."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field

from benchmarks.capacity import traffic
from benchmarks.capacity.rig import DST, POD_A, SOURCE_PG, HarnessError, Setup
from benchmarks.capacity.runtime import PathCost, node_vectors, parse_runtime, path_cost
from benchmarks.stats import median
from vppmesh.dataplane.vpp.client import VppClient

GHZ_RE = re.compile(r"Base frequency:\s+([\d.]+) GHz")
# 40G line rate as the reference measured it: 36.3 Gbit/s of TCP goodput at MTU 1500.
LINE_RATE_GOODPUT_BPS = 36.3e9


@dataclass
class Sample:
    """One window: rates, and clocks per packet on each side."""

    mix: str
    seconds: float
    sent: int
    delivered: int
    mean_bytes: float
    encrypt: PathCost | None
    decrypt: PathCost | None

    @property
    def mpps(self) -> float:
        return self.delivered / self.seconds / 1e6

    @property
    def inner_gbps(self) -> float:
        return self.delivered * self.mean_bytes * 8 / self.seconds / 1e9

    def as_dict(self) -> dict[str, object]:
        return {"mix": self.mix, "seconds": round(self.seconds, 3), "sent": self.sent,
                "delivered": self.delivered, "mpps": round(self.mpps, 4),
                "inner_gbps": round(self.inner_gbps, 3),
                "encrypt": self.encrypt.as_dict() if self.encrypt else None,
                "decrypt": self.decrypt.as_dict() if self.decrypt else None}


def tsc_ghz(api: VppClient) -> float | None:
    """The clock VPP counts in (its TSC rate), from `show cpu`."""
    m = GHZ_RE.search(api.cli("show cpu"))
    return float(m.group(1)) if m else None


def measure(setup: Setup, mix: traffic.SizeMix, *, window: float, warmup: float) -> Sample:
    """Run the mix's streams, then count one window on every side."""
    names = traffic.add_streams(setup.sender, mix, rx_interface=f"pg{SOURCE_PG}", src=POD_A,
                                dst=DST, workers=setup.workers)
    try:
        traffic.start(setup.sender)
        time.sleep(warmup)
        for api in setup.sides:
            api.cli("clear runtime")
        started = time.monotonic()
        time.sleep(window)
        texts = [api.cli("show runtime") for api in setup.sides]
        seconds = time.monotonic() - started
    finally:
        traffic.stop(setup.sender)
        traffic.delete_streams(setup.sender, names)
    return sample_of(setup, mix, texts, seconds)


def sample_of(setup: Setup, mix: traffic.SizeMix, texts: list[str], seconds: float) -> Sample:
    """One window's `show runtime` of each side, as a Sample. A window in which nothing
    arrived is a harness failure, not a zero: the path was not carrying traffic."""
    sender = parse_runtime(texts[0])
    sent = node_vectors(sender, setup.sent_node)
    if setup.receiver is not None and setup.sink_node:
        receiver = parse_runtime(texts[1])
        delivered = node_vectors(receiver, setup.sink_node)
        decrypt = path_cost(receiver, delivered)
    else:
        delivered, decrypt = sent, None
    if delivered == 0:
        raise HarnessError(f"nothing was delivered in a {seconds:.1f} s window "
                           f"({sent} packets sent at {mix.name}); the path is not carrying "
                           "traffic, so there is nothing to measure")
    return Sample(mix=mix.name, seconds=seconds, sent=sent, delivered=delivered,
                  mean_bytes=mix.mean_bytes, encrypt=path_cost(sender, sent), decrypt=decrypt)


@dataclass
class Summary:
    """Medians over the repeats of one contender at one size mix."""

    mpps: float | None
    inner_gbps: float | None
    encrypt_clocks: float | None
    decrypt_clocks: float | None
    encrypt_nodes: dict[str, float] = field(default_factory=dict)
    decrypt_nodes: dict[str, float] = field(default_factory=dict)
    repeats: int = 0

    def as_dict(self) -> dict[str, object]:
        def r(v: float | None, d: int = 1) -> float | None:
            return None if v is None else round(v, d)
        return {"repeats": self.repeats, "mpps": r(self.mpps, 4),
                "inner_gbps": r(self.inner_gbps, 3),
                "encrypt_path_clocks": r(self.encrypt_clocks),
                "decrypt_path_clocks": r(self.decrypt_clocks),
                "encrypt_nodes": {k: r(v) for k, v in self.encrypt_nodes.items()},
                "decrypt_nodes": {k: r(v) for k, v in self.decrypt_nodes.items()}}


def _node_medians(costs: list[PathCost | None]) -> dict[str, float]:
    names: dict[str, list[float]] = {}
    present = [c for c in costs if c is not None]
    for cost in present:
        for name, clocks in cost.nodes:
            names.setdefault(name, []).append(clocks)
    # A node missing from a repeat cost nothing there.
    out = {n: statistics.median(v + [0.0] * (len(present) - len(v))) for n, v in names.items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def summarize(samples: list[Sample]) -> Summary:
    return Summary(
        mpps=median(s.mpps for s in samples),
        inner_gbps=median(s.inner_gbps for s in samples),
        encrypt_clocks=median(s.encrypt.path_clocks if s.encrypt else None for s in samples),
        decrypt_clocks=median(s.decrypt.path_clocks if s.decrypt else None for s in samples),
        encrypt_nodes=_node_medians([s.encrypt for s in samples]),
        decrypt_nodes=_node_medians([s.decrypt for s in samples]),
        repeats=len(samples))


def workers_for_line_rate(clocks_per_packet: float, ghz: float, pod_mtu: int = 1440,
                          goodput_bps: float = LINE_RATE_GOODPUT_BPS) -> float:
    """Cores one direction of `goodput_bps` needs at `clocks_per_packet`.

    The pods' TCP segments carry pod_mtu - 52 bytes (IPv4, TCP with timestamps), so
    36.3 Gbit/s of goodput is 3.27 Mpps at the 1440-byte pod MTU. The NIC driver's own
    cost is not in the path clocks and not in this figure.
    """
    pps = goodput_bps / 8 / (pod_mtu - 52)
    return clocks_per_packet * pps / (ghz * 1e9)
