"""Channel state machines (vppmesh/channel/session.py) between two or three nodes over a
simulated network that delivers at once: `Net`, and `up` to start a handshake."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vppmesh.channel import session as s
from vppmesh.channel.noise import public_bytes
from vppmesh.keying.keys import NodeSecrets

PSK = bytes(range(32))
ADDRESSES = {1: ("192.0.2.1", 5199), 2: ("192.0.2.2", 5199), 3: ("192.0.2.3", 5199)}


class Net:
    """Channels that deliver each other's datagrams at once (recording them)."""

    def __init__(self, count: int = 2, psk: bytes = PSK) -> None:
        self.keys = {n: X25519PrivateKey.generate() for n in range(1, count + 1)}
        self.nodes = {
            n: s.Channel(n, NodeSecrets(key, psk),
                         [s.PeerConfig(p, public_bytes(k), ADDRESSES[p])
                          for p, k in self.keys.items() if p != n], boot_id=100 + n)
            for n, key in self.keys.items()}
        for node in self.nodes.values():  # as the agent's: generations 0 .. 15 answered
            for p in node.peers():
                node.accept_generations(p, 0, s.MAX_WINDOW)
        self.wire: list[tuple[int, int, bytes]] = []  # (from, to, datagram)
        self.events: dict[int, list[s.Event]] = {n: [] for n in self.nodes}
        self.source = dict(ADDRESSES)  # where each node's datagrams appear to come from
        self.lose: set[int] = set()  # message kinds (by wire order) to drop: test knobs

    def run(self, sender: int, out: s.Output, now: float) -> None:
        self.events[sender] += out.events
        for destination, data in out.datagrams:
            receiver = next(n for n in self.nodes if destination in (ADDRESSES[n], self.source[n]))
            self.wire.append((sender, receiver, data))
            if len(self.wire) - 1 in self.lose:
                continue
            self.run(receiver, self.nodes[receiver].receive(now, self.source[sender], data), now)

    def kinds(self, node: int) -> list[type]:
        return [type(e) for e in self.events[node]]


def up(net: Net, now: float = 1000.0) -> Net:
    net.run(1, net.nodes[1].tick(now), now)
    return net
