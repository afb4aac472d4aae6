"""VPP's `show runtime`, parsed, and what it says about the cost of one packet.

Per thread, VPP counts for every graph node the calls, the packets (vectors) and the CPU
clocks spent since `clear runtime`. A packet's path through VPP is a chain of nodes, so
the clocks one packet costs on a thread are the sum over the nodes it visits of each
node's clocks per packet, weighted by the share of packets that visit it:
sum(clocks of every node) / packets that came out of the path. That is the number a
capacity plan needs: clocks per packet x packets per second = clock rate of the cores.

Nodes are split in two groups. *I/O* nodes move packets in and out of the machine and
are replaced by a NIC driver on a real host: the packet generator (`pg-input`), the memif
link standing in for the NIC (`memif-input`, `memif…-tx`) and the counting sink
(`pg…-tx`). Everything else is the *path*: IP, IPIP, ESP, crypto, ECMP, the features
vppmesh configures. Targets are stated for the path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

THREAD_RE = re.compile(r"^Thread (?P<index>\d+) (?P<name>\S+)(?: \(lcore (?P<lcore>\d+)\))?")
TIME_RE = re.compile(r"^Time (?P<time>[\d.]+),")
NODE_RE = re.compile(
    r"^(?P<name>\S+)\s+(?P<state>\"[^\"]*\"|[a-z][a-z -]*?)\s+(?P<calls>\d+)\s+(?P<vectors>\d+)\s+"
    r"(?P<suspends>\d+)\s+(?P<clocks>[-+\d.eE]+)\s+(?P<per_call>[-+\d.eE]+)\s*$")
IO_INPUT_NODES = frozenset({"pg-input", "memif-input"})


@dataclass(frozen=True)
class NodeRuntime:
    """One line of `show runtime`: a graph node on one thread."""

    name: str
    state: str
    calls: int
    vectors: int
    suspends: int
    clocks_per: float  # per packet; per call when no packet went through; per suspend
    vectors_per_call: float

    @property
    def total_clocks(self) -> float:
        """All clocks the node spent, undoing VPP's division (see format_vlib_node_stats)."""
        if self.vectors:
            return self.clocks_per * self.vectors
        if self.calls:
            return self.clocks_per * self.calls
        return self.clocks_per * self.suspends

    @property
    def is_io(self) -> bool:
        return self.name in IO_INPUT_NODES or (
            self.name.endswith("-tx") and self.name.startswith(("memif", "pg")))


@dataclass
class ThreadRuntime:
    index: int
    name: str
    lcore: int | None
    seconds: float
    nodes: list[NodeRuntime] = field(default_factory=list)

    def node(self, name: str) -> NodeRuntime | None:
        return next((n for n in self.nodes if n.name == name), None)

    def vectors(self, name: str) -> int:
        found = self.node(name)
        return found.vectors if found else 0

    def busy_nodes(self) -> list[NodeRuntime]:
        """Nodes that handled packets: internal and input nodes, not idle processes."""
        return [n for n in self.nodes if n.vectors > 0]


def parse_runtime(text: str) -> list[ThreadRuntime]:
    """Every thread's node table. A VPP without workers prints no `Thread` line."""
    threads: list[ThreadRuntime] = []
    current: ThreadRuntime | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if m := THREAD_RE.match(line):
            lcore = m.group("lcore")
            current = ThreadRuntime(int(m.group("index")), m.group("name"),
                                    int(lcore) if lcore is not None else None, 0.0)
            threads.append(current)
            continue
        if m := TIME_RE.match(line):
            if current is None:
                current = ThreadRuntime(0, "vpp_main", None, 0.0)
                threads.append(current)
            current.seconds = float(m.group("time"))
            continue
        if current is None or line.lstrip().startswith("Name"):
            continue
        if m := NODE_RE.match(line):
            current.nodes.append(NodeRuntime(
                name=m.group("name"), state=m.group("state").strip().strip('"'),
                calls=int(m.group("calls")), vectors=int(m.group("vectors")),
                suspends=int(m.group("suspends")), clocks_per=float(m.group("clocks")),
                vectors_per_call=float(m.group("per_call"))))
    return threads


@dataclass(frozen=True)
class PathCost:
    """Clocks per packet on one side (one VPP), split into path and I/O."""

    packets: int
    path_clocks: float
    io_clocks: float
    # node -> clocks per delivered packet (its share of the path), largest first
    nodes: tuple[tuple[str, float], ...]
    # thread name -> path clocks per packet on that thread
    threads: tuple[tuple[str, float], ...]

    @property
    def total_clocks(self) -> float:
        return self.path_clocks + self.io_clocks

    def as_dict(self) -> dict[str, object]:
        return {"packets": self.packets, "path_clocks_per_packet": round(self.path_clocks, 1),
                "io_clocks_per_packet": round(self.io_clocks, 1),
                "nodes": {name: round(c, 1) for name, c in self.nodes},
                "threads": {name: round(c, 1) for name, c in self.threads}}


def path_cost(threads: Iterable[ThreadRuntime], packets: int) -> PathCost | None:
    """Clocks per packet over all threads, for `packets` that went through the path.

    `packets` is what left the side (encrypted packets sent on the link, or packets the
    sink received): work spent on packets dropped on the way is charged to those that
    made it, as a capacity figure must.
    """
    if packets <= 0:
        return None
    per_node: dict[str, float] = {}
    per_thread: dict[str, float] = {}
    path = io = 0.0
    for thread in threads:
        spent = 0.0
        for node in thread.busy_nodes():
            if node.is_io:
                io += node.total_clocks
                continue
            spent += node.total_clocks
            per_node[node.name] = per_node.get(node.name, 0.0) + node.total_clocks
        path += spent
        if spent:
            per_thread[thread.name] = spent / packets
    nodes = sorted(((n, c / packets) for n, c in per_node.items()), key=lambda x: -x[1])
    return PathCost(packets=packets, path_clocks=path / packets, io_clocks=io / packets,
                    nodes=tuple(nodes), threads=tuple(per_thread.items()))


def node_vectors(threads: Iterable[ThreadRuntime], name: str) -> int:
    """Packets a node handled, over every thread."""
    return sum(t.vectors(name) for t in threads)
