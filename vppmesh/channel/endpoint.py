"""One node's channel on the wire: the pure session fed from, and answered through, VPP.

The agent loop owns the clock and the poll: it calls `receive(now)` when the transport's
socket is readable and `tick(now)` on its timer, and acts on the events. Datagrams leave
from the node's own address of the destination's family, through VPP (transport.py).
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from vppmesh.channel.messages import Drop, Message
from vppmesh.channel.session import Channel, Event, Output
from vppmesh.channel.transport import PuntTransport
from vppmesh.underlay import NAT_T_PORT

# The channel's UDP port on every node's VPP: next to ESP in UDP's 4500, unassigned.
PORT = 4501


class ChannelEndpoint:
    """`channel` speaking through `transport`, from `local` (IP address per version)."""

    def __init__(self, channel: Channel, transport: PuntTransport,
                 local: dict[int, str], port: int = PORT) -> None:
        self.channel, self.transport, self.port = channel, transport, port
        self.local = {version: (address, port) for version, address in local.items()}
        # Peer addresses whose pair runs ESP in UDP: the channel shares the ESP flow there
        # (from UDP 4500, behind the non-ESP marker: transport.py).
        self.esp_flow: frozenset[str] = frozenset()

    def fileno(self) -> int:
        return self.transport.fileno()

    def receive(self, now: float, limit: int = 256) -> list[Event]:
        """Every datagram waiting (up to `limit`) through the session."""
        out = Output()
        for punted in self.transport.receive(limit):
            out.extend(self.channel.receive(now, punted.source, punted.payload))
        return self.emit(out)

    def tick(self, now: float) -> list[Event]:
        return self.emit(self.channel.tick(now))

    def send(self, now: float, peer: int, message: Message) -> list[Event]:
        return self.emit(self.channel.send(now, peer, message))

    def emit(self, out: Output) -> list[Event]:
        """Send the datagrams of `out`; its events are the caller's."""
        for destination, data in out.datagrams:
            source = self.local.get(ipaddress.ip_address(destination[0]).version)
            if source is None:
                self.channel.stats["no_local_address"] += 1
                continue
            if destination[0] in self.esp_flow:
                source = (source[0], NAT_T_PORT)
            self.transport.send(source, destination, data)
        return out.events

    def drops(self) -> Counter[Drop]:
        """Everything dropped, by reason: at the transport and in the session."""
        return self.transport.drops + self.channel.drops
