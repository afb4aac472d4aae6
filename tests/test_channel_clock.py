"""The channel against clock attacks: a caller's clock that steps (token buckets, session
ages), handshake timestamps (grain, strictness, marks that outlive the Channel) and the
lower node yielding when its own handshakes keep failing. The agent's own clock never
steps (vppmesh/agent/clock.py, tests/test_clock.py); the channel must not rely on that."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.noise import public_bytes
from vppmesh.keying.keys import NodeSecrets
from vppmesh.testing.channel_net import ADDRESSES, PSK, Net, up

HOUR = 3600.0


def inits(out: s.Output) -> list[bytes]:
    return [d for _, d in out.datagrams if d[1] == m.DatagramType.INIT]


def test_channel_token_bucket_after_a_backward_step_admits_an_honest_handshake() -> None:
    bucket = s.TokenBucket(s.NODE_RATE, s.NODE_BURST, 10_000.0)
    assert bucket.take(10_000.0)
    assert bucket.take(10_000.0 - HOUR)  # before: an hour's refill owed, refused for an hour
    assert bucket.take(10_000.0 - HOUR + 1.0)


def test_channel_handshake_answered_after_the_responders_clock_stepped_back() -> None:
    net = up(Net())  # node 2's node bucket now stamped at 1000
    node1, node2 = net.nodes[1], net.nodes[2]
    node1._peers[2].pending = None
    [init] = inits(node1.tick(1000.0 + s.REJECT_AFTER))  # its session expired: a new one
    out = node2.receive(1000.0 - HOUR, ADDRESSES[1], init)  # node 2's clock: an hour back
    assert m.Drop.RATE_LIMITED not in node2.drops
    assert [d for _, d in out.datagrams if d[1] == m.DatagramType.RESPONSE]


def test_channel_sessions_still_rekey_after_the_clock_stepped_back() -> None:
    """A session (and a pending handshake) stamped before a step back an hour must not
    wait an hour: its age restarts at the step, so it rekeys REKEY_AFTER later."""
    net = up(Net())
    back = 1000.0 - HOUR
    net.run(1, net.nodes[1].tick(back), back)
    assert net.nodes[1].established(2, back + 1.0)
    out = net.nodes[1].tick(back + s.REKEY_AFTER + 1.0)
    assert inits(out)  # before: none until an hour later


def test_channel_an_unanswered_handshake_is_retried_after_the_clock_stepped_back() -> None:
    node = Net().nodes[1]
    assert inits(node.tick(1000.0))  # lost
    back = 1000.0 - HOUR
    assert not inits(node.tick(back))
    assert inits(node.tick(back + s.HANDSHAKE_RETRY))  # before: an hour later


def test_channel_timestamps_have_millisecond_grain_and_strictly_increase() -> None:
    net = Net()
    node = net.nodes[1]
    stamps = []
    for i in range(5):
        node._peers[2].pending = None
        [init] = inits(node.tick(1000.123456789 + i * 1e-6))
        stamps.append(m.parse_datagram(init).timestamp)  # type: ignore[union-attr]
    # Not the clock's nanoseconds: its millisecond, then one more each time.
    assert stamps == [1_000_123_000_000 + i for i in range(5)]


def test_channel_timestamps_come_from_the_given_source() -> None:
    given = iter([7_000, 7_001])
    keys = [X25519PrivateKey.generate() for _ in range(2)]
    channel = s.Channel(1, NodeSecrets(keys[0], PSK),
                        [s.PeerConfig(2, public_bytes(keys[1]), ADDRESSES[2])], boot_id=1,
                        timestamps=lambda: next(given))
    [init] = inits(channel.tick(5e9))
    assert m.parse_datagram(init).timestamp == 7_000  # type: ignore[union-attr]


def restarted(net: Net, number: int) -> s.Channel:
    """Node `number`'s Channel made again, as a restarted agent makes it: the marks the
    old one exposed handed to the new one (Secrecy keeps them in the state directory)."""
    old = net.nodes[number]
    new = net.nodes[number] = s.Channel(
        number, NodeSecrets(net.keys[number], PSK),
        [s.PeerConfig(p, public_bytes(k), ADDRESSES[p]) for p, k in net.keys.items()
         if p != number], boot_id=200 + number, timestamp_marks=old.timestamp_marks())
    return new


def test_channel_a_restarted_channel_refuses_a_recorded_init() -> None:
    net = up(Net())
    [recorded] = [d for a, b, d in net.wire if (a, b) == (1, 2) and d[1] == m.DatagramType.INIT]
    assert net.nodes[2].timestamp_marks() == {1: m.parse_datagram(recorded).timestamp}  # type: ignore[union-attr]
    node2 = restarted(net, 2)
    out = node2.receive(1010.0, ADDRESSES[1], recorded)
    assert out == s.Output() and node2.drops == {m.Drop.REPLAY: 1}
    assert node2.stats["dh"] == 0 and not node2.established(1)


def test_channel_a_recorded_init_stays_old_when_the_peers_record_changes() -> None:
    net = up(Net())
    [recorded] = [d for a, b, d in net.wire if (a, b) == (1, 2) and d[1] == m.DatagramType.INIT]
    node2 = net.nodes[2]
    moved = ("192.0.2.91", 5199)  # node 1's record changed: its peer state starts afresh
    node2.set_peers([s.PeerConfig(1, public_bytes(net.keys[1]), moved)])
    assert node2.receive(1010.0, ADDRESSES[1], recorded) == s.Output()
    assert node2.drops == {m.Drop.REPLAY: 1}


def test_channel_lower_node_answers_the_peer_once_its_own_keep_failing() -> None:
    """Node 1's handshakes never get an answer (dropped on the way, or refused by node 2
    as replays: node 1 lost its state and its clock is behind). Node 1, the lower number,
    first ignores node 2's crossing Init; once YIELD_AFTER of its own went unanswered it
    answers, and both end on one session."""
    net = Net()
    node1, node2 = net.nodes[1], net.nodes[2]
    now = 1000.0
    assert inits(node1.tick(now))  # lost, as every Init of node 1 here
    net.run(2, node2.tick(now), now)  # crossing: node 1 holds its own
    assert node1.stats["collisions"] == 1 and not node1.established(2)
    for _attempt in range(2):  # s.YIELD_AFTER
        now += s.HANDSHAKE_RETRY_MAX
        assert inits(node1.tick(now))  # lost
    net.run(2, node2.tick(now), now)  # node 2's retry
    assert node1.established(2, now) and node2.established(1, now)
    net.run(1, node1.send(now, 2, m.Keepalive()), now)
    net.run(2, node2.send(now, 1, m.Keepalive()), now)
    assert node1.stats["received"] >= 1 and node2.stats["received"] >= 1
    assert not node1.drops and not node2.drops


def test_channel_a_new_key_of_the_peer_starts_a_new_mark() -> None:
    """The peer reinstalled (new static key) with its clock behind what its old key's
    handshakes said: its handshakes are answered (the old key's cannot pass the MAC)."""
    net = up(Net())
    node2 = net.nodes[2]
    node2._marks[1] = 10**19
    key = X25519PrivateKey.generate()
    node2.set_peers([s.PeerConfig(1, public_bytes(key), ADDRESSES[1])])
    reinstalled = s.Channel(1, NodeSecrets(key, PSK),
                            [s.PeerConfig(2, public_bytes(net.keys[2]), ADDRESSES[2])], boot_id=9)
    [init] = inits(reinstalled.tick(1000.0))
    out = node2.receive(1000.0, ADDRESSES[1], init)
    assert [d for _, d in out.datagrams if d[1] == m.DatagramType.RESPONSE]
